"""Weights from elsewhere (`config.init_from`): another step_jax workdir (e.g. the BASE model
for DToP-style pruning fine-tuning), a `.npz` of our parameter names, or a timm/mmseg ViT or
SegViT checkpoint (`.pth` needs torch; `.safetensors` does not), converted by
`step_jax.models.convert`; `merge_params` places them into a model's parameters.
"""
import os
import re

from absl import logging
import jax
import numpy as np

from step_jax.models import convert
from step_jax.models import builder
from step_jax.models import segmenter
from step_jax.runtime import checkpoint


def flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def unflatten(flat):
  tree = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _torch_state_dict(path: str):
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top  (optional: only for .pth inputs)
  sd = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "module"):
    if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
      sd = sd[key]
  return {k: v.float().numpy() if hasattr(v, "float") else np.asarray(v) for k, v in sd.items()}


def _params_from_state_dict(sd, model_cfg):
  """timm/mmseg ViT (+ optional SegViT head under decode_head.) → our params subtree."""
  if any("/" in k for k in sd):  # an npz of our own flattened names
    return unflatten(sd)
  grid = tuple(model_cfg.posemb_grid) if model_cfg.get("posemb_grid") else None
  if any(k.startswith("backbone.") for k in sd):  # a whole mmseg SegViT/DToP segmentor
    return convert.segmentor_to_params(sd, posemb_grid=grid)
  return {"backbone": convert.timm_vit_to_params(sd, posemb_grid=grid)}


def load_pretrained(path: str, model_cfg) -> dict:
  """Numpy params (possibly a subtree of the model's) from `path`; see module docstring."""
  if os.path.isdir(path):
    return checkpoint.read_params(path)
  if path.endswith(".npz"):
    with np.load(path) as z:
      return _params_from_state_dict(dict(z), model_cfg)
  return _params_from_state_dict(_torch_state_dict(path), model_cfg)


def merge_params(target, loaded, *, source="init_from"):
  """`target` (sharded jax arrays) with every leaf of `loaded` that exists in it replaced.

  Shapes must agree (a mismatch raises, naming the parameter); parameters that only one
  side has are listed in the log. Each replaced leaf keeps the target's sharding.
  """
  paths_t = {jax.tree_util.keystr(p, simple=True, separator="/"): x
             for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  flat_l = flatten(loaded)
  bad = [f"{k}: checkpoint {flat_l[k].shape} vs model {paths_t[k].shape}"
         for k in flat_l if k in paths_t and tuple(flat_l[k].shape) != tuple(paths_t[k].shape)]
  if bad:
    raise ValueError(f"{source}: shape mismatch for " + "; ".join(bad[:10]))
  used = [k for k in flat_l if k in paths_t]
  unused = sorted(set(flat_l) - set(paths_t))
  missing = sorted(set(paths_t) - set(flat_l))
  logging.info("%s: loaded %d arrays; %d not in the model %s; %d model arrays kept from init "
               "%s", source, len(used), len(unused), unused[:5], len(missing), missing[:5])
  if not used:
    raise ValueError(f"{source}: no parameter names in common with the model "
                     f"(checkpoint has e.g. {sorted(flat_l)[:5]})")

  def pick(path, x):
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    if key not in flat_l:
      return x
    value = flat_l[key].astype(x.dtype)
    return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: value[idx])
  return jax.tree_util.tree_map_with_path(pick, target), dict(loaded=len(used),
                                                              unused=unused, missing=missing)


_STAGE_KEY = re.compile(r"^(head|exit_heads_\d+)/(input_proj_|proj_norm_|decoder_)(\d+)(.*)$")


def align_head_stages(loaded, source_stages, target_stages, *, source="init_from"):
  """`loaded` params with every ATM head stage renamed to the target's stage that reads the
  same block, so weights trained on one layer's features never land on another's (SegViT's
  stage 0 reads its deepest out_layer; 'atm_shallow_first' runs stage 0 on the shallowest;
  DToP's final head reads the last block).

  source_stages / target_stages: builder.head_stages of the two model configs. Stages of
  the source whose layer the target does not read are dropped, target stages with no source
  layer keep their initial values (both logged). Raises if the source has head stages and
  none of them reads a block the target's stages read.
  """
  by_layer = {layer: (module, stage) for module, stage, layer in target_stages}
  flat, out, moved, dropped = flatten(loaded), {}, {}, set()
  for key, value in flat.items():
    m = _STAGE_KEY.match(key)
    if m is None:
      out[key] = value
      continue
    module, kind, stage, rest = m.group(1), m.group(2), int(m.group(3)), m.group(4)
    layer = next((l for mod, st, l in source_stages if (mod, st) == (module, stage)), None)
    if layer is None or layer not in by_layer:
      dropped.add(f"{module} stage {stage} (block {layer})")
      continue
    t_module, t_stage = by_layer[layer]
    out[f"{t_module}/{kind}{t_stage}{rest}"] = value
    moved[(module, stage)] = (t_module, t_stage, layer)
  if dropped and not moved:
    raise ValueError(f"{source}: none of its head stages reads a block the model's stages "
                     f"read (checkpoint: {sorted(dropped)}; model: "
                     f"{[(mod, st, l) for mod, st, l in target_stages]})")
  fresh = [(mod, st, l) for mod, st, l in target_stages
           if (mod, st, l) not in set(moved.values())]
  renamed = {k: v for k, v in moved.items() if (k[0], k[1]) != v[:2]}
  if renamed or dropped or fresh:
    logging.warning("%s: head stages moved to the stage reading the same block %s; dropped "
                    "(block not read by this model) %s; kept initial values %s", source,
                    {f"{a[0]}/{a[1]}": f"{b[0]}/{b[1]} (block {b[2]})"
                     for a, b in renamed.items()}, sorted(dropped), fresh)
  return unflatten(out)


def source_head_stages(loaded, source_model_cfg, target_model_cfg):
  """The head stages of weights loaded for `target_model_cfg`: from the source's own config
  (a step_jax workdir), else (a converted SegViT or DToP checkpoint) SegViT's stages over the
  target's out_layers, or DToP's heads at its exits when the checkpoint has exit heads."""
  if source_model_cfg is not None:
    return builder.head_stages(source_model_cfg)
  cfg = target_model_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.exit_head = "dtop" if "exit_heads_0" in loaded else segmenter.DEFAULT_EXIT_HEAD
    if "exit_heads_0" not in loaded:
      cfg.exit_layers = ()
  return builder.head_stages(cfg)
