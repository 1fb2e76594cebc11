"""The dataset registry: everything the project knows about a dataset, in one entry.

Adding a dataset is one entry in DATASETS plus its source: a tfds builder (prepared once with
`python -m step_jax.data.prepare`) described by a `Tfds` spec, or a local reader class in
sources.py. Configs (configs/common.py), the data pipeline, the preparation script, the
evaluation protocol and the label-map colours (`palette`) all read this table.
"""
import dataclasses
from typing import Any, Callable, Optional

import numpy as np

from step_jax.data import sources


@dataclasses.dataclass(frozen=True)
class Tfds:
  """How a prepared tfds dataset is read: labels stay as released, mapped through `lut`."""
  name: str                       # tfds name (with config)
  image_key: str
  label_key: str
  lut: Callable[[int], Any]       # ignore_index → uint8 [256] raw value → train id
  raw_labels: tuple               # (lo, hi) ranges of raw values a record may hold
  splits: dict                    # our split name → the tfds split name
  builder_module: str = ""        # our own builder, imported to register it ('' = tfds')


@dataclasses.dataclass(frozen=True)
class Dataset:
  num_classes: int
  ignore_index: int = 255
  crop: int = 512                 # training crop (and default resolution)
  steps: int = 4000               # the papers' training steps
  # mmseg RandomResize scale (long, short) as multiples of the crop; `aug_scale_px` fixes it
  # in pixels instead; None: crops + flips only, no resize and no photometric distortion.
  aug_scale: Optional[tuple] = (4, 1)
  aug_scale_px: Optional[tuple] = None
  # Evaluation protocol, the same for every method. None: whole images at the crop scale.
  # `slide`: SegViT/DToP's test protocol, windows of the crop over images resized to short
  # side `resize_short` × crop, long side at most `max_long` × crop.
  eval: Optional[dict] = None
  # Halting confidence of the exits: the papers' .9 (.95 on COCO-Stuff) for DToP's heads.
  exit_tau: float = 0.9
  folder: str = ""                # a local dataset's folder name (configs.common.default_data_dir)
  local: Optional[type] = None    # its reader: cls(data_dir, split, num_classes, ignore_index)
  tfds: Optional[Tfds] = None
  colours: tuple = ()             # RGB per class for label maps; () = generated (`palette`)

  def scale(self, res):
    """The RandomResize scale at crop `res` (None for crops + flips only)."""
    if self.aug_scale_px:
      return tuple(self.aug_scale_px)
    if self.aug_scale is None:
      return None
    return tuple(int(m * res) for m in self.aug_scale)


_SLIDE = dict(mode="slide", resize_short=1, max_long=4)


################################################################################
# Label-map colours.                                                           #
################################################################################
# Cityscapes' official colours of the 19 train ids (cityscapesScripts labels.py).
CITYSCAPES_COLOURS = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32))
# SegNet's CamVid colours of its 11 classes: sky, building, pole, road, pavement, tree,
# sign/symbol, fence, car, pedestrian, bicyclist (void, 11, is black).
CAMVID_COLOURS = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222),
    (128, 128, 0), (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192))
# ADE20K's standard 150-class colour table (the MIT scene-parsing benchmark's, as mmseg ships
# it), class 0 (wall) first; 450 values, three per class.
_ADE20K_RGB = """
120 120 120 180 120 120 6 230 230 80 50 50 4 200 3 120 120 80 140 140 140 204 5 255 230 230 230
4 250 7 224 5 255 235 255 7 150 5 61 120 120 70 8 255 51 255 6 82 143 255 140 204 255 4
255 51 7 204 70 3 0 102 200 61 230 250 255 6 51 11 102 255 255 7 71 255 9 224 9 7 230
220 220 220 255 9 92 112 9 255 8 255 214 7 255 224 255 184 6 10 255 71 255 41 10 7 255 255
224 255 8 102 8 255 255 61 6 255 194 7 255 122 8 0 255 20 255 8 41 255 5 153 6 51 255
235 12 255 160 150 20 0 163 255 140 140 140 250 10 15 20 255 0 31 255 0 255 31 0 255 224 0
153 255 0 0 0 255 255 71 0 0 235 255 0 173 255 31 0 255 11 200 200 255 82 0 0 255 245
0 61 255 0 255 112 0 255 133 255 0 0 255 163 0 255 102 0 194 255 0 0 143 255 51 255 0
0 82 255 0 255 41 0 255 173 10 0 255 173 255 0 0 255 153 255 92 0 255 0 255 255 0 245
255 0 102 255 173 0 255 0 20 255 184 184 0 31 255 0 255 61 0 71 255 255 0 204 0 255 194
0 255 82 0 10 255 0 112 255 51 0 255 0 194 255 0 122 255 0 255 163 255 153 0 0 255 10
255 112 0 143 255 0 82 0 255 163 255 0 255 235 0 8 184 170 133 0 255 0 255 92 184 0 255
255 0 31 0 184 255 0 214 255 255 0 112 92 255 0 0 224 255 112 224 255 70 184 160 163 0 255
153 0 255 71 255 0 255 0 163 255 204 0 255 0 143 0 255 235 133 255 0 255 0 235 245 0 255
255 0 122 255 245 0 10 190 212 214 255 0 0 204 255 20 0 255 255 255 0 0 153 255 0 41 255
0 255 204 41 0 255 41 255 0 173 0 255 0 245 255 71 0 255 122 0 255 0 255 184 0 92 255
184 255 0 0 133 255 255 214 0 25 194 194 102 255 0 92 0 255
"""
ADE20K_COLOURS = tuple(zip(*[iter(int(v) for v in _ADE20K_RGB.split())] * 3))


