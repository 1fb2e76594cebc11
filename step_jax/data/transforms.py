"""Training augmentations with mmseg semantics, as numpy grain transforms.

Examples are {'image': uint8 [H,W,3], 'label': uint8 [H,W]}. The pipeline applies them in
mmseg's (and SegViT's) training order:

  RandomResize → RandomCrop(cat_max_ratio) → RandomFlip → PhotoMetricDistortion → Pad

Images stay uint8 throughout: the model normalises pixels itself. Interpolation and colour
conversions reproduce OpenCV, which mmcv calls (bilinear without antialiasing for images,
floor-indexed nearest for labels, 8-bit HSV), bit for bit with cv2 4.14 on x86. Randomness
comes only from the `rng` grain passes in, so a pipeline is a pure function of (seed, index).
"""
import grain
import numpy as np


################################################################################
# Resizing (OpenCV semantics).                                                 #
################################################################################
def _linear_taps(n_in, n_out, clamp_weights):
  """Source indices and 11-bit fixed-point weights of cv2 INTER_LINEAR along one axis."""
  pos = ((np.arange(n_out) + 0.5) * (1.0 / (n_out / n_in)) - 0.5).astype(np.float32)
  i0 = np.floor(pos).astype(np.int64)
  frac = pos - i0
  if clamp_weights:   # cv2 clamps x weights at the borders; y only clamps the row index.
    frac[(i0 < 0) | (i0 >= n_in - 1)] = 0.0
  w0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int32)
  w1 = np.rint(frac * np.float32(2048)).astype(np.int32)
  return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), w0, w1


def resize_bilinear(image, size, window=(slice(None), slice(None))):
  """uint8 [H,W] or [H,W,C] → [h,w,...] as cv2.resize(INTER_LINEAR): half-pixel centres,
  no antialiasing, OpenCV's fixed-point arithmetic (bit-exact with cv2 4.14's vectorised
  path; checked against it on upscales and downscales).

  `window` (two slices of the output) computes only that part of the result, exactly:
  every output pixel has its own taps.
  """
  h, w = size
  if image.shape[:2] == (h, w):
    return image[window]
  y0, y1, b0, b1 = (t[window[0]] for t in _linear_taps(image.shape[0], h, False))
  x0, x1, a0, a1 = (t[window[1]] for t in _linear_taps(image.shape[1], w, True))
  extra = (1,) * (image.ndim - 2)
  a0, a1 = a0.reshape((1, -1) + extra), a1.reshape((1, -1) + extra)
  b0, b1 = b0.reshape((-1, 1) + extra), b1.reshape((-1, 1) + extra)
  if window[0] == slice(None):
    src = image.astype(np.int32)
  else:                                            # only the source rows the window reads
    rows = np.unique(np.concatenate([y0, y1]))
    src = image[rows].astype(np.int32)
    y0, y1 = np.searchsorted(rows, y0), np.searchsorted(rows, y1)
  hor = src[:, x0] * a0 + src[:, x1] * a1          # horizontal pass first, as cv2
  out = ((b0 * (hor[y0] >> 4)) >> 16) + ((b1 * (hor[y1] >> 4)) >> 16)
  return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


class ResizedImage:
  """An image to be bilinearly resized, computed on first use and only where indexed.

  RandomResize hands this to RandomCrop, which indexes its window: at ratio 2 that skips
  3/4 of the interpolation work (7/8 for Cityscapes) and gives identical pixels.
  `np.asarray` materialises the whole image.
  """

  def __init__(self, image, size):
    self.image, self.size = image, tuple(size)
    self.shape = self.size + image.shape[2:]

  def __getitem__(self, window):
    return resize_bilinear(self.image, self.size, window)

  def __array__(self, dtype=None, copy=None):
    out = resize_bilinear(self.image, self.size)
    return out if dtype is None else out.astype(dtype)


def resize_nearest(label, size):
  """[H,W] → [h,w] like cv2.resize(INTER_NEAREST): source index floor(i * H / h)."""
  h, w = size
  if label.shape[:2] == (h, w):
    return label
  def idx(n_in, n_out):   # cv2 multiplies by the reciprocal of the double scale.
    return np.minimum(np.floor(np.arange(n_out) * (1.0 / (n_out / n_in))).astype(np.int64),
                      n_in - 1)
  return label[idx(label.shape[0], h)][:, idx(label.shape[1], w)]


