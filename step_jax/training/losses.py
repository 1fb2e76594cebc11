"""Losses as pure functions.

ATM loss (SegViT `ATMLoss` / MaskFormer `SetCriterion` with fixed query=class matching):
  * CE over the class head: query c's target is c (binary head: "present") if class c occurs
    in the image, else "no object", whose weight is 0.1; weighted mean over all queries.
  * sigmoid focal (α .25, γ 2) ×20 and dice (+1 smoothing) ×1 between query c's mask logits,
    bilinearly upsampled to label resolution, and the binary mask `label == c`, for the classes
    present only; focal is a mean over pixels; both are summed over masks and divided by the
    number of present masks in the whole batch (≥ 1).
  * Ignore pixels are not masked out: they are negatives for every class, as in the reference.
The same terms apply to each auxiliary output, equally weighted unless `weights` says
otherwise (train.loss_fn: the exits' predictions before pruning starts).

Static shapes: all C queries are computed and weighted by presence, never gathered.
"""
import jax
import jax.numpy as jnp

from step_jax.models import resize


def class_presence(labels, num_classes):
  """[B, C] bool: which classes occur in each label map (ignore values fall outside 0..C-1)."""
  onehot = labels[..., None] == jnp.arange(num_classes)
  return jnp.any(onehot, axis=tuple(range(1, labels.ndim)))


def atm_class_loss(pred_logits, present, no_object_weight=0.1):
  """Weighted CE; pred_logits [B, Q, C+1] (SegViT) or [B, Q, 2] (DToP binary head)."""
  b, q, k = pred_logits.shape
  no_object = k - 1
  own = 0 if k == 2 else jnp.arange(q)[None, :]
  target = jnp.where(present, own, no_object)
  logp = jax.nn.log_softmax(pred_logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  w = jnp.where(present, 1.0, no_object_weight)
  return jnp.sum(w * nll) / jnp.sum(w)


def atm_mask_losses(mask_logits, labels, present, num_masks, alpha=0.25, gamma=2.0):
  """Focal and dice losses; mask_logits [B, Q, h, w] upsampled to labels [B, H, W]."""
  x = resize.resize_2d(mask_logits.astype(jnp.float32), labels.shape[1:], "bilinear",
                       axes=(-2, -1))
  t = (labels[:, None] == jnp.arange(x.shape[1])[None, :, None, None]).astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  ce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))  # BCE with logits
  p_t = p * t + (1 - p) * (1 - t)
  alpha_t = alpha * t + (1 - alpha) * (1 - t)
  focal = jnp.mean(alpha_t * ce * (1 - p_t) ** gamma, axis=(2, 3))          # [B, Q]
  inter = jnp.sum(p * t, axis=(2, 3))
  dice = 1 - (2 * inter + 1) / (jnp.sum(p, axis=(2, 3)) + jnp.sum(t, axis=(2, 3)) + 1)
  return (jnp.sum(jnp.where(present, focal, 0.0)) / num_masks,
          jnp.sum(jnp.where(present, dice, 0.0)) / num_masks)


def _suffixes(num_predictions):
  return [""] + [f"_{i}" for i in range(num_predictions - 1)]   # final, then aux 0, 1, ...


def atm_loss_names(num_predictions):
  """The metric names atm_loss returns for outputs with `num_predictions` predictions."""
  return ["loss"] + [f"loss_{term}{suffix}" for suffix in _suffixes(num_predictions)
                     for term in ("ce", "focal", "dice")]


def atm_loss(outputs, labels, *, num_classes, no_object_weight=0.1, ce_weight=1.0,
             focal_weight=20.0, dice_weight=1.0, weights=None):
  """Total ATM loss over the final output and every `outputs['aux']` entry.

  `weights`: one factor per prediction (final first, then aux; may be traced), 1 each by
  default. Returns (loss, metrics dict) with each term reported per output (final: no
  suffix), unweighted, so a term keeps its meaning while its weight changes.
  """
  present = class_presence(labels, num_classes)
  num_masks = jnp.maximum(jnp.sum(present), 1).astype(jnp.float32)
  predictions = [outputs] + list(outputs.get("aux", []))
  weights = [1.0] * len(predictions) if weights is None else list(weights)
  if len(weights) != len(predictions):
    raise ValueError(f"{len(weights)} loss weights for {len(predictions)} predictions")
  parts = zip(_suffixes(len(predictions)), predictions, weights)
  total, metrics = 0.0, {}
  for suffix, out, weight in parts:
    ce = atm_class_loss(out["pred_logits"], present, no_object_weight)
    focal, dice = atm_mask_losses(out["pred_masks"], labels, present, num_masks)
    total = total + weight * (ce_weight * ce + focal_weight * focal + dice_weight * dice)
    metrics.update({f"loss_ce{suffix}": ce, f"loss_focal{suffix}": focal,
                    f"loss_dice{suffix}": dice})
  metrics["loss"] = total
  return total, metrics
