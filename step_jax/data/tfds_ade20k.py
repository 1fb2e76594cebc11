"""TFDS builder for ADE20K-150 as the benchmark defines it (ADEChallengeData2016).

Why our own builder: tfds' `scene_parse150` downloads the Places Challenge 2017
*instance* masks, not the 150-class semantic labels that ADE20K mIoU is reported on.
This one stores the official release unchanged:

  ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
  ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   (single channel,
      0 = "other" (ignored), 1..150 = classes)

Labels are kept as released (0..150); `sources.py` maps them to 0..149 with 255 = ignore.
Splits: train (20,210) and validation (2,000).

Preparing needs TensorFlow (`pip install -r requirements-tf.txt`) and must write
array_record so that `tfds.data_source` + grain read it without TF:

  python -m step_jax.data.prepare --dataset=ade20k --data_dir=$TFDS_DATA_DIR \
      [--manual_dir=DIR]   # DIR holds ADEChallengeData2016/ or ADEChallengeData2016.zip
"""
import os

import tensorflow_datasets as tfds

from step_jax.data import decode

URL = "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip"
ROOT = "ADEChallengeData2016"
_SPLITS = {"train": "training", "validation": "validation"}


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K scene parsing, 150 classes (MIT Scene Parsing Benchmark, ADEChallengeData2016)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "ADEChallengeData2016 as released; labels 0..150."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
  Optional. Put {ROOT}.zip, or the folder {ROOT}/ extracted from it, in the manual
  directory; otherwise the zip is downloaded from {URL}.
  """

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "annotation": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "annotation"),
        homepage="http://sceneparsing.csail.mit.edu/",
        citation=_CITATION)

  def _split_generators(self, dl_manager):
    root = find_root(dl_manager)
    return {split: self._generate_examples(root, folder) for split, folder in _SPLITS.items()}

  def _generate_examples(self, root, folder):
    """Yields (file stem, example) for images/<folder>/*.jpg and their annotation PNGs."""
    image_dir = os.path.join(root, "images", folder)
    label_dir = os.path.join(root, "annotations", folder)
    for d in (image_dir, label_dir):
      if not os.path.isdir(d):
        raise FileNotFoundError(f"ADE20K folder {d} is missing; is {root} a complete "
                                f"{ROOT} folder?")
    for name in sorted(os.listdir(image_dir)):
      stem, ext = os.path.splitext(name)
      if ext.lower() != ".jpg":
        continue
      label = os.path.join(label_dir, stem + ".png")
      if not os.path.exists(label):
        raise FileNotFoundError(f"ADE20K annotation {label} is missing for image {name}")
      yield stem, {"image": decode.image_for_tfds(os.path.join(image_dir, name)),
                   "annotation": label, "file_name": name}


def find_root(dl_manager):
  """The extracted ADEChallengeData2016 folder: from the manual dir if there, else download."""
  manual = decode.manual_dir_or_none(dl_manager)
  if manual is not None:
    if os.path.isdir(os.path.join(manual, ROOT)):
      return os.path.join(manual, ROOT)
    if os.path.isdir(os.path.join(manual, "images")):   # manual_dir is the folder itself
      return os.fspath(manual)
    if os.path.exists(os.path.join(manual, ROOT + ".zip")):
      return os.path.join(dl_manager.extract(os.path.join(manual, ROOT + ".zip")), ROOT)
  return os.path.join(dl_manager.download_and_extract(URL), ROOT)


_CITATION = """\
@inproceedings{zhou2017scene,
  title={Scene Parsing through ADE20K Dataset},
  author={Zhou, Bolei and Zhao, Hang and Puig, Xavier and Fidler, Sanja and Barriuso,
          Adela and Torralba, Antonio},
  booktitle={CVPR}, year={2017}}
"""