def rescale_size(hw, scale):
  """mmcv.rescale_size: the (h, w) that fits `scale`=(long, short) edges, ratio kept."""
  h, w = hw
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_keep_ratio(image, scale):
  """Deterministic mmseg `Resize(scale, keep_ratio=True)` of an image (test pipelines)."""
  return resize_bilinear(image, rescale_size(image.shape[:2], scale))


################################################################################
# Random transforms.                                                           #
################################################################################
class RandomResize(grain.transforms.RandomMap):
  """mmseg Resize(img_scale=scale, ratio_range=ratio_range, keep_ratio=True).

  A ratio r ~ U(ratio_range) scales the target edges to (int(long·r), int(short·r)); the
  image is then rescaled, aspect kept, to fit them (bilinear; label nearest). The image
  comes out as a lazy `ResizedImage`; the next transform's indexing computes it.
  """

  def __init__(self, scale, ratio_range=(0.5, 2.0)):
    self.scale, self.ratio_range = tuple(scale), tuple(ratio_range)

  def random_map(self, ex, rng: np.random.Generator):
    lo, hi = self.ratio_range
    ratio = lo + rng.random() * (hi - lo)
    target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
    size = rescale_size(ex["label"].shape, target)
    return dict(ex, image=ResizedImage(ex["image"], size),
                label=resize_nearest(ex["label"], size))


class RandomCrop(grain.transforms.RandomMap):
  """mmseg RandomCrop: a uniform crop of at most `size`, re-drawn up to 10 times while one
  class covers >= cat_max_ratio of the non-ignored pixels (or only one class is present);
  after 10 failures the 11th draw is used, as in mmseg."""

  def __init__(self, size, cat_max_ratio=0.75, ignore_index=255):
    self.size, self.cat_max_ratio, self.ignore_index = tuple(size), cat_max_ratio, ignore_index

  def _window(self, hw, rng):
    mh, mw = max(hw[0] - self.size[0], 0), max(hw[1] - self.size[1], 0)
    y, x = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
    return np.s_[y:y + self.size[0], x:x + self.size[1]]

  def random_map(self, ex, rng: np.random.Generator):
    label = ex["label"]
    win = self._window(label.shape, rng)
    if self.cat_max_ratio < 1.0:
      for _ in range(10):
        if self._accept(label[win]):
          break
        win = self._window(label.shape, rng)
    return dict(ex, image=np.asarray(ex["image"][win]), label=label[win])

  def _accept(self, label):
    """At least two classes, none covering cat_max_ratio of the non-ignored pixels."""
    counts = np.bincount(label.ravel(), minlength=256)
    counts[self.ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip of image and label together with probability `prob`."""

  def __init__(self, prob=0.5):
    self.prob = prob

  def random_map(self, ex, rng: np.random.Generator):
    if rng.random() < self.prob:
      return dict(ex, image=ex["image"][:, ::-1], label=ex["label"][:, ::-1])
    return ex


class PhotoMetricDistortion(grain.transforms.RandomMap):
  """mmseg PhotoMetricDistortion, step for step on uint8 images.

  Brightness (+U(-32, 32)), then contrast (×U(.5, 1.5)) first or last (a coin), saturation
  (S×U(.5, 1.5)) and hue (H + randint(-18, 18) on OpenCV's 0..179 hue, i.e. ±36°; numpy's
  randint excludes 18), each applied with probability 1/2. Every step truncates back to
  uint8 like mmseg's `convert`; HSV conversions follow OpenCV's 8-bit ones (checked bit
  for bit against cv2 4.14 on every colour of a dense grid, see tests).
  """

  def __init__(self, brightness_delta=32, contrast_range=(0.5, 1.5),
               saturation_range=(0.5, 1.5), hue_delta=18):
    self.brightness_delta = brightness_delta
    self.contrast_range, self.saturation_range = contrast_range, saturation_range
    self.hue_delta = hue_delta

  def random_map(self, ex, rng: np.random.Generator):
    img = np.ascontiguousarray(ex["image"])
    if rng.integers(2):
      img = _convert(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first:
      img = self._contrast(img, rng)
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
      img = hsv_to_rgb(hsv)
    if rng.integers(2):
      hsv = rgb_to_hsv(img)
      shift = rng.integers(-self.hue_delta, self.hue_delta)
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + shift) % 180
      img = hsv_to_rgb(hsv)
    if not contrast_first:
      img = self._contrast(img, rng)
    return dict(ex, image=img)

  def _contrast(self, img, rng):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*self.contrast_range))
    return img


def _convert(img, alpha=1.0, beta=0.0):
  """mmseg `convert`: float affine map, clip, truncate to uint8."""
  return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _table(num, den_fn):
  t = np.zeros(256, np.int32)
  t[1:] = np.round(num / den_fn(np.arange(1, 256, dtype=np.float64)))
  return t


_SDIV = _table(255 << 12, lambda v: v)          # OpenCV RGB2HSV_b fixed-point tables
_HDIV = _table(180 << 12, lambda d: 6 * d)


def rgb_to_hsv(img):
  """uint8 RGB → uint8 HSV (H in 0..179), OpenCV's 8-bit COLOR_RGB2HSV bit for bit."""
  rgb = img.astype(np.int32)
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  v = rgb.max(-1)
  diff = v - rgb.min(-1)
  s = (diff * _SDIV[v] + (1 << 11)) >> 12
  h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * _HDIV[diff] + (1 << 11)) >> 12
  h = np.where(h < 0, h + 180, h)
  return np.stack([h, s, v], -1).astype(np.uint8)


