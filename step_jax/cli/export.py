"""python -m step_jax.cli.export: a trained model for use without the training code
(step_jax.interop.export).

  python -m step_jax.cli.export --workdir=DIR --out=OUT [--formats=jax,msgpack,safetensors,tf]
"""
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from step_jax.cli import common
from step_jax.interop import export


def main(argv, taken=("", [])):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  config = common.config_from(f.config, f.workdir, taken)
  image_size = tuple(int(s) for s in f.image_size.split(",")) if f.image_size else None
  meta = export.export_workdir(config, f.workdir, f.out, step=f.step,
                               formats=tuple(x for x in f.formats.split(",") if x),
                               platforms=tuple(f.platforms.split(",")),
                               image_size=image_size, batch=f.batch or None)
  logging.info("export: %s", meta)
  print(f"exported {f.workdir} → {f.out}: {', '.join(sorted(os.listdir(f.out)))}", flush=True)


def run():
  """`python -m step_jax.cli.export` and the `step-export` console script."""
  config_flags.DEFINE_config_file("config", None, "Config (path:arg, or a .json); default: "
                                  "<workdir>/config.json (--config.a.b=value overrides "
                                  "apply to either).")
  flags.DEFINE_string("workdir", None, "Training workdir to export.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("formats", "jax,msgpack",
                      f"Comma-separated subset of {','.join(export.FORMATS)}: jax = serialized "
                      "jax.export artifact, msgpack/safetensors = parameter files, tf = "
                      "SavedModel via jax2tf (needs TensorFlow).")
  flags.DEFINE_string("platforms", "cpu,cuda", "Platforms the jax artifact is lowered for.")
  flags.DEFINE_string("image_size", "", "H,W of the exported input (default: the config's "
                      "data.image_size).")
  flags.DEFINE_integer("batch", 0, "Fixed batch size; 0 = symbolic (any batch).")
  flags.mark_flags_as_required(["workdir", "out"])
  common.list_flags_in_help(__name__)
  common.run_command(main, take_config=True)


if __name__ == "__main__":
  run()
