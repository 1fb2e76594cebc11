"""python -m step_jax.cli.flops: GFLOPs of a config as one JSON line
(step_jax.analysis.benchmark.flops_report).

  python -m step_jax.cli.flops --config=configs/step.py:method=segvit,variant=B/16,res=512
  python -m step_jax.cli.flops --workdir=DIR    # a trained dCTS/STEP run: tokens from images
"""
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from step_jax.analysis import benchmark
from step_jax.cli import common


def main(argv, taken=("", [])):
  del argv
  f = flags.FLAGS
  config = common.config_from(f.config, f.workdir, taken)
  report = benchmark.flops_report(config, f.workdir, images=f.images,
                                  num_images=f.num_images, exit_share=f.exit_share)
  report["config"] = common.config_name(f, taken)
  print(json.dumps(report))


def run():
  """`python -m step_jax.cli.flops` and the `step-flops` console script."""
  config_flags.DEFINE_config_file("config", None, "path/to/config.py[:args]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Trained run whose weights decide the tokens.")
  flags.DEFINE_string("images", "", "Folder of images for token-dependent configs "
                      "(default: the config's eval split).")
  flags.DEFINE_integer("num_images", 16, "Images to average over (token-dependent configs).")
  flags.DEFINE_float("exit_share", -1.0, "Without trained exit heads: calibrate the exit "
                     "thresholds to halt this share of active tokens.")
  common.list_flags_in_help(__name__)
  common.run_command(main, take_config=True)


if __name__ == "__main__":
  run()
