"""Issue 16: compile time and bucket waste of the capacity-bucket designs, one JSON line each.

  python experiments/bucket_compile.py --config=configs/step.py:method=dcts,variant=Ti/16,dataset=camvid,res=1024 \
      --config.model.policy.init_from=POLICY --num_images=2 --out=experiments/results/bucket_compile.jsonl

Designs: the 1/8-step ladder with every block unrolled (before), the same with the blocks as
one lax.scan (`model.scan_blocks`), and a geometric ladder (ratio 1.1, 26 buckets) with the
scan. Each: compile seconds of the batch-1 forward, tokens, useful / executed GFLOPs (per image,
each image in its own bucket) and ms/image.
"""
import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax.analysis import benchmark  # noqa: E402
from step_jax.evaluation import tokens  # noqa: E402
from step_jax.models import segmenter  # noqa: E402

DESIGNS = {
    "eighths, unrolled": dict(ladder=segmenter.BUCKETS, scan=False),
    "eighths, scan": dict(ladder=segmenter.BUCKETS, scan=True),
    "geometric 1.1, scan": dict(ladder=segmenter.geometric_buckets(1.1), scan=True),
}


def main(argv):
  del argv
  f = flags.FLAGS
  images = tokens.load_images(f.config, f.images, f.num_images)
  for name in f.designs:
    d = DESIGNS[name]
    cfg = f.config.copy_and_resolve_references()
    cfg.model.update(buckets=d["ladder"], exit_buckets=d["ladder"], scan_blocks=d["scan"])
    r = benchmark.measure(cfg, images=images, reps=f.reps, warmup=1, exit_share=f.exit_share)
    row = dict(design=name, buckets=len(d["ladder"]), scan_blocks=d["scan"],
               compile_s=round(r["compile_s"], 1), tokens=r["mean_tokens_per_stage"],
               capacity=r["mean_capacity_per_stage"], gflops_useful=round(r["gflops_useful"], 2),
               gflops_executed=round(r["gflops_executed"], 2),
               executed_over_useful=r["executed_over_useful"],
               ms_per_image=round(r["ms_per_image_median"], 1), method=r["method"],
               variant=r["variant"], image_size=r["image_size"], device=r["device"])
    print(json.dumps(row), flush=True)
    if f.out:
      with open(f.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config (path:arg).")
  flags.DEFINE_string("images", "", "Folder of images; default: the config's eval split.")
  flags.DEFINE_integer("num_images", 2, "Images for the token statistics.")
  flags.DEFINE_integer("reps", 2, "Timed calls.")
  flags.DEFINE_float("exit_share", 0.4, "Random exit heads: halt this share per exit.")
  flags.DEFINE_multi_string("designs", list(DESIGNS), "Designs to measure.")
  flags.DEFINE_string("out", "", "Append the JSON lines to this file.")
  app.run(main)
