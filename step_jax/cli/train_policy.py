"""python -m step_jax.cli.train_policy: trains the dCTS policy net on window-purity targets
(step_jax.training.train_policy).

  python -m step_jax.cli.train_policy --config=configs/policy.py:dataset=camvid,size=cpu \
      --workdir=workdirs/policy_camvid
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from step_jax.cli import common
from step_jax.training import train_policy

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train_policy.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def run():
  """`python -m step_jax.cli.train_policy` and the `step-train-policy` console script."""
  config_flags.DEFINE_config_file("config", None, "Policy config (path:arg).")
  flags.DEFINE_string("workdir", None, "Output directory.")
  flags.mark_flags_as_required(["config", "workdir"])
  common.list_flags_in_help(__name__)
  common.run_command(main)


if __name__ == "__main__":
  run()
