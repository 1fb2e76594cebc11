"""Segmentation metrics from a confusion matrix (mmseg conventions).

The confusion matrix is accumulated on device (`confusion_matrix` is jittable and ignores
padding through `valid`); mIoU is averaged over classes that occur in the ground truth or
the prediction (classes with union 0 are NaN and excluded, as mmseg's nanmean).
"""
import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred, labels, num_classes, ignore_index, valid=None):
  """[C, C] int32 counts, rows = ground truth, cols = prediction.

  pred, labels: [B, H, W] ints; valid: optional [B] bool (False for padded examples).
  """
  keep = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  if valid is not None:
    keep &= valid[:, None, None]
  idx = jnp.where(keep, labels * num_classes + pred, num_classes * num_classes)
  counts = jnp.bincount(idx.reshape(-1), length=num_classes * num_classes + 1)
  return counts[:-1].reshape(num_classes, num_classes).astype(jnp.int32)


def summarize(conf, class_names=None):
  """mIoU (fraction), per-class IoU, pixel accuracy and mean accuracy from a confusion matrix."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  gt, pr = conf.sum(1), conf.sum(0)
  union = gt + pr - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
    acc = np.where(gt > 0, tp / gt, np.nan)
  names = class_names or [str(i) for i in range(len(tp))]
  return dict(miou=float(np.nanmean(iou)) if np.any(union > 0) else 0.0,
              pixel_acc=float(tp.sum() / max(conf.sum(), 1)),
              mean_acc=float(np.nanmean(acc)) if np.any(gt > 0) else 0.0,
              per_class_iou={n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)})
