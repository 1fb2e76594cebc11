"""Decoding files into arrays, with a clear BadRecordError for what cannot be used; shared
by the sources and the tfds builders."""
import os
import re

import numpy as np
from PIL import Image


class BadRecordError(ValueError):
  """One example cannot be used: undecodable file, wrong format, or labels out of range.

  The training pipeline's `data.bad_records` policy ('fail' | 'skip') acts on these (and on
  OSError, e.g. a file that vanished); everything else is a bug and always raises.
  """


# PIL modes that hold more than 8 bits per channel: converting them to RGB would silently
# clip (16-bit) or truncate (float) the pixel values.
_WIDE_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
# Raw modes of 16 bits per channel that PIL decodes into an 8-bit mode, keeping the high byte
# (48-bit RGB PNG or TIFF: 'RGB;16B'); 'BGR;16' (16 bits per pixel, 5-6-5) is not one.
_WIDE_RAW = re.compile(r";16[BLN]")


def _wide_raw(im):
  """True when PIL would read 16-bit channels of `im` (not yet loaded) into 8 bits."""
  for tile in getattr(im, "tile", None) or ():
    args = tile[3] if isinstance(tile[3], tuple) else (tile[3],)
    if any(isinstance(a, str) and _WIDE_RAW.search(a) for a in args):
      return True
  return False


def read_image(path):
  """uint8 [H,W,3] RGB from an image file; grey and palette images become RGB.

  Raises BadRecordError naming the file for what cannot be decoded (empty, corrupt,
  truncated, not an image), for 16-bit or float images and for images with transparent pixels.
  """
  if os.path.getsize(path) == 0:   # PIL's message for it says only "cannot identify"
    raise BadRecordError(f"cannot decode image file {path}: it is empty (0 bytes)")
  try:
    with Image.open(path) as im:
      wide = _wide_raw(im)   # before load(), which drops the tile descriptors
      im.load()   # decode now: a truncated file fails here, not later in a worker
      if im.mode in _WIDE_MODES:
        raise BadRecordError(f"image file {path} has PIL mode {im.mode!r} (16-bit or float "
                             "pixels); expected 8-bit RGB or grey: convert it to 8 bits first")
      if wide:
        raise BadRecordError(f"image file {path} has 16-bit channels ({im.mode}, 48/64-bit "
                             "colour); expected 8-bit RGB or grey: convert it to 8 bits first")
      if "A" in im.getbands() and np.asarray(im.getchannel("A")).min() < 255:
        raise BadRecordError(f"image file {path} ({im.mode}) has transparent pixels; "
                             "expected RGB: flatten it onto a background first")
      return np.asarray(im.convert("RGB"))
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError, ValueError) as e:   # PIL: UnidentifiedImageError, truncated…
    if isinstance(e, BadRecordError):
      raise
    raise BadRecordError(f"cannot decode image file {path}: {e}") from e


def read_label(path):
  """uint8 [H,W] class ids from a single-channel ('L' or 'P') label PNG."""
  try:
    with Image.open(path) as im:
      if im.mode not in ("L", "P"):
        raise BadRecordError(f"label file {path} has mode {im.mode!r}; expected 8-bit "
                             "single-channel class ids (mode L or P), not colours or 16 bits")
      return np.asarray(im)
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError) as e:
    raise BadRecordError(f"cannot decode label file {path}: {e}") from e


def check_label_values(label, valid, what, allowed):
  """Raises BadRecordError naming `what` when `label` holds a value outside `valid` (a
  bool [256] table); `allowed` describes the valid values for the message."""
  bad = ~valid[label]
  if bad.any():
    values = np.unique(label[bad])
    raise BadRecordError(f"{what} has label values {values[:8].tolist()} "
                         f"({int(bad.sum())} pixels) outside {allowed}")


def image_for_tfds(path):
  """What a builder hands tfds for an image: the file itself when it is an RGB JPEG (bytes
  kept as released), else the image converted to RGB (a few ADE/COCO JPEGs are grey)."""
  try:
    with Image.open(path) as im:
      if im.mode == "RGB" and im.format == "JPEG":
        return path
      return im.convert("RGB")
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError, ValueError) as e:
    raise BadRecordError(f"cannot decode image file {path}: {e}") from e


def manual_dir_or_none(dl_manager):
  """tfds' manual dir if it exists and is not empty (tfds raises otherwise)."""
  try:
    return dl_manager.manual_dir
  except (AssertionError, ValueError):
    return None
