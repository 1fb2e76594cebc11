"""Layer 2, data. Datasets: random-access sources of {'image': uint8 [H,W,3], 'label': uint8 [H,W]}.

`config.data.name` picks the dataset (the registry: datasets.py):
  synthetic      procedural scenes, no download (data.num_train / data.num_eval)
  camvid         SegNet CamVid folder; data.data_dir = folder holding CamVid/
  ade20k         ADE20K-150 (tfds_ade20k.py), splits train / val (= validation)
  coco_stuff10k  COCO-Stuff 10k, 171 classes (tfds_coco_stuff10k.py), splits train / val (= test)
  cityscapes     tfds cityscapes/semantic_segmentation, 19 train ids, splits train / val
For the tfds datasets data.data_dir is the tfds data_dir ('' = tfds' default); prepare them
once with `python -m step_jax.data.prepare` (see sources.py and the builders).
"""
import zlib

from step_jax.data import datasets
from step_jax.data import sources
from step_jax.data import synthetic


def get_source(data_cfg, split, num_classes, ignore_index):
  """The random-access source for `split` of `data_cfg.name`.

  Raises:
    FileNotFoundError: the data directory, split file or prepared dataset is missing (the
      message names the path and `--config.data.data_dir`).
    ValueError: num_classes or ignore_index do not fit the dataset.
  """
  name = data_cfg.name
  if name == "synthetic":
    n = data_cfg.num_train if split == data_cfg.train_split else data_cfg.num_eval
    # Distinct seeds per split, so validation scenes are never training scenes.
    return synthetic.SyntheticScenes(n, tuple(data_cfg.image_size), num_classes,
                                     ignore_index, seed=zlib.crc32(split.encode()) + data_cfg.seed)
  spec = datasets.get(name)
  if num_classes != spec.num_classes:
    raise ValueError(f"{name} has {spec.num_classes} classes, config says "
                     f"num_classes={num_classes}")
  if not num_classes <= ignore_index <= 255:
    raise ValueError(f"{name}: ignore_index={ignore_index} must be a uint8 value outside "
                     f"the classes 0..{num_classes - 1}")
  if spec.local is not None:
    return spec.local(data_cfg.data_dir, split, num_classes, ignore_index)
  return sources.tfds_source(name, spec.tfds, split, data_cfg.data_dir, ignore_index)
