"""python -m step_jax.cli.train --config=configs/<file>.py:<args> --workdir=DIR

Trains (sharded over all devices), checkpoints to DIR/checkpoints, evaluates, and writes
DIR/{config.json, metrics.jsonl, eval_<split>.json} (step_jax.training.train). Running the
same command again resumes from the latest checkpoint in DIR. Override any key with
--config.a.b=value, e.g. --config.sharding.fsdp=True, --config.model.dtype=bfloat16,
--config.nan_policy=skip. Evaluate a checkpoint on another split with
`python -m step_jax.cli.evaluate`.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from step_jax.cli import common
from step_jax.training import train


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


def run():
  """`python -m step_jax.cli.train` and the `step-train` console script."""
  config_flags.DEFINE_config_file("config", None, "Config file (path:arg).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for metrics and checkpoints.")
  flags.mark_flags_as_required(["config", "workdir"])
  common.list_flags_in_help(__name__)
  common.quiet_by_default()
  common.run_command(main)


if __name__ == "__main__":
  run()
