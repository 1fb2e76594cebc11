"""A model from its config: `build` turns a `config.model` ConfigDict (configs/common.py) into
a `segmenter.Segmenter`, checking every value first; `exit_head_of`, `head_stages` and
`head_out_layers` are the config readers that other modules (FLOP counts, weight loading) share
with it, so each reads a config exactly as the builder does.
"""
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from step_jax.models import atm
from step_jax.models import attention
from step_jax.models import policy as policy_lib
from step_jax.models import segmenter
from step_jax.models import vit as vit_lib
from step_jax.models.segmenter import (BUCKETS, DEFAULT_EXIT_HEAD, EXIT_HEADS, HEAD_LAYERS,
                                       RENAMED_EXIT_HEADS, TAU_6899)


def exit_head_of(model_cfg):
  """The exit head design a model config asks for (DEFAULT_EXIT_HEAD when it names none);
  the one reader of `model.exit_head`."""
  exit_head = model_cfg.get("exit_head", DEFAULT_EXIT_HEAD)
  if exit_head in RENAMED_EXIT_HEADS:
    raise ValueError(f"model.exit_head={exit_head!r} was renamed "
                     f"{RENAMED_EXIT_HEADS[exit_head]!r} (SegViT's stages run shallowest "
                     f"first); SegViT's own head with exits is {DEFAULT_EXIT_HEAD!r}. Workdirs "
                     "saved with the old name load as trained.")
  if exit_head not in EXIT_HEADS:
    raise ValueError(f"model.exit_head={exit_head!r}: use one of {EXIT_HEADS}")
  return exit_head


def head_stages(model_cfg):
  """[(module, stage, layer)]: the 1-based block whose output each ATM head stage of the
  model that `model_cfg` builds reads ('head' is SegViT's head, or DToP's final head;
  'exit_heads_<k>' DToP's exit heads). Weights move between designs by these layers
  (pretrained.align_head_stages): SegViT's stage 0 reads the deepest out_layer."""
  depth = vit_lib.decode_variant(model_cfg.variant)["depth"]
  exit_layers = tuple(model_cfg.get("exit_layers", ()))
  design = exit_head_of(model_cfg) if exit_layers else DEFAULT_EXIT_HEAD
  if design in ("dtop", "dtop_multiclass"):
    return [(f"exit_heads_{k}", 0, l) for k, l in enumerate(exit_layers)] + [("head", 0, depth)]
  out_layers = head_out_layers(model_cfg.out_layers, exit_layers, design)
  if design == "atm_shallow_first":
    return [("head", i, l) for i, l in enumerate(out_layers)]
  return [("head", i, l) for i, l in enumerate(reversed(out_layers))]


def head_out_layers(out_layers, exit_layers, design):
  """The blocks SegViT's head reads: `out_layers`, plus the exits for 'atm_shallow_first'
  (a stage at each exit)."""
  if exit_layers and design == "atm_shallow_first":
    return tuple(sorted(set(out_layers) | set(exit_layers)))
  return tuple(out_layers)


MERGES = ("none", "cts", "dcts", "oracle", "algm", "dcts_algm")


def algm_settings(model_cfg, depth):
  """The Segmenter's ALGM fields from a model config, checked: algm_layers (local, global
  1-based blocks; 'dcts_algm' merges in the global one only), algm_threshold (local),
  algm_global_min, algm_batch_min."""
  layers = tuple(model_cfg.get("algm_layers", segmenter.Segmenter.algm_layers))
  if (len(layers) != 2 or any(not isinstance(l, (int, np.integer)) for l in layers)
      or not 1 <= layers[0] < layers[1] <= depth):
    raise ValueError(f"model.algm_layers={layers}: give two 1-based blocks, the local merge's "
                     f"then the global merge's, 1 <= local < global <= depth {depth} "
                     "(ALGM: (1, 5) for ViT-Ti/S/B)")
  out = dict(algm_layers=layers)
  for key, default in (("algm_threshold", segmenter.Segmenter.algm_threshold),
                       ("algm_global_min", segmenter.Segmenter.algm_global_min)):
    value = model_cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value < 2:
      raise ValueError(f"model.{key}={value!r} must be a cosine similarity in [-1, 2), e.g. "
                       "0.9 (above 1: nothing merges)")
    out[key] = float(value)
  batch_min = model_cfg.get("algm_batch_min", False)
  if not isinstance(batch_min, (bool, np.bool_)):
    raise ValueError(f"model.algm_batch_min={batch_min!r} must be True (every image merges as "
                     "many tokens as the batch's fewest, the reference) or False (per image)")
  out["algm_batch_min"] = bool(batch_min)
  return out


