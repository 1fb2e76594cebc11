"""Resizing as separable interpolation matrices: exact PyTorch semantics, static shapes.

`F.interpolate(..., align_corners=False)` without antialias is what SegViT/mmseg use for
position-embedding resampling (bicubic, a=-0.75) and for upsampling mask logits (bilinear).
`jax.image.resize` differs (Keys a=-0.5 cubic, antialias on downsampling), so we build the
matrices ourselves; a resize is then two small matmuls, which XLA runs well on any backend.
"""
import functools

import jax.numpy as jnp
import numpy as np


def _cubic(t, a=-0.75):
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


@functools.lru_cache(maxsize=None)
def interp_matrix(n_in: int, n_out: int, method: str) -> np.ndarray:
  """[n_out, n_in] matrix M so that `M @ x` resizes x along one axis.

  method: 'bilinear' | 'bicubic' (PyTorch, align_corners=False, no antialias), or 'area'
  (average over the covered input interval; equals PyTorch 'area'/adaptive pooling when
  n_in is a multiple of n_out).
  """
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  if method == "area":
    for o in range(n_out):
      lo, hi = o * scale, (o + 1) * scale
      for i in range(int(np.floor(lo)), int(np.ceil(hi))):
        m[o, i] = min(hi, i + 1) - max(lo, i)
    return (m / m.sum(1, keepdims=True)).astype(np.float32)
  src = (np.arange(n_out) + 0.5) * scale - 0.5
  if method == "bilinear":
    src = np.maximum(src, 0.0)  # PyTorch clamps negative source coordinates for linear modes
    i0 = np.floor(src).astype(int)
    t = src - i0
    for o in range(n_out):
      m[o, min(i0[o], n_in - 1)] += 1 - t[o]
      m[o, min(i0[o] + 1, n_in - 1)] += t[o]
  elif method == "bicubic":
    i0 = np.floor(src).astype(int)
    t = src - i0
    for o in range(n_out):
      for k in range(-1, 3):
        m[o, np.clip(i0[o] + k, 0, n_in - 1)] += _cubic(k - t[o])
  else:
    raise ValueError(f"unknown resize method {method!r}; use 'bilinear', 'bicubic' or 'area'")
  return m.astype(np.float32)


def resize_2d(x, out_hw, method: str, axes=(-3, -2)):
  """Resizes the two spatial `axes` of x (default: [..., H, W, C]) to `out_hw`."""
  ah, aw = (a % x.ndim for a in axes)
  h, w = x.shape[ah], x.shape[aw]
  if (h, w) == tuple(out_hw):
    return x
  mh = jnp.asarray(interp_matrix(h, out_hw[0], method), x.dtype)
  mw = jnp.asarray(interp_matrix(w, out_hw[1], method), x.dtype)
  x = jnp.moveaxis(jnp.tensordot(mh, x, axes=(1, ah)), 0, ah)
  return jnp.moveaxis(jnp.tensordot(mw, x, axes=(1, aw)), 0, aw)
