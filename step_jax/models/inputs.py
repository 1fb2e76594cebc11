"""Checks of the model's input pixels: shape, dtype and finiteness, with messages that say what
to change. `check_images` runs at trace time inside the model (shape and dtype) and on concrete
arrays (NaN/Inf); step_jax.api.check_pixels adds the value checks a host array allows."""
import jax
import jax.numpy as jnp
import numpy as np

_PIXEL_DTYPES = (np.uint8, np.float16, jnp.bfloat16, np.float32, np.float64)


def check_image_shape(shape, expected="images must be [B, H, W, 3] RGB"):
  """Raises ValueError unless `shape` is [B, H, W, 3] with no empty side; the message starts
  with `expected` and adds a hint for the common mistakes."""
  shape = tuple(shape)
  if len(shape) != 4 or shape[-1] != 3:
    hint = {1: "; grayscale? repeat it to 3 channels", 4: "; RGBA? drop the alpha channel",
            }.get(shape[-1] if len(shape) in (3, 4) else 0, "")
    if len(shape) == 3 and shape[-1] == 3:
      hint = "; a single image? add the batch axis (images[None])"
    raise ValueError(f"{expected}, got shape {shape}{hint}")
  if 0 in shape:
    raise ValueError(f"empty input: images have shape {shape} (every side must be >= 1)")


def check_finite(images):
  """Raises ValueError when the concrete float array `images` holds NaN or Inf."""
  n = int(images.size - np.count_nonzero(np.isfinite(np.asarray(images, np.float32))))
  if n:
    raise ValueError(f"images contain {n} NaN/Inf values (of {images.size})")


def check_images(images):
  """Raises ValueError unless `images` are RGB pixels [B, H, W, 3] in [0, 255], uint8 or float.

  Shape and dtype are checked always (at trace time under jit); NaN/Inf only for concrete
  arrays, since a jitted program cannot raise: under jit, call this on the host batch.
  (step_jax.api.check_pixels adds the value checks a host array allows.)
  """
  check_image_shape(images.shape)
  dtype = images.dtype
  if dtype not in _PIXEL_DTYPES:
    hint = "; 16-bit? scale to 8 bits first (e.g. x >> 8)" if dtype.itemsize == 2 else ""
    raise ValueError(f"images have dtype {dtype}; expected uint8 or float pixels in "
                     f"[0, 255]{hint}")
  if jnp.issubdtype(dtype, jnp.floating) and not isinstance(images, jax.core.Tracer):
    check_finite(images)
