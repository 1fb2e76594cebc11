"""Issue 29: evaluation under each bucket dispatch (config.eval.dispatch), seconds per image
and compile seconds, one JSON line per dispatch and batch size
(step_jax.analysis.benchmark.measure_evaluation).

  python experiments/eval_dispatch.py --config=configs/step.py:method=step,variant=B/16,dataset=camvid,res=1024 \
      --config.model.policy.init_from=POLICY --exit_share=0.4 --square --batch=1 --batch=8 \
      --out=experiments/results/eval_dispatch.jsonl
  python experiments/eval_dispatch.py --workdir=workdirs/camvid_ti_step_atm_s1 --batch=8

Each dispatch compiles from nothing in a fresh Evaluator: run it without a persistent
compilation cache (no JAX_COMPILATION_CACHE_DIR), on a machine doing nothing else.
"""
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax.analysis import benchmark  # noqa: E402
from step_jax.evaluation import dispatch  # noqa: E402
from step_jax.models import variables as variables_lib  # noqa: E402
from step_jax.runtime import checkpoint  # noqa: E402
from step_jax.runtime import writers  # noqa: E402


def main(argv):
  del argv
  f = flags.FLAGS
  variables, weights = None, "given"
  if f.workdir:
    config = f.config or checkpoint.read_config(f.workdir)
    variables, step = variables_lib.restore(config, f.workdir)
    weights = f"trained ({f.workdir} step {step})"
  elif f.config is None:
    raise app.UsageError("give --config, or --workdir of a trained run")
  else:
    config = f.config
  for batch in f.batch:
    for row in benchmark.measure_evaluation(
        config, variables, dispatches=f.dispatches, bucket_ratio=f.bucket_ratio, batch=batch,
        num_images=f.num_images, square=f.square, dtype=f.dtype,
        exit_share=f.exit_share if variables is None else -1.0, weights=weights):
      writers.print_row(row, f.out)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config (path:arg); default: the "
                                  "--workdir's config.json.")
  flags.DEFINE_string("workdir", "", "A trained run: its weights (and config).")
  flags.DEFINE_multi_enum("dispatches", ["device", "host"], list(dispatch.DISPATCHES),
                          "Dispatches to measure, repeatable; the first is the mIoU reference.")
  flags.DEFINE_float("bucket_ratio", 1.05, "The host dispatches' geometric ladder.")
  flags.DEFINE_multi_integer("batch", [0], "Evaluation batch sizes, repeatable (0: the "
                             "config's).")
  flags.DEFINE_integer("num_images", 0, "The first N images of the split (0: all).")
  flags.DEFINE_bool("square", False, "Resize images and labels to the config's image_size.")
  flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "Compute dtype.")
  flags.DEFINE_float("exit_share", 0.4, "Random exit heads: halt this share per exit.")
  flags.DEFINE_string("out", "", "Append the JSON lines to this file.")
  app.run(main)
