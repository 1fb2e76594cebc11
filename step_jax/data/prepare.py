"""Prepares a real dataset once as tfds array_record files, readable later without TF.

  pip install -r requirements-tf.txt        # building tfds datasets needs TensorFlow
  python -m step_jax.data.prepare --dataset=ade20k --data_dir=$TFDS_DATA_DIR \
      [--manual_dir=DIR]

ade20k and coco_stuff10k download their official zips unless DIR already holds the zip or
its extracted folder; cityscapes needs leftImg8bit_trainvaltest.zip and
gtFine_trainvaltest.zip in DIR (a login is needed to download them). Training then reads
`--config.data.data_dir=$TFDS_DATA_DIR` (CamVid and the synthetic scenes need no
preparation).
"""
from absl import app
from absl import flags

from step_jax.data import datasets
from step_jax.data import sources

TFDS_DATASETS = [n for n, d in datasets.DATASETS.items() if d.tfds]


def prepare(name, data_dir=None, manual_dir=None):
  """Downloads (if needed) and writes `name` as array_record under data_dir; returns it."""
  spec = datasets.get(name).tfds
  if spec is None:
    raise ValueError(f"{name} is not a tfds dataset; prepare one of "
                     f"{sorted(TFDS_DATASETS)}")
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ImportError("preparing a tfds dataset needs TensorFlow: "
                      "pip install -r requirements-tf.txt") from e
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = sources.tfds_builder(spec, data_dir)
  # array_record, not tfds' default TFRecord: tfds.data_source (random access) needs it.
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def main(argv):
  del argv
  f = flags.FLAGS
  builder = prepare(f.dataset, f.data_dir, f.manual_dir)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f"prepared {builder.name} {builder.version} at {builder.data_dir}: {splits}")


if __name__ == "__main__":
  # Flags only when run as a script, so importing `prepare` defines none.
  flags.DEFINE_enum("dataset", None, sorted(TFDS_DATASETS), "dataset to prepare")
  flags.DEFINE_string("data_dir", None, "tfds data_dir (default: tfds' own)")
  flags.DEFINE_string("manual_dir", None, "folder with manually downloaded files")
  flags.mark_flag_as_required("dataset")
  app.run(main)
