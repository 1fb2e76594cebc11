"""Issue 28: ALGM's per-image merge counts (ours) against the reference's batch minimum, on
the same trained weights: val mIoU of each, evaluated at one batch size, and the tokens and
GFLOPs (useful: the tokens each image keeps; executed: the capacity its batch ran in) at that
batch size, one JSON line per mode.

  python experiments/algm_batch_min.py --workdir=workdirs/camvid_ti_algm_s0 --batch=8 \
      --out=experiments/results/camvid_ti_algm_batch_min/rows.jsonl

With the batch minimum every image of a batch merges as few tokens as the batch's image that
merges fewest (the reference's rule): at batch 1 the two modes are one.
"""
import os
import sys

from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax.evaluation import evaluator  # noqa: E402
from step_jax.evaluation import tokens  # noqa: E402
from step_jax.models import variables as variables_lib  # noqa: E402
from step_jax.runtime import checkpoint  # noqa: E402
from step_jax.runtime import sharding  # noqa: E402
from step_jax.runtime import writers  # noqa: E402


def measure(workdir, batch, num_images=0, step=None):
  """[row per mode]: per-image counts, then the batch minimum."""
  rows = []
  base = checkpoint.read_config(workdir)
  if base.model.get("merge", "") not in ("algm", "dcts_algm"):
    raise ValueError(f"{workdir} is not an ALGM run (model.merge={base.model.get('merge')!r})")
  for batch_min in (False, True):
    config = base.copy_and_resolve_references()
    config.model.algm_batch_min = batch_min
    config.eval.batch_size = batch
    model = variables_lib.create_model(config)
    variables, at = variables_lib.restore(config, workdir, step=step)
    mesh = sharding.make_mesh(config)
    metrics = evaluator.Evaluator(config, model, mesh)(
        jax.device_put(variables, sharding.replicated(mesh)))
    images = tokens.load_images(config, "", num_images or 10**6)
    stats = tokens.token_stats(config, model, variables, images, batch=batch)
    rows.append(dict(workdir=workdir, step=at, algm_batch_min=batch_min, batch=batch,
                     miou=metrics["miou"], images=len(images),
                     **{k: stats[k] for k in ("mean_tokens_per_stage", "mean_capacity_per_stage",
                                              "gflops_useful", "gflops_executed",
                                              "executed_over_useful")}))
  rows[1]["miou_delta_vs_per_image"] = rows[1]["miou"] - rows[0]["miou"]
  rows[1]["gflops_executed_vs_per_image"] = (rows[1]["gflops_executed"]
                                             / rows[0]["gflops_executed"])
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  for row in measure(f.workdir, f.batch, f.num_images, f.step):
    writers.print_row(row, f.out)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A trained method=algm (or dcts_algm) run.")
  flags.DEFINE_integer("batch", 8, "Evaluation batch size (the batch minimum's batch).")
  flags.DEFINE_integer("num_images", 0, "Images for the token statistics (0: the split's).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out", "", "Append the JSON lines to this file.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
