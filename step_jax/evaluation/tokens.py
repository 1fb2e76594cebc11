"""Tokens and GFLOPs of a trained (or random) model on real images: how many tokens each
stage keeps, and the useful (valid tokens) and executed (compiled slots: padding and bucket
capacity included) GFLOPs from the analytic cost model (`models.flops`).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from step_jax.data import get_source
from step_jax.evaluation import dispatch
from step_jax.models import early_exit
from step_jax.models import flops


def load_images(config, folder, n, split=None):
  """n images resized to the config's crop, uint8 [n, H, W, 3]: from `folder`, else from
  `split` (default: the split being evaluated, config.data.split, else data.eval_split)."""
  h, w = config.data.image_size
  if folder:
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not names:
      raise FileNotFoundError(f"no PNG/JPEG images in --images={folder}")
    ims = [Image.open(os.path.join(folder, f)).convert("RGB") for f in names[:n]]
  else:
    split = split or config.data.get("split", "") or config.data.eval_split
    src = get_source(config.data, split, config.num_classes, config.ignore_index)
    ims = [Image.fromarray(src[i]["image"]) for i in range(min(n, len(src)))]
  return np.stack([np.asarray(im.resize((w, h), Image.BILINEAR)) for im in ims])


def exit_prediction(model, outputs, s):
  """(class logits [B, Q, K], mask logits [B, Q, N]) that exit s of `model` rates its tokens
  with (early_exit.token_confidence / halting), read from the model's `outputs`."""
  aux = outputs["aux"][model.exit_output_index(s)]
  masks = aux["pred_masks"]
  return aux["pred_logits"], masks.reshape(masks.shape[:2] + (-1,))


def calibrate_exits(model, variables, images, share, *, labels=None):
  """Per-exit thresholds such that `share` of the active tokens are halting candidates at
  each exit (the top-k-per-class rule then keeps a few of them: <= k·C tokens); `labels`
  only for the oracle merge."""
  kw = {} if labels is None else dict(labels=jnp.asarray(labels))
  n = len(model.exit_layers)
  # One capacity: the confidences do not depend on the buckets, and a fine ladder's programs
  # would take long to compile. The thresholds are arguments: one program for every exit.
  single = model.clone(buckets=(1.0,), exit_buckets=(1.0,))
  run = jax.jit(lambda v, x, t: single.clone(exit_threshold=tuple(t)).apply(v, x, **kw))
  images = jnp.asarray(images, jnp.float32)
  taus = []
  for s in range(n):
    # Exits before s halt at their calibrated thresholds; s and later halt nothing (τ = 1).
    out, info = run(variables, images, jnp.asarray(taus + [1.0] * (n - s), jnp.float32))
    conf, _ = early_exit.token_confidence(*exit_prediction(model, out, s))
    # Cells still active at exit s (with supertokens a token counts once per covered cell).
    alive = np.asarray(info["halt_stage"]).reshape(conf.shape) >= s
    taus.append(_threshold_for_share(np.asarray(conf)[alive], share))
  return tuple(taus)


def _threshold_for_share(conf, share):
  """A threshold at which at most `share` of `conf` halts (conf > threshold), midway between
  the largest confidence that stays and the smallest that halts: a threshold equal to one
  token's confidence would let float noise (another bucket capacity, another batch) flip that
  token. Tied confidences at the cut all stay (random heads can saturate many tokens to one
  confidence; halting them would halt far more than `share`)."""
  c = np.sort(np.asarray(conf, np.float64).ravel())
  i = len(c) - int(np.floor(share * len(c) + 1e-9))   # c[i:] halt
  if 0 < i < len(c) and c[i] == c[i - 1]:
    i = int(np.searchsorted(c, c[i], side="right"))   # past the tie: the tied tokens stay
  if i >= len(c):
    return float(np.nextafter(np.float32(c[-1]), np.float32(np.inf)))   # none halts
  if i == 0:
    return float(np.nextafter(np.float32(c[0]), np.float32(-np.inf)))   # all halt
  return float((c[i - 1] + c[i]) / 2)


def batches_of(model, variables, images, batch, group=False, forward=None):
  """Index batches of `batch` images (the last tiled to full size from the first images, so
  that every call has one shape); `group`: ordered by token count first
  (dispatch.group_by_tokens), so each batch's capacity is close to its images' counts."""
  n, counts = len(images), None
  if group and model.shares_tokens:   # (ALGM's counts come from inside its encoder)
    counter = forward if isinstance(forward, dispatch.HostBuckets) else \
        dispatch.HostBuckets(model)
    counts = counter.token_counts(variables, images)
  groups = dispatch.batch_indices(n, batch, counts)
  pad = lambda g: np.concatenate([g, np.resize(np.arange(n), batch - len(g))]) if len(g) < batch \
      else g
  return [pad(np.asarray(g)) for g in groups]


