"""Datasets: random-access sources of {'image': uint8 [H,W,3], 'label': uint8 [H,W]}."""
import zlib

from step_jax.data import synthetic


def get_source(data_cfg, split, num_classes, ignore_index):
  """The source for `split` of `data_cfg.name`."""
  if data_cfg.name == "synthetic":
    n = data_cfg.num_train if split == data_cfg.train_split else data_cfg.num_eval
    # Distinct seeds per split, so validation scenes are never training scenes.
    return synthetic.SyntheticScenes(n, tuple(data_cfg.image_size), num_classes,
                                     ignore_index, seed=zlib.crc32(split.encode()) + data_cfg.seed)
  raise NotImplementedError(
      f"dataset {data_cfg.name!r} has no pipeline yet (tracked in the data/training issue); "
      "use data.name='synthetic'")
