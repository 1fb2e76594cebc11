import jax.numpy as jnp
import numpy as np

from numerics import assert_close  # tests/numerics.py

from step_jax.evaluation import metrics


def numpy_miou(pred, label, c, ignore):
  """Plain reference: per-class intersection/union over all non-ignored pixels."""
  keep = label != ignore
  ious, correct = [], (pred == label)[keep].sum() / keep.sum()
  for k in range(c):
    inter = ((pred == k) & (label == k) & keep).sum()
    union = (((pred == k) | (label == k)) & keep).sum()
    if union:
      ious.append(inter / union)
  return np.mean(ious), correct


def test_confusion_matrix_and_summary_match_numpy():
  rng = np.random.default_rng(0)
  pred = rng.integers(0, 5, (3, 20, 30))
  label = rng.integers(0, 5, (3, 20, 30)); label[label == 4] = 255   # class 4 never in GT
  label[0, :5] = 255
  conf = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 5, 255)
  assert int(conf.sum()) == int((label != 255).sum())
  out = metrics.summarize(conf)
  miou, acc = numpy_miou(pred, label, 5, 255)
  assert_close(out["miou"], miou, 1e-6)
  assert_close(out["pixel_acc"], acc, 1e-6)
  assert out["per_class_iou"]["4"] == 0.0   # predicted but never present: IoU 0, counted


def test_padded_examples_do_not_count():
  rng = np.random.default_rng(1)
  pred = rng.integers(0, 3, (4, 8, 8)); label = rng.integers(0, 3, (4, 8, 8))
  valid = np.array([True, True, False, False])
  conf = metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 3, 255,
                                  jnp.asarray(valid))
  ref = metrics.confusion_matrix(jnp.asarray(pred[:2]), jnp.asarray(label[:2]), 3, 255)
  np.testing.assert_array_equal(conf, ref)


def test_class_absent_everywhere_is_excluded():
  label = np.zeros((1, 4, 4), int); pred = np.zeros((1, 4, 4), int)
  out = metrics.summarize(metrics.confusion_matrix(jnp.asarray(pred), jnp.asarray(label), 3, 255))
  assert out["miou"] == 1.0 and out["per_class_iou"]["2"] is None
