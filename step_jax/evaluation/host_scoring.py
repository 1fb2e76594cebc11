"""Evaluation and bulk inference with the token buckets chosen on the host
(config.eval.dispatch 'host', 'host_split'): class scores of padded images, the model run by
a dispatch.HostBuckets, as evaluator.infer computes them on device.

Whole images are one model call per batch; sliding windows run window k of every image of a
batch as one model call, added to the image's scores on the device that holds it. A pool's
calls run together (`pool_scores`, HostBuckets.run), so that the capacities are planned over
the pool. A sorting pass (`host_merges`) keeps each image's level map and token count for the
batch that runs it (`merges_of`, `per_image`), so the policy net and the merge run once.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from step_jax.evaluation import dispatch as dispatch_lib
from step_jax.evaluation import windows
from step_jax.models import segmenter


# The model runs through dispatch.HostBuckets (its programs compiled per capacity on first
# use); these small programs pad its input and take its outputs to class scores.
@functools.partial(jax.jit, static_argnums=2)
def _pixels(images, sizes, pad_value):
  return windows.fill_outside(images, sizes[:, :2], pad_value)


_predict = jax.jit(segmenter.predict_scores, static_argnums=1)


@functools.partial(jax.jit, static_argnames=("crop", "stride"))
def _window(x, sizes, k, *, crop, stride):
  """Window k (of windows.slide_windows') of each image of x [B, Hb, Wb, 3]: [B, ch, cw, 3]."""
  ys, xs, _ = windows.slide_windows(sizes[:, :2], x.shape[1:3], crop, stride)
  return windows.crop_windows(x, ys[:, k], xs[:, k], crop)


@functools.partial(jax.jit, static_argnames=("size", "crop", "stride"))
def _add_window(canvas, count, outputs, sizes, k, *, size, crop, stride):
  """(canvas, count) after adding the scores of window k (the model's outputs on it);
  canvas None: the first window, on zeros [B, *size, C]."""
  scores = segmenter.predict_scores(outputs, crop)
  if canvas is None:
    b, c = scores.shape[0], scores.shape[-1]
    canvas = jnp.zeros((b, *size, c), jnp.float32)
    count = jnp.zeros((b, *size, 1), jnp.float32)
  ys, xs, valid = windows.slide_windows(sizes[:, :2], size, crop, stride)
  return windows.add_windows(canvas, count, scores, ys[:, k], xs[:, k], valid[:, k])


_average = jax.jit(lambda canvas, count: canvas / jnp.maximum(count, 1.0))


def _model_inputs(x, sizes, s):
  """The model's input of each call host_scores makes on padded pixels x: x itself (whole),
  or window k of every image (slide), one at a time."""
  if s["mode"] == "whole":
    yield x
    return
  for k in range(windows.num_windows(x.shape[1:3], s)):
    yield _window(x, sizes, k, crop=s["crop"], stride=s["stride"])


def host_scores(host, variables, images, sizes, s, merges=None):
  """(class scores [B, Hb, Wb, C], info) of padded images uint8 [B, Hb, Wb, 3] with true
  sizes sizes[:, :2], as `infer` computes them, the model run by `host` (a
  dispatch.HostBuckets). info: the model's token maps and counts in whole mode; None for
  sliding windows, which run window k of every image as one model batch (module doc).
  merges: host_merges of these images (rows in this order), reused: the policy net and the
  merge then run once per image, not again here."""
  return next(pool_scores(host, variables, [(images, sizes, merges)], s))


def pool_scores(host, variables, batches, s):
  """host_scores of each (images, sizes, merges) of `batches`, yielded batch by batch; the
  model's calls on all of them run together (host.run), so that its capacities are planned
  over the pool."""
  xs = [_pixels(images, sizes, s["pad_value"]) for images, sizes, _ in batches]
  calls = [(window, merges[k] if merges else None)
           for x, (_, sizes, merges) in zip(xs, batches)
           for k, window in enumerate(_model_inputs(x, sizes, s))]
  results = iter(host.run(variables, calls))
  for x, (_, sizes, _) in zip(xs, batches):
    if s["mode"] == "whole":
      outputs, info = next(results)
      yield _predict(outputs, x.shape[1:3]), info
      continue
    size = tuple(x.shape[1:3])
    canvas = count = None
    for k in range(windows.num_windows(size, s)):
      canvas, count = _add_window(canvas, count, next(results)[0], sizes, k, size=size,
                                  crop=s["crop"], stride=s["stride"])
    yield _average(canvas, count), None


def host_merges(host, variables, images, sizes, s):
  """The merge of each model call host_scores makes (whole: one; slide: one per window):
  a list of (level map [B, gh, gw], tokens [B]) as numpy, every process the whole batch's.
  Only for models that share tokens before the encoder (host.model.shares_tokens)."""
  x = _pixels(images, sizes, s["pad_value"])
  return [tuple(dispatch_lib.host_value(a) for a in host.merge(variables, window))
          for window in _model_inputs(x, sizes, s)]


def merges_of(rows, merges, place):
  """host_scores' `merges` for a batch of images given by their `rows` in per-image merges
  (`merges[i]`: image i's [(level, count)] per call, from host_merges), the arrays placed
  by `place` (numpy [B, ...] → the device arrays the model takes)."""
  return [tuple(place(np.stack([merges[i][k][j] for i in rows])) for j in range(2))
          for k in range(len(merges[rows[0]]))]


def per_image(merges, n):
  """host_merges' batch-level list → one [(level, count)] per call for each of its first n
  images."""
  return [[(level[i], count[i]) for level, count in merges] for i in range(n)]
