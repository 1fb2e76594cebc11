"""Bulk inference's files: the inputs (a folder of images, a glob, an image, a video read frame
by frame) and the outputs (indexed PNG label maps written atomically, what is finished)."""
import collections
import glob
import os

# PyAV reads videos: FFmpeg's own decoders in-process, from wheels that bundle FFmpeg (no
# system ffmpeg, no subprocess pipe as imageio-ffmpeg uses), frame by frame with exact frame
# indices; maintained by the PyAV project and what imageio's own 'pyav' plugin wraps.
import av
import jax
import numpy as np
from PIL import Image

from step_jax.data import decode

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pnm")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")


################################################################################
# Inputs.                                                                      #
################################################################################
def _magic(path):
  return any(c in path for c in "*?[")


def _named(paths, base):
  """[(name, path)]: each path relative to `base` without its extension, or with it where two
  files would otherwise share a name (a.jpg and a.png)."""
  rel = [os.path.relpath(p, base) for p in paths]
  stems = [os.path.splitext(r)[0] for r in rel]
  count = collections.Counter(stems)
  return [(r if count[s] > 1 else s, p) for r, s, p in zip(rel, stems, paths)]


def find_inputs(spec, exclude=""):
  """(images [(name, path)], video path or ''): a folder's image files (recursively, by
  extension), a glob's files (all of them: a non-image among them is reported, not passed
  over), one image file, or one video file (by extension). Files under `exclude` (the output
  folder) are left out."""
  spec = os.fspath(spec)
  if os.path.isfile(spec):
    if spec.lower().endswith(VIDEO_EXTENSIONS):
      return [], spec
    return _named([spec], os.path.dirname(spec)), ""
  if os.path.isdir(spec):
    paths = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files
             if f.lower().endswith(IMAGE_EXTENSIONS)]
    base = spec
  elif _magic(spec):
    paths = [p for p in glob.glob(spec, recursive=True) if os.path.isfile(p)]
    fixed = []
    for part in spec.split(os.sep)[:-1]:
      if _magic(part):
        break
      fixed.append(part)
    base = os.sep.join(fixed) or "."
  else:
    raise FileNotFoundError(f"input {spec} does not exist: give a folder of images, a glob "
                            "('frames/*.jpg'), an image or a video file")
  if exclude:
    out = os.path.abspath(exclude) + os.sep
    paths = [p for p in paths if not os.path.abspath(p).startswith(out)]
  if not paths:
    raise FileNotFoundError(f"input {spec}: no image files found (a folder is searched for "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
  return _named(sorted(paths), base), ""


def process_share():
  """(index, count): this process segments files[index::count] (frames of a video alike)."""
  return jax.process_index(), jax.process_count()


def video_frames(path, keep):
  """Yields (frame index, uint8 [H, W, 3] or the BadRecordError that ends the video) for the
  frames i of video `path` where keep(i); the others are decoded (the stream is sequential)
  but not converted. The index is -1 for a video that cannot be opened."""
  i, opened = -1, False
  try:
    with av.open(path) as container:
      opened = True
      if not container.streams.video:
        raise decode.BadRecordError(f"video {path} has no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"   # frame-parallel decoding
      for i, frame in enumerate(container.decode(stream)):
        if keep(i):
          yield i, frame.to_ndarray(format="rgb24")
  except decode.BadRecordError as e:
    yield -1, e
  except (av.FFmpegError, OSError, ValueError) as e:
    if not opened:
      yield -1, decode.BadRecordError(f"video {path} cannot be opened: {e}")
    else:
      yield i + 1, decode.BadRecordError(f"video {path}: frame {i + 1} and later cannot be "
                                         f"decoded: {e}")


def video_length(path):
  """Frames the container states (0 when it does not say or cannot be read)."""
  try:
    with av.open(path) as container:
      return int(container.streams.video[0].frames) if container.streams.video else 0
  except (av.FFmpegError, OSError, ValueError):
    return 0


################################################################################
# Outputs.                                                                     #
################################################################################
def label_image(pred, colours):
  """Class ids [H, W] as an indexed (mode 'P') PIL image with `colours` [C, 3] as palette."""
  pred = np.ascontiguousarray(pred, np.uint8)
  image = Image.frombytes("P", (pred.shape[1], pred.shape[0]), pred.tobytes())
  image.putpalette(np.asarray(colours, np.uint8).ravel().tolist())
  return image


def write_png(image, path):
  """Writes a PIL image to `path` through a temporary file in the same folder: a kill leaves
  either the whole file or none (the next write replaces the leftover temporary)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  image.save(tmp, format="PNG")
  os.replace(tmp, path)


def output_paths(output, name, save):
  return {kind: os.path.join(output, kind, name + ".png") for kind in save}


def finished(output, name, save):
  """True when every requested output of image `name` exists."""
  return all(os.path.isfile(p) for p in output_paths(output, name, save).values())