def image_tokens(config, model, info, j, image_size=None):
  """Tokens and GFLOPs of image j of a batch's `info` (the model's, on images of
  `image_size`, default the config's crop): dict(tokens, capacity: per encoder stage;
  useful, executed: flops.token_macs of its valid tokens and of the bucket slots it ran in)."""
  hw = tuple(image_size or config.data.image_size)
  n_full = (hw[0] // model.backbone.patch_size) * (hw[1] // model.backbone.patch_size)
  n_tok = float(np.asarray(info["num_tokens"])[j]) if "num_tokens" in info else float(n_full)
  # One capacity per batch, or per image ([B]) when HostBuckets splits after the merge.
  own = lambda c: float(np.asarray(c).reshape(-1)[j if np.size(c) > 1 else 0])
  cap = own(info.get("capacity", n_full))
  if model.merges_in_encoder:
    # Segments: the grid (algm) or the supertokens (dcts_algm), then after each merge; with
    # exits (algm_dtop) the merged tokens still active after each exit.
    merged = [float(t) for t in np.asarray(info["algm_tokens"])[j]]
    merged_caps = [own(c) for c in np.asarray(info["algm_capacity"])]
    active = caps = None
    if model.exit_layers:
      active = [float(a) for a in np.asarray(info["active_tokens"])[j]]
      caps = [own(c) for c in np.asarray(info["stage_capacity"])]
    return dict(tokens=[n_tok] + merged + (active or [])[1:],
                capacity=[cap] + merged_caps + (caps or [])[1:],
                useful=flops.token_macs(config, n_tok, active, image_size=hw,
                                        merged_tokens=merged),
                executed=flops.token_macs(config, cap, caps, image_size=hw,
                                          merged_tokens=merged_caps))
  if model.exit_layers:
    active = [float(a) for a in np.asarray(info["active_tokens"])[j]]
    caps = [cap] * len(active) if model.exit_mode == "mask" else \
        [cap] + [own(c) for c in np.asarray(info["stage_capacity"])[1:]]
  else:
    active = caps = None
  return dict(tokens=active or [n_tok], capacity=caps or [cap],
              useful=flops.token_macs(config, n_tok, active, image_size=hw),
              executed=flops.token_macs(config, cap, caps, image_size=hw))


def token_stats(config, model, variables, images, *, batch=1, group=False, forward=None):
  """Tokens per stage and GFLOPs (useful: valid tokens; executed: compiled slots), averaged
  over `images` run `batch` at a time: a batch runs in the capacity its largest count needs,
  so at batch > 1 an image's executed GFLOPs follow its batch (`group`: batches of similar
  token counts, see batches_of). `forward(variables, images) → (outputs, info)`: the model
  (default: the one-program model, jitted; or a dispatch.HostBuckets)."""
  hw = tuple(config.data.image_size)
  n_full = (hw[0] // model.backbone.patch_size) * (hw[1] // model.backbone.patch_size)
  run = forward or jax.jit(model.apply)
  images = np.asarray(images)
  useful, executed, stage_tokens, stage_caps, seen = [], [], [], [], set()
  for idx in batches_of(model, variables, images, batch, group, forward):
    _, info = run(variables, images[idx])
    for j, i in enumerate(idx):
      if int(i) in seen:   # a tiled copy: counted once
        continue
      seen.add(int(i))
      row = image_tokens(config, model, info, j)
      stage_tokens.append(row["tokens"])
      stage_caps.append(row["capacity"])
      useful.append(row["useful"])
      executed.append(row["executed"])
  mean = lambda rows, k: float(np.mean([r[k] for r in rows]))
  tok, caps = np.mean(stage_tokens, 0), np.mean(stage_caps, 0)
  return dict(tokens_full=n_full,
              mean_tokens_per_stage=tok.round(1).tolist(),
              # Bucket slots compiled per stage, and their waste: executed / useful tokens.
              mean_capacity_per_stage=caps.round(1).tolist(),
              capacity_over_tokens_per_stage=(caps / np.maximum(tok, 1e-9)).round(3).tolist(),
              gflops_useful=mean(useful, "total"), gflops_executed=mean(executed, "total"),
              executed_over_useful=round(mean(executed, "total") / mean(useful, "total"), 4),
              gflops_policy=mean(useful, "policy"), gflops_backbone=mean(useful, "backbone"),
              gflops_heads=mean(useful, "heads"), images=len(images), stats_batch=batch,
              grouped_by_tokens=bool(group))


def eval_gflops(config, model, variables, num_images=16, split=None, forward=None):
  """GFLOPs for the eval json: the formula for static models; for supertoken/early-exit
  models the mean over the first `num_images` images of `split` (default: the evaluated
  split, see load_images; at the crop size) of the useful and the executed (bucket capacity)
  GFLOPs, with the tokens per stage. forward: the evaluation's dispatch.HostBuckets, whose
  capacities are then the executed ones (default: the one-program model's)."""
  if model.merge == "none" and not model.exit_layers:
    return dict(gflops=flops.model_macs(config)["total"])
  h, w = config.data.image_size
  p = model.backbone.patch_size
  full = flops.token_macs(config, (h // p) * (w // p))["total"]   # every token, every layer
  if model.merge == "oracle":  # needs labels; token_stats runs images only
    return dict(gflops_full=full)
  split = split or config.data.get("split", "") or config.data.eval_split
  st = token_stats(config, model, variables, load_images(config, "", num_images, split),
                   forward=forward)
  return dict(gflops=st["gflops_useful"], gflops_executed=st["gflops_executed"],
              gflops_full=full, tokens_per_stage=st["mean_tokens_per_stage"],
              tokens_full=st["tokens_full"], gflops_images=st["images"], gflops_split=split)