def generated_colours(num_classes):
  """PASCAL VOC's colour map (the bits of the class id spread over R, G and B, high bits
  first), from entry 1 on: deterministic, distinct for up to 255 classes, and never the black
  of VOC's entry 0, which label maps keep for void. COCO-Stuff uses it (its release has no
  official colours) and so does any dataset without colours of its own."""
  out = []
  for k in range(1, num_classes + 1):
    rgb, c = [0, 0, 0], k
    for bit in range(7, -1, -1):
      for ch in range(3):
        rgb[ch] |= ((c >> ch) & 1) << bit
      c >>= 3
    out.append(tuple(rgb))
  return tuple(out)

DATASETS = {
    "synthetic": Dataset(num_classes=6, crop=128, aug_scale=None),   # generated: data/synthetic.py
    "ade20k": Dataset(
        num_classes=150, crop=512, steps=160_000, aug_scale=(4, 1), eval=_SLIDE,  # (2048, 512)
        tfds=Tfds("ade20k", "image", "annotation", sources.ade20k_lut, ((0, 150),),
                  {"val": "validation"}, "step_jax.data.tfds_ade20k"),
        colours=ADE20K_COLOURS),
    "coco_stuff10k": Dataset(
        num_classes=171, crop=512, steps=80_000, aug_scale=(4, 1), eval=_SLIDE, exit_tau=0.95,
        tfds=Tfds("coco_stuff10k", "image", "annotation", sources.coco_stuff_lut, ((0, 182),),
                  {"val": "test"}, "step_jax.data.tfds_coco_stuff10k"),
        colours=generated_colours(171)),
    "cityscapes": Dataset(
        num_classes=19, crop=1024, steps=90_000, aug_scale_px=(2048, 1024),  # mmseg's, any crop
        tfds=Tfds("cityscapes/semantic_segmentation", "image_left", "segmentation_label",
                  sources.cityscapes_lut, ((0, 33), (255, 255)), {"val": "validation"}),
        colours=CITYSCAPES_COLOURS),
    "camvid": Dataset(
        num_classes=11, ignore_index=11, crop=480, steps=20_000,
        aug_scale=(1, 0.75),      # (480, 360) at 480: the native size at ratio 1
        folder="camvid_segnet", local=sources.CamVid, colours=CAMVID_COLOURS,
        # Measured with the default exit head ('segvit', its stage 0 rating the tokens with
        # (C+1)-way class probabilities) and exits at 6 and 8 of ViT-Ti/16 (issue 30): at .9
        # 16 % of the tokens halted at the evaluation scale, at .8 22.5 % (37.6 % at 1024²)
        # for 0.7 points of val mIoU against SegViT (experiments/results/camvid_ti_step68_*).
        exit_tau=0.8),
}


def get(name):
  """The registry entry of `name`, or a ValueError naming the known datasets."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
  return DATASETS[name]


def palette(name, num_classes):
  """uint8 [num_classes, 3]: the colours of dataset `name` for label maps, or generated ones
  (`generated_colours`) for a dataset without its own (synthetic, an unknown name) or a
  config whose class count differs from the dataset's."""
  colours = DATASETS[name].colours if name in DATASETS else ()
  if len(colours) != num_classes:
    colours = generated_colours(num_classes)
  return np.asarray(colours, np.uint8).reshape(num_classes, 3)