def build(model_cfg, num_classes: int, image_size: Sequence[int], ignore_index: int = 255):
  """Builds the model from a `config.model` ConfigDict (see configs/common.py).

  Keys: variant, out_layers, head_dim, head_heads, head_layers, head_dropout, drop_path, dtype,
  remat, attention_impl (attention.IMPLS), scan_blocks, posemb_grid, pixel_mean/std; token
  sharing: merge ('none' | 'cts' | 'dcts' | 'oracle' | 'algm' | 'dcts_algm'), thresholds, cts_shared, superpatch_resize, buckets, policy (a ConfigDict with
  source, hidden); ALGM: algm_layers, algm_threshold, algm_global_min, algm_batch_min; early
  exit: exit_layers, exit_threshold, exit_mode, keep_top_k, exit_buckets, exit_head_heads.
  """
  v = vit_lib.decode_variant(model_cfg.variant)
  try:
    dtype = jnp.dtype(model_cfg.get("dtype", "float32"))
  except TypeError:
    dtype = None
  if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise ValueError(f"model.dtype={model_cfg.get('dtype')!r}: use 'float32', 'bfloat16' or "
                     "'float16'")
  p = v.pop("patch_size")
  if len(image_size) != 2 or image_size[0] % p or image_size[1] % p:
    raise ValueError(f"data.image_size={tuple(image_size)} is not a multiple of the patch size "
                     f"{p} of {model_cfg.variant}; use e.g. "
                     f"{tuple(-(-s // p) * p for s in image_size)}")
  if num_classes < 1 or 0 <= ignore_index < num_classes:
    raise ValueError(f"ignore_index={ignore_index} must lie outside the classes "
                     f"0..{num_classes - 1} (num_classes={num_classes})")
  posemb_grid = tuple(model_cfg.get("posemb_grid", None) or (image_size[0] // p, image_size[1] // p))
  attention_impl = model_cfg.get("attention_impl", "auto")
  if attention_impl not in attention.IMPLS:
    raise ValueError(f"model.attention_impl={attention_impl!r}: use one of {attention.IMPLS}")
  backbone = vit_lib.ViT(**v, patch_size=p, posemb_grid=posemb_grid,
                         drop_path=model_cfg.get("drop_path", 0.0),
                         remat=model_cfg.get("remat", False), attention_impl=attention_impl,
                         scan_blocks=model_cfg.get("scan_blocks", False), dtype=dtype)
  depth = v["depth"]
  out_layers = tuple(model_cfg.out_layers)
  exit_layers = tuple(model_cfg.get("exit_layers", ()))
  exit_head = exit_head_of(model_cfg)
  head_kw = dict(dim=model_cfg.head_dim, num_layers=model_cfg.get("head_layers", HEAD_LAYERS),
                 dropout=model_cfg.get("head_dropout", 0.1), dtype=dtype)
  if exit_layers:
    if list(exit_layers) != sorted(set(exit_layers)) or exit_layers[0] < 1 \
        or exit_layers[-1] >= depth:
      raise ValueError(f"model.exit_layers={exit_layers} must be increasing 1-based layers "
                       f"below the depth {depth} of {model_cfg.variant}")
  if exit_layers and exit_head in ("dtop", "dtop_multiclass"):
    out_layers = (depth,)  # DToP: the final head reads the last block only
    dtop_head = lambda: atm.ATMHead(num_classes, num_heads=model_cfg.get(
        "exit_head_heads", model_cfg.head_heads), num_stages=1,
                                    binary_cls=exit_head == "dtop", **head_kw)
    head, exit_heads = dtop_head(), tuple(dtop_head() for _ in exit_layers)
  else:
    out_layers = head_out_layers(out_layers, exit_layers, exit_head)
    if not out_layers or max(out_layers) > depth or min(out_layers) < 1:
      raise ValueError(f"model.out_layers={out_layers} must be 1-based layers within depth "
                       f"{depth} of {model_cfg.variant}")
    if exit_layers and out_layers[-1] != depth:
      raise ValueError(f"model.exit_head={exit_head!r} needs the last block {depth} in "
                       f"model.out_layers={out_layers}: the final stage reads it")
    head = atm.ATMHead(num_classes, num_heads=model_cfg.head_heads,
                       num_stages=len(out_layers), **head_kw)
    exit_heads = ()
  merge = model_cfg.get("merge", "none")
  if merge not in MERGES:
    raise ValueError(f"model.merge={merge!r}: use one of {MERGES}")
  algm = algm_settings(model_cfg, depth) if merge in segmenter.ENCODER_MERGES else {}
  if merge == "dcts_algm" and exit_layers:
    raise ValueError(f"model.merge='dcts_algm' with early exits (exit_layers={exit_layers}) is "
                     "not built: use exit_layers=()")
  if merge == "algm" and exit_layers and (exit_head != "segvit"
                                          or exit_layers[0] < algm["algm_layers"][1]):
    # The exits rate the globally merged tokens; SegViT's head reads them unmerged at the end.
    raise ValueError(f"model.merge='algm' with early exits needs exit_head='segvit' and exit "
                     f"layers at or after the global merge's block {algm['algm_layers'][1]}; "
                     f"got exit_head={exit_head!r}, exit_layers={exit_layers}")
  policy = None
  if merge in segmenter.POLICY_MERGES:
    pc = model_cfg.policy
    policy = policy_lib.PolicyNet(source=pc.get("source", "pypi"), hidden=pc.get("hidden", 128),
                                  patch_size=p)
  k = model_cfg.get("cts_shared", 0)
  if merge == "cts" and not (0 < k < 1 or (k >= 1 and float(k).is_integer())):
    raise ValueError(f"model.cts_shared={k!r}: CTS needs a whole number of shared 2x2 windows "
                     "(>= 1) or a share of them in (0, 1)")
  thresholds = tuple(model_cfg.get("thresholds", TAU_6899))
  if any(not 0.0 <= t <= 1.0 for t in thresholds):
    raise ValueError(f"model.thresholds={thresholds} must lie in [0, 1]")
  exit_threshold = model_cfg.get("exit_threshold", 1.0)
  if any(not 0.0 <= t <= 1.0 for t in np.atleast_1d(exit_threshold)):
    raise ValueError(f"model.exit_threshold={exit_threshold} must lie in [0, 1]")
  if np.ndim(exit_threshold) and len(exit_threshold) != len(exit_layers):
    raise ValueError(f"model.exit_threshold={tuple(exit_threshold)} needs one value per exit "
                     f"layer {exit_layers} (or a single value)")
  exit_mode = model_cfg.get("exit_mode", "compact")
  if exit_mode not in ("mask", "compact"):
    raise ValueError(f"model.exit_mode={exit_mode!r}: use 'mask' or 'compact'")
  buckets = tuple(model_cfg.get("buckets", (1.0,)))
  if not buckets or any(not 0.0 < b <= 1.0 for b in buckets):
    raise ValueError(f"model.buckets={buckets} must be fractions in (0, 1]")
  return segmenter.Segmenter(backbone, head, out_layers,
                   pixel_mean=tuple(model_cfg.get("pixel_mean", (127.5,) * 3)),
                   pixel_std=tuple(model_cfg.get("pixel_std", (127.5,) * 3)),
                   merge=merge, thresholds=thresholds,
                   cts_shared=model_cfg.get("cts_shared", 0),
                   superpatch_resize=model_cfg.get("superpatch_resize", "area"),
                   buckets=buckets,
                   ignore_index=ignore_index, policy=policy,
                   exit_layers=exit_layers, exit_heads=exit_heads,
                   exit_threshold=exit_threshold,
                   exit_mode=exit_mode, exit_head=exit_head,
                   keep_top_k=model_cfg.get("keep_top_k", 5),
                   exit_buckets=tuple(model_cfg.get("exit_buckets", BUCKETS)), **algm)
