"""Random-access sources for the real datasets and their label mappings.

Every source yields {'image': uint8 [H,W,3], 'label': uint8 [H,W]} with the dataset's one
ignore value and supports `__len__`/`__getitem__`, so grain reads it by index (and pickles
it into worker processes). Prepared tfds datasets keep labels exactly as released (ADE
0..150, COCO-Stuff ids 0..182, Cityscapes labelIds 0..33); the mapping to train ids happens
here, through one 256-entry lookup table per dataset, so it lives in one place and is tested.
"""
import importlib
import os

import numpy as np

from step_jax.data.decode import BadRecordError
from step_jax.data.decode import check_label_values
from step_jax.data.decode import read_image
from step_jax.data.decode import read_label

# COCO-Stuff ids 1..182 that no annotation uses (COCO thing ids dropped from the release).
COCO_STUFF_UNUSED = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)

# Cityscapes labelId → trainId (cityscapesScripts `labels.py`); every other id is ignored.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
                        23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


################################################################################
# Label lookup tables: raw uint8 value → train id (uint8), ignore where unused.  #
################################################################################
def ade20k_lut(ignore_index=255):
  """0 ('other') → ignore, 1..150 → 0..149 (mmseg `reduce_zero_label`)."""
  lut = np.full(256, ignore_index, np.uint8)
  lut[1:151] = np.arange(150)
  return lut


def coco_stuff_lut(ignore_index=255):
  """COCO-Stuff ids → 171 train ids: the rank of the id among the used ids 1..182.

  Equals mmseg's coco_stuff10k converter (`clsID_to_trID`) + `reduce_zero_label=True`:
  0 (unlabeled) → ignore. Unused ids also go to ignore (mmseg would leave them unmapped;
  they never occur in the release).
  """
  lut = np.full(256, ignore_index, np.uint8)
  used = [i for i in range(1, 183) if i not in COCO_STUFF_UNUSED]
  lut[used] = np.arange(len(used))
  return lut


def cityscapes_lut(ignore_index=255):
  lut = np.full(256, ignore_index, np.uint8)
  for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
    lut[label_id] = train_id
  return lut


def identity_lut(num_classes, ignore_index):
  """Values 0..num_classes-1 kept, everything else → ignore (CamVid: 11 = void)."""
  lut = np.full(256, ignore_index, np.uint8)
  lut[:num_classes] = np.arange(num_classes)
  return lut


################################################################################
# Sources.                                                                     #
################################################################################
class LabelMapped:
  """Picks image/label features from raw records and maps labels through a lookup table.

  Wraps a tfds data source (or any random-access sequence of dicts). Grey images become
  RGB; labels may come as [H,W] or [H,W,1]; image and label sizes must agree.
  """

  def __init__(self, source, lut, image_key="image", label_key="annotation", name="",
               valid=None):
    self.source, self.lut, self.name = source, np.asarray(lut, np.uint8), name
    self.image_key, self.label_key = image_key, label_key
    # Raw label values the release can contain (bool [256]); others mean a corrupt record.
    self.valid = np.ones(256, bool) if valid is None else np.asarray(valid, bool)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    where = f"{self.name} example {index}"
    try:
      ex = self.source[index]
    except (OSError, SyntaxError, ValueError) as e:   # a corrupt record's image bytes
      raise BadRecordError(f"{where}: cannot decode: {e}") from e
    image = np.asarray(ex[self.image_key])
    raw = np.asarray(ex[self.label_key])
    if image.ndim == 2 or image.shape[-1] == 1:
      image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    if raw.ndim == 3:
      raw = raw[..., 0]
    if image.shape[:2] != raw.shape or image.shape[-1] != 3:
      raise BadRecordError(f"{where}: image {image.shape} and label {raw.shape} do not match")
    if image.dtype != np.uint8 or raw.dtype != np.uint8:
      raise BadRecordError(f"{where}: image {image.dtype} and label {raw.dtype}; expected "
                           "uint8 for both")
    check_label_values(raw, self.valid, where, "the raw label ids of the release")
    return {"image": image, "label": self.lut[raw]}


