"""python -m step_jax.cli.evaluate: evaluates a training workdir's checkpoint and writes
<workdir>/eval_<split>.json (step_jax.evaluation.evaluator.evaluate_checkpoint).

  python -m step_jax.cli.evaluate --workdir=DIR [--step=N] [--config.data.split=test]

Without --config the workdir's config.json is used; --config.a.b=value overrides apply to
either.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from step_jax.cli import common
from step_jax.evaluation import evaluator


def main(argv, taken=("", [])):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  config = common.config_from(flags.FLAGS.config, workdir, taken)
  evaluator.evaluate_checkpoint(config, workdir, step=flags.FLAGS.step)


def run():
  """`python -m step_jax.cli.evaluate` and the `step-eval` console script."""
  config_flags.DEFINE_config_file("config", None, "Config file (path:arg, or a .json); "
                                  "default: <workdir>/config.json (--config.a.b=value "
                                  "overrides apply to either).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.mark_flags_as_required(["workdir"])
  common.list_flags_in_help(__name__)
  common.quiet_by_default()
  common.run_command(main, take_config=True)


if __name__ == "__main__":
  run()