def _hsv_factors():
  """float32 [180, 256, 3]: (r, g, b) = v · factor[h, s], as OpenCV 4's vectorised 8-bit
  HSV2RGB computes it: sector tables of (1, 1-s, 1-s·f, 1-s·(1-f)) with fused
  multiply-adds (emulated in float64, rounded once)."""
  one = np.float32(1)
  h = np.arange(180, dtype=np.float32)[:, None] * np.float32(6.0 / 180.0)
  s = np.arange(256, dtype=np.float32)[None, :] * np.float32(1 / 255.0)
  sector = np.trunc(h)
  f = h - sector
  fma = lambda a, b: (a.astype(np.float64) * b + 1).astype(np.float32)   # a·b + 1
  tab = np.stack(np.broadcast_arrays(one, one - s, fma(-s, f), fma(-s, one - f)), -1)
  # Which of the four is (r, g, b) in each 60° sector (OpenCV's sector_data, reversed).
  order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
  return np.take_along_axis(tab, order[np.broadcast_to(sector.astype(np.int64), tab.shape[:2])],
                            axis=-1)


_HSV_FACTORS = _hsv_factors()


def hsv_to_rgb(hsv):
  """uint8 HSV (H in 0..179) → uint8 RGB like OpenCV 4's vectorised 8-bit COLOR_HSV2RGB.

  Bit for bit with cv2 4.14's SIMD path (float32, fused multiply-adds, truncation). cv2's
  scalar tail (width mod the SIMD width) rounds instead, so cv2 itself differs by one
  level between machines there.
  """
  v = hsv[..., 2].astype(np.float32) * np.float32(1 / 255.0)
  rgb = v[..., None] * _HSV_FACTORS[hsv[..., 0], hsv[..., 1]]
  return np.clip(np.trunc(rgb * np.float32(255)), 0, 255).astype(np.uint8)


################################################################################
# Deterministic transforms.                                                    #
################################################################################
class Pad(grain.transforms.Map):
  """Pads bottom/right to `size`: image with 0, label with the ignore value (mmseg Pad)."""

  def __init__(self, size, ignore_index=255):
    self.size, self.ignore_index = tuple(size), ignore_index

  def map(self, ex):
    image, label = ex["image"], ex["label"]
    h, w = label.shape
    if h > self.size[0] or w > self.size[1]:
      raise ValueError(f"Pad: example is {h}x{w}, larger than the pad size {self.size}; "
                       "crop first")
    image = np.asarray(image)
    if (h, w) == self.size:
      return dict(ex, image=image)
    pad = ((0, self.size[0] - h), (0, self.size[1] - w))
    return dict(ex, image=np.pad(image, pad + ((0, 0),)),
                label=np.pad(label, pad, constant_values=self.ignore_index))
