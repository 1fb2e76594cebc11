"""Procedural street-like scenes: the no-download default dataset.

Each image is a layout of regions (sky band, ground band, buildings, poles, blobs) painted
with class-specific *textures* (stripe frequency/orientation, checkers, noise grain) on top
of colours that overlap between classes, so a model has to use texture and context, not
colour alone. Thin bands around objects are labelled `ignore` (like CamVid's void), which
exercises ignore handling end to end. Examples are a pure function of (seed, index): the
source is random-access and deterministic, like a grain/tfds data source.
"""
import numpy as np

CLASS_NAMES = ("sky", "road", "building", "vegetation", "pole", "car")


def _texture(kind, h, w, rng):
  """A [h, w] pattern in [-1, 1] characteristic of class `kind`."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  phase = rng.uniform(0, 2 * np.pi)
  if kind == 0:    # sky: smooth vertical gradient, almost no texture
    return (yy / max(h, 1)) * 0.6 - 0.3
  if kind == 1:    # road: fine grain noise
    return rng.normal(0, 0.5, (h, w)).clip(-1, 1)
  if kind == 2:    # building: horizontal stripes (window rows)
    return np.sign(np.sin(yy * 2 * np.pi / rng.uniform(5, 8) + phase)) * 0.8
  if kind == 3:    # vegetation: blotchy checker at a random angle
    a = rng.uniform(0, np.pi)
    u, v = xx * np.cos(a) + yy * np.sin(a), -xx * np.sin(a) + yy * np.cos(a)
    return np.sign(np.sin(u / 2.5 + phase) * np.sin(v / 2.5)) * 0.7
  if kind == 4:    # pole: vertical stripes
    return np.sign(np.sin(xx * 2 * np.pi / 3 + phase)) * 0.6
  if kind == 5:    # car: diagonal stripes
    return np.sign(np.sin((xx + yy) * 2 * np.pi / 6 + phase)) * 0.8
  return np.zeros((h, w), np.float32)


# Base colours overlap on purpose (building ≈ pole, road ≈ car, vegetation ≈ sky-ish tint).
_COLOURS = np.array([[120, 160, 210], [110, 110, 110], [140, 120, 100],
                     [70, 130, 80], [150, 125, 105], [115, 105, 120]], np.float32)


class SyntheticScenes:
  """Random-access source of {'image': uint8 [H,W,3], 'label': uint8 [H,W]} examples."""

  def __init__(self, num_examples: int, image_size=(128, 128), num_classes: int = 6,
               ignore_index: int = 255, seed: int = 0, ignore_border: int = 1):
    if not 2 <= num_classes <= len(CLASS_NAMES):
      raise ValueError(f"synthetic scenes support 2..{len(CLASS_NAMES)} classes, "
                       f"got num_classes={num_classes}")
    if min(image_size) < 16:
      raise ValueError(f"synthetic image_size must be at least 16x16, got {image_size}")
    self.num_examples = num_examples
    self.image_size = tuple(image_size)
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.seed = seed
    self.ignore_border = ignore_border

  def __len__(self):
    return self.num_examples

  def _layout(self, rng):
    h, w = self.image_size
    c = self.num_classes
    label = np.zeros((h, w), np.int32)
    horizon = int(h * rng.uniform(0.3, 0.55))
    label[horizon:] = 1 % c                           # ground below the horizon
    objects = []
    for _ in range(rng.integers(1, 4)):               # buildings standing on the horizon
      x0 = rng.integers(0, w - w // 6); bw = rng.integers(w // 8, w // 3)
      top = rng.integers(h // 10, horizon)
      objects.append((2 % c, np.s_[top:horizon + h // 20, x0:x0 + bw]))
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(1, 3)):               # vegetation blobs
      cy, cx = rng.integers(horizon - h // 6, horizon + h // 8), rng.integers(0, w)
      r = rng.uniform(h / 12, h / 5)
      objects.append((3 % c, (yy - cy) ** 2 + ((xx - cx) * 0.8) ** 2 < r ** 2))
    for _ in range(rng.integers(0, 3)):               # poles
      x0 = rng.integers(0, w - 4); top = rng.integers(0, horizon)
      objects.append((4 % c, np.s_[top:min(h, horizon + h // 4), x0:x0 + max(2, w // 40)]))
    for _ in range(rng.integers(0, 3)):               # cars on the road
      y0 = rng.integers(horizon, h - h // 10); x0 = rng.integers(0, w - w // 6)
      objects.append((5 % c, np.s_[y0:y0 + h // 8, x0:x0 + rng.integers(w // 8, w // 4)]))
    border = np.zeros((h, w), bool)
    for cls, region in objects:
      before = label.copy()
      label[region] = cls
      changed = label != before
      if self.ignore_border and changed.any():
        edge = changed ^ _erode(changed, self.ignore_border)
        border |= edge
    return label, border

  def __getitem__(self, index):
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self.num_examples} examples")
    rng = np.random.default_rng((self.seed, index))
    label, border = self._layout(rng)
    h, w = label.shape
    image = np.zeros((h, w, 3), np.float32)
    for cls in np.unique(label):
      m = label == cls
      colour = _COLOURS[cls] + rng.normal(0, 18, 3)   # per-image colour jitter
      tex = _texture(cls, h, w, rng)[..., None] * rng.uniform(25, 45)
      image[m] = (colour + tex)[m]
    image += rng.normal(0, 6, image.shape)           # sensor noise
    image *= rng.uniform(0.75, 1.25)                  # global illumination
    label = label.astype(np.uint8)
    label[border] = self.ignore_index
    return {"image": np.clip(image, 0, 255).astype(np.uint8), "label": label}


def _erode(mask, r):
  """Binary erosion with a (2r+1)² square, in numpy."""
  out = mask.copy()
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      out &= np.roll(np.roll(mask, dy, 0), dx, 1)
  return out
