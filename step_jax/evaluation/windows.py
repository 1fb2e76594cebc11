"""The sliding-window protocol (mmseg `slide_inference`) as array programs: windows placed
from each image's true size inside a padded bucket, cropped, and their scores added back.
Shared by on-device inference (evaluator.infer, one `lax.scan`) and the host dispatch
(host_scoring, window k of every image as one model batch)."""
import math

import jax
import jax.numpy as jnp


def num_windows(size, s):
  """Windows of the sliding protocol `s` (evaluator.settings) over a bucket of `size`
  (every image of it)."""
  return math.prod((n - c) // st + 1 for n, c, st in zip(size, s["crop"], s["stride"]))


def fill_outside(images, hw, value):
  """Pixels outside each image's true [h, w] → `value` (float32 [B, H, W, 3])."""
  _, hb, wb, _ = images.shape
  inside = ((jnp.arange(hb)[None, :, None] < hw[:, 0, None, None])
            & (jnp.arange(wb)[None, None, :] < hw[:, 1, None, None]))
  return jnp.where(inside[..., None], images.astype(jnp.float32),
                   jnp.asarray(value, jnp.float32))


def slide_windows(hw, bucket_hw, crop, stride):
  """Window origins (y [B, n], x [B, n]) and validity [B, n] for true sizes hw [B, 2].

  The static window count n is the bucket's; an image uses the first
  `(max(h - crop + stride - 1, 0) // stride + 1)` rows of windows (mmseg `slide_inference`),
  each clipped to end inside the image: y1 = max(min(i·stride + crop, h) - crop, 0).
  """
  axes = []
  for a in range(2):
    n = (bucket_hw[a] - crop[a]) // stride[a] + 1
    i = jnp.arange(n)[None, :]
    size = hw[:, a, None]
    grids = jnp.maximum(size - crop[a] + stride[a] - 1, 0) // stride[a] + 1
    start = jnp.maximum(jnp.minimum(i * stride[a] + crop[a], size) - crop[a], 0)
    axes.append((start, i < grids))
  (y, vy), (x, vx) = axes
  ny, nx = y.shape[1], x.shape[1]
  yy = jnp.repeat(y, nx, axis=1)
  xx = jnp.tile(x, (1, ny))
  valid = jnp.repeat(vy, nx, axis=1) & jnp.tile(vx, (1, ny))
  return yy, xx, valid


def crop_windows(x, y, x0, crop):
  """One window per image: x [B, H, W, 3] at origins y, x0 [B] → [B, ch, cw, 3]."""
  return jax.vmap(lambda img, yi, xi: jax.lax.dynamic_slice(img, (yi, xi, 0), crop + (3,)))(
      x, y, x0)


def add_windows(canvas, count, scores, y, x0, ok):
  """Adds one window's scores [B, ch, cw, C] per image (where ok [B]) into canvas
  [B, H, W, C] at y, x0 [B], and 1 into the window count [B, H, W, 1]."""
  scores = scores * ok[:, None, None, None].astype(scores.dtype)
  ch, cw = scores.shape[1:3]

  def add(c, n, s, yi, xi, oki):
    c = jax.lax.dynamic_update_slice(
        c, jax.lax.dynamic_slice(c, (yi, xi, 0), s.shape) + s, (yi, xi, 0))
    n = jax.lax.dynamic_update_slice(
        n, jax.lax.dynamic_slice(n, (yi, xi, 0), (ch, cw, 1)) + oki.astype(n.dtype),
        (yi, xi, 0))
    return c, n
  return jax.vmap(add)(canvas, count, scores, y, x0, ok)
