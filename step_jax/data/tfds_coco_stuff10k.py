"""TFDS builder for COCO-Stuff 10k (v1.1), the 171-class benchmark of SegViT/DToP/STEP.

The official cocostuff-10k-v1.1.zip holds

  images/<name>.jpg
  annotations/<name>.mat      key 'S': uint16 [H,W], 0 = unlabeled, 1..182 = COCO-Stuff ids
  imageLists/train.txt, test.txt   one <name> per line (9,000 / 1,000)

The builder stores 'S' unchanged as a single-channel PNG (ids fit in uint8); `sources.py`
maps the 171 used ids to train ids 0..170 (0 and unused ids → 255), which equals mmseg's
`tools/dataset_converters/coco_stuff10k.py` followed by `reduce_zero_label=True`.
Splits: train and test (mmseg evaluates on test).

Preparing needs TensorFlow (`pip install -r requirements-tf.txt`):

  python -m step_jax.data.prepare --dataset=coco_stuff10k --data_dir=$TFDS_DATA_DIR \
      [--manual_dir=DIR]   # DIR holds the zip or its extracted contents
"""
import io
import os

import numpy as np
from PIL import Image
import scipy.io
import tensorflow_datasets as tfds

from step_jax.data import decode

URL = "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/cocostuff-10k-v1.1.zip"
ZIP = "cocostuff-10k-v1.1.zip"


class CocoStuff10k(tfds.core.GeneratorBasedBuilder):
  """COCO-Stuff 10k v1.1: 9k train / 1k test images with 182-id stuff+thing labels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.1.0": "cocostuff-10k-v1.1 as released; labels 0..182."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Optional. Put {ZIP}, or its extracted contents (images/, annotations/, imageLists/),
  in the manual directory; otherwise the zip is downloaded from {URL}.
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "annotation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "annotation"),
        homepage="https://github.com/nightrome/cocostuff10k",
        citation=_CITATION)

  def _split_generators(self, dl_manager):
    root = find_root(dl_manager)
    return {split: self._generate_examples(root, split) for split in ("train", "test")}

  def _generate_examples(self, root, split):
    """Yields (name, example) for the names listed in imageLists/<split>.txt."""
    names = read_list(os.path.join(root, "imageLists", split + ".txt"))
    for name in names:
      yield name, {
          "image": decode.image_for_tfds(os.path.join(root, "images", name + ".jpg")),
          "annotation": encode_png(read_mat_labels(os.path.join(root, "annotations",
                                                                name + ".mat"))),
          "file_name": name + ".jpg"}


def read_list(path):
  if not os.path.exists(path):
    raise FileNotFoundError(f"COCO-Stuff 10k image list {path} is missing")
  with open(path) as f:
    return [line.strip() for line in f if line.strip()]


def read_mat_labels(path):
  """'S' from a COCO-Stuff 10k .mat file as uint8 [H,W] (ids 0..182)."""
  try:
    s = scipy.io.loadmat(path)["S"]
  except FileNotFoundError:
    raise
  except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:  # v7.3: HDF5
    raise ValueError(f"cannot read labels 'S' from {path}: {e!r}") from e
  if s.ndim != 2 or s.min() < 0 or s.max() > 182:
    raise ValueError(f"{path}: 'S' must be [H,W] ids in 0..182, got shape {s.shape} "
                     f"range {s.min()}..{s.max()}")
  return s.astype(np.uint8)


def encode_png(label):
  # PIL, not tf.image: keeps the example generator runnable (and testable) without TF.
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(label)).save(buf, format="PNG")  # uint8 [H,W]: mode L
  return buf.getvalue()


def find_root(dl_manager):
  """The folder holding imageLists/: from the manual dir if there, else download."""
  manual = decode.manual_dir_or_none(dl_manager)
  if manual is not None:
    root = _root_under(manual)
    if root:
      return root
    if os.path.exists(os.path.join(manual, ZIP)):
      return _root_under(dl_manager.extract(os.path.join(manual, ZIP))) or os.fspath(manual)
  extracted = dl_manager.download_and_extract(URL)
  root = _root_under(extracted)
  if not root:
    raise FileNotFoundError(f"no imageLists/ folder in the extracted {ZIP} at {extracted}")
  return root


def _root_under(path):
  """`path` or its single sub-folder that contains imageLists/ (zips differ in nesting)."""
  path = os.fspath(path)
  if os.path.isdir(os.path.join(path, "imageLists")):
    return path
  for sub in sorted(os.listdir(path)) if os.path.isdir(path) else []:
    if os.path.isdir(os.path.join(path, sub, "imageLists")):
      return os.path.join(path, sub)
  return None


_CITATION = """\
@inproceedings{caesar2018coco,
  title={COCO-Stuff: Thing and Stuff Classes in Context},
  author={Caesar, Holger and Uijlings, Jasper and Ferrari, Vittorio},
  booktitle={CVPR}, year={2018}}
"""