class CamVid:
  """CamVid in the SegNet layout: <root>/<split>.txt naming <split>/*.png, <split>annot/*.png.

  `data_dir` is the folder holding CamVid/ (or CamVid/ itself). Lines of the split file
  look like "/SegNet/CamVid/train/x.png /SegNet/CamVid/trainannot/x.png"; each path is
  resolved by its last two components (folder/file) under the root, so any split name
  works, including lists that mix folders. Without a split file, <split>/ and
  <split>annot/ are paired by file name. Labels 0..10 are classes, 11 is void (ignore).
  """

  def __init__(self, data_dir, split, num_classes=11, ignore_index=11):
    self.root = camvid_root(data_dir)
    self.split = split
    self.pairs = _camvid_pairs(self.root, split)
    self.lut = identity_lut(num_classes, ignore_index)
    self.valid = np.zeros(256, bool)   # classes and void; anything else is a broken label
    self.valid[:num_classes] = self.valid[ignore_index] = True
    self.allowed = f"the classes 0..{num_classes - 1} and void {ignore_index}"

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, index):
    image_path, label_path = self.pairs[index]
    image, label = read_image(image_path), read_label(label_path)
    if image.shape[:2] != label.shape:
      raise BadRecordError(f"CamVid {image_path} is {image.shape[:2]} but its label "
                           f"{label_path} is {label.shape}")
    check_label_values(label, self.valid, f"CamVid label file {label_path}", self.allowed)
    return {"image": image, "label": self.lut[label]}


def camvid_root(data_dir):
  if not data_dir:
    raise FileNotFoundError("camvid needs the folder holding CamVid/: set "
                            "--config.data.data_dir=/path/to/camvid_segnet, or "
                            "STEP_JAX_DATA=/path/to/data (holding camvid_segnet/)")
  for root in (os.path.join(data_dir, "CamVid"), data_dir):
    if os.path.isdir(root):
      return root
  raise FileNotFoundError(f"CamVid data directory {data_dir} does not exist; set "
                          "--config.data.data_dir=<folder holding CamVid/> or "
                          "STEP_JAX_DATA=<folder holding camvid_segnet/>")


def _camvid_pairs(root, split):
  list_path = os.path.join(root, split + ".txt")
  if os.path.exists(list_path):
    pairs = []
    with open(list_path) as f:
      for n, line in enumerate(f, 1):
        parts = line.split()
        if not parts:
          continue
        if len(parts) != 2:
          raise ValueError(f"{list_path}:{n}: expected '<image> <label>', got {line!r}")
        pairs.append(tuple(os.path.join(root, *p.replace("\\", "/").split("/")[-2:])
                           for p in parts))
  else:
    image_dir, label_dir = os.path.join(root, split), os.path.join(root, split + "annot")
    if not (os.path.isdir(image_dir) and os.path.isdir(label_dir)):
      raise FileNotFoundError(
          f"CamVid split {split!r}: neither {list_path} nor {image_dir}/ + {label_dir}/ "
          "exist; check --config.data.data_dir and the split name")
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(".png"))
    pairs = [(os.path.join(image_dir, n), os.path.join(label_dir, n)) for n in names]
  if not pairs:
    raise FileNotFoundError(f"CamVid split {split!r} under {root} lists no images")
  for pair in pairs:
    for path in pair:
      if not os.path.exists(path):
        raise FileNotFoundError(f"CamVid split {split!r}: file {path} is missing")
  return pairs


################################################################################
# Prepared tfds datasets.                                                      #
################################################################################
def raw_label_table(ranges):
  valid = np.zeros(256, bool)
  for lo, hi in ranges:
    valid[lo:hi + 1] = True
  return valid


def tfds_builder(spec, data_dir):
  """The tfds builder of a `datasets.Tfds` spec, our own builder module (ADE20K, COCO-Stuff-10k)
  imported first to register it. tfds is imported here: only the real datasets need it, and
  it is slow to import."""
  import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top
  if spec.builder_module:
    importlib.import_module(spec.builder_module)   # registers the builder
  return tfds.builder(spec.name, data_dir=data_dir or None)


def tfds_source(name, spec, split, data_dir, ignore_index=255):
  """A LabelMapped tfds data source (array_record) of dataset `name`, read without TF."""
  split = spec.splits.get(split, split)
  builder = tfds_builder(spec, data_dir)
  try:
    raw = builder.as_data_source(split=split)
  except Exception as e:  # tfds' errors for an unprepared dataset are cryptic.
    if builder.is_prepared():
      raise
    raise FileNotFoundError(
        f"{name}: no prepared tfds dataset at {builder.data_dir}. Set "
        f"--config.data.data_dir=<tfds data_dir> (now {data_dir or 'tfds default'}) or "
        f"prepare it once (needs requirements-tf.txt): python -m step_jax.data.prepare "
        f"--dataset={name} --data_dir=<tfds data_dir> [--manual_dir=<downloads>]") from e
  return LabelMapped(raw, spec.lut(ignore_index), spec.image_key, spec.label_key,
                     name=f"{name}/{split}", valid=raw_label_table(spec.raw_labels))
