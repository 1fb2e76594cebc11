"""The dataset registry: everything the project knows about a dataset, in one entry.

Adding a dataset is one entry in DATASETS plus its source: a tfds builder (prepared once with
`python -m step_jax.data.prepare`) described by a `Tfds` spec, or a local reader class in
sources.py. Configs (configs/common.py), the data pipeline, the preparation script and the
evaluation protocol all read this table.
"""
import dataclasses
from typing import Any, Callable, Optional

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
  exit_tau: float = 0.9           # DToP's halting confidence (the papers': .95 on COCO-Stuff)
  folder: str = ""                # a local dataset's folder name (configs.common.default_data_dir)
  local: Optional[type] = None    # its reader: cls(data_dir, split, num_classes, ignore_index)
  tfds: Optional[Tfds] = None

  def scale(self, res):
    """The RandomResize scale at crop `res` (None for crops + flips only)."""
    if self.aug_scale_px:
      return tuple(self.aug_scale_px)
    if self.aug_scale is None:
      return None
    return tuple(int(m * res) for m in self.aug_scale)


_SLIDE = dict(mode="slide", resize_short=1, max_long=4)

DATASETS = {
    "synthetic": Dataset(num_classes=6, crop=128, aug_scale=None),   # generated: data/synthetic.py
    "ade20k": Dataset(
        num_classes=150, crop=512, steps=160_000, aug_scale=(4, 1), eval=_SLIDE,  # (2048, 512)
        tfds=Tfds("ade20k", "image", "annotation", sources.ade20k_lut, ((0, 150),),
                  {"val": "validation"}, "step_jax.data.tfds_ade20k")),
    "coco_stuff10k": Dataset(
        num_classes=171, crop=512, steps=80_000, aug_scale=(4, 1), eval=_SLIDE, exit_tau=0.95,
        tfds=Tfds("coco_stuff10k", "image", "annotation", sources.coco_stuff_lut, ((0, 182),),
                  {"val": "test"}, "step_jax.data.tfds_coco_stuff10k")),
    "cityscapes": Dataset(
        num_classes=19, crop=1024, steps=90_000, aug_scale_px=(2048, 1024),  # mmseg's, any crop
        tfds=Tfds("cityscapes/semantic_segmentation", "image_left", "segmentation_label",
                  sources.cityscapes_lut, ((0, 33), (255, 255)), {"val": "validation"})),
    "camvid": Dataset(
        num_classes=11, ignore_index=11, crop=480, steps=20_000,
        aug_scale=(1, 0.75),      # (480, 360) at 480: the native size at ratio 1
        folder="camvid_segnet", local=sources.CamVid),
}


def get(name):
  """The registry entry of `name`, or a ValueError naming the known datasets."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
  return DATASETS[name]
