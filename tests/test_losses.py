"""ATM loss vs a loop-based numpy transcription of SegViT's ATMLoss/SetCriterion."""
import jax
import jax.numpy as jnp
import numpy as np

from numerics import assert_close  # tests/numerics.py

from step_jax.training import losses
from step_jax.models import resize

# One compiled program per shape (eagerly, each of the loss's ops compiles on its own).
atm_loss = jax.jit(losses.atm_loss, static_argnames="num_classes")


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def reference_atm(pred_logits, pred_masks, labels, num_classes, ignore, eos=0.1):
  """Per-image loops exactly as the reference: unique classes, masks, weighted CE."""
  b, q, k = pred_logits.shape
  h, w = labels.shape[1:]
  up = np.asarray(resize.resize_2d(jnp.asarray(pred_masks), (h, w), "bilinear", axes=(-2, -1)))
  num_masks = max(sum(len(set(np.unique(l)) - {ignore}) for l in labels), 1)
  ce_num = ce_den = focal = dice = 0.0
  for i in range(b):
    classes = [c for c in np.unique(labels[i]) if c != ignore]
    target = np.full(q, k - 1)
    target[classes] = 0 if k == 2 else np.array(classes)
    logp = pred_logits[i] - np.log(np.exp(pred_logits[i]).sum(-1, keepdims=True))
    wts = np.where(target == k - 1, eos, 1.0)
    ce_num += np.sum(-logp[np.arange(q), target] * wts)
    ce_den += wts.sum()
    for c in classes:
      x, t = up[i, c].ravel(), (labels[i] == c).ravel().astype(np.float64)
      p = _sigmoid(x)
      bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
      p_t = p * t + (1 - p) * (1 - t)
      focal += np.mean((0.25 * t + 0.75 * (1 - t)) * bce * (1 - p_t) ** 2)
      dice += 1 - (2 * np.sum(p * t) + 1) / (p.sum() + t.sum() + 1)
  return ce_num / ce_den, focal / num_masks, dice / num_masks


def _case(seed, k_extra=1, c=6, ignore=255):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, (2, 16, 24))            # only classes 0..2 present ...
  labels[0, :4] = 5                                    # ... plus class 5 in image 0
  labels[1, :, :3] = ignore                            # and ignore pixels
  logits = rng.normal(size=(2, c, c + k_extra)).astype(np.float32)
  masks = rng.normal(size=(2, c, 4, 6)).astype(np.float32) * 3
  return logits, masks, labels.astype(np.int32)


def test_matches_reference_segvit_head():
  logits, masks, labels = _case(0)
  out = dict(pred_logits=logits, pred_masks=masks)
  _, m = atm_loss(out, jnp.asarray(labels), num_classes=6)
  ce, focal, dice = reference_atm(logits, masks, labels, 6, 255)
  assert_close(m["loss_ce"], ce, 1e-5)
  assert_close(m["loss_focal"], focal, 1e-4)
  assert_close(m["loss_dice"], dice, 1e-4)
  assert_close(m["loss"], ce + 20 * focal + dice, 1e-4)


def test_matches_reference_binary_head():
  logits, masks, labels = _case(1, k_extra=2 - 6)
  assert logits.shape[-1] == 2
  _, m = atm_loss(dict(pred_logits=logits, pred_masks=masks), jnp.asarray(labels),
                         num_classes=6)
  ce, focal, dice = reference_atm(logits, masks, labels, 6, 255)
  assert_close(m["loss_ce"], ce, 1e-5)
  assert_close(m["loss_focal"], focal, 1e-4)


def test_aux_outputs_each_get_the_same_terms():
  logits, masks, labels = _case(2)
  out = dict(pred_logits=logits, pred_masks=masks,
             aux=[dict(pred_logits=logits, pred_masks=masks)] * 2)
  total, m = atm_loss(out, jnp.asarray(labels), num_classes=6)
  single, _ = atm_loss(dict(pred_logits=logits, pred_masks=masks), jnp.asarray(labels),
                              num_classes=6)
  assert_close(total, 3 * single, 1e-5)
  assert {"loss_ce_0", "loss_focal_1", "loss_dice_1"} <= set(m)


def test_ignore_pixels_are_negatives_and_absent_classes_get_no_mask_loss():
  logits, masks, labels = _case(3)
  base = atm_loss(dict(pred_logits=logits, pred_masks=masks), jnp.asarray(labels),
                         num_classes=6)[1]
  # Mask logits of an absent class (4) do not matter for focal/dice ...
  m2 = masks.copy(); m2[:, 4] += 7
  alt = atm_loss(dict(pred_logits=logits, pred_masks=m2), jnp.asarray(labels),
                        num_classes=6)[1]
  assert_close(alt["loss_focal"], base["loss_focal"], 1e-6)
  # ... but raising every logit where pixels are ignored raises the loss (they are negatives).
  m3 = masks.copy(); m3[1, :, :, 0] += 5
  worse = atm_loss(dict(pred_logits=logits, pred_masks=m3), jnp.asarray(labels),
                          num_classes=6)[1]
  assert worse["loss_focal"] > base["loss_focal"]


def test_all_ignore_batch_is_finite_and_differentiable():
  logits, masks, _ = _case(4)
  labels = jnp.full((2, 16, 24), 255, jnp.int32)
  f = lambda mk: atm_loss(dict(pred_logits=logits, pred_masks=mk), labels,
                                 num_classes=6)[0]
  v, g = jax.jit(jax.value_and_grad(f))(jnp.asarray(masks))
  assert np.isfinite(v) and np.all(np.isfinite(g))
