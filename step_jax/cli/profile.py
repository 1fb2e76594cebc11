"""python -m step_jax.cli.profile: per-layer wall time and GFLOPs (paper figures 9-10;
step_jax.analysis.profile).

  python -m step_jax.cli.profile --config=configs/step.py:method=step,variant=B/16,res=1024,exits=8 \
      --out=DIR [--images=DIR] [--workdir=DIR] [--batch=1] [--reps=5]
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from step_jax.analysis import profile
from step_jax.cli import common


def main(argv):
  del argv
  f = flags.FLAGS
  print(profile.run_profile(f.config, f.out, f.workdir, images=f.images,
                            num_images=f.num_images, exit_share=f.exit_share, dtype=f.dtype,
                            batch=f.batch, reps=f.reps, warmup=f.warmup,
                            config_name=config_flags.get_config_filename(f["config"])))


def run():
  """`python -m step_jax.cli.profile` and the `step-profile` console script."""
  config_flags.DEFINE_config_file("config", None, "Config (path:arg).")
  flags.DEFINE_string("workdir", None, "Trained run (default: random weights).")
  flags.DEFINE_string("images", "", "Folder of images; default: the config's eval split.")
  flags.DEFINE_integer("num_images", 4, "Images to average over.")
  flags.DEFINE_float("exit_share", 0.4, "Random weights: calibrate exit thresholds to halt "
                     "this share of active tokens per exit.")
  flags.DEFINE_integer("batch", 1, "Images per timed call.")
  flags.DEFINE_integer("reps", 5, "Timed calls per piece (median).")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
  flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "Compute dtype.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.mark_flags_as_required(["config", "out"])
  common.list_flags_in_help(__name__)
  common.run_command(main)


if __name__ == "__main__":
  run()
