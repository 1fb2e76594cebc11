"""Issue 16: bucket waste and compile time of the capacity-bucket designs, one JSON line per
design and batch size.

  python experiments/bucket_compile.py --config=configs/step.py:method=dcts,variant=Ti/16,dataset=camvid,res=1024 \
      --config.model.policy.init_from=POLICY --num_images=16 --batch=1 --batch=8 \
      --out=experiments/results/bucket_waste.jsonl
  python experiments/bucket_compile.py --workdir=workdirs/camvid_ti_step_atm_s1 --res=1024 ...

Designs (`--designs`, repeatable):
  eighths, device            the 1/8-step ladder chosen on device by lax.switch, every block
                             unrolled, batches in input order (before)
  eighths, device, scan      the same with the blocks as one lax.scan (model.scan_blocks)
  eighths, device, grouped   the same ladder, batches of similar token counts
  geometric 1.1, scan        ratio-1.1 ladder on device with the scan (26 buckets compiled)
  geometric 1.05, host       ratio-1.05 ladder (48 buckets) chosen on the host, each
                             capacity compiled on first use, batches grouped (after)
  geometric 1.05, host, split exits
                             the same, each image alone after the first exit, in the
                             capacity its own active tokens need
Each: compile seconds and programs compiled, tokens, capacity, useful / executed GFLOPs
(each image in its batch's buckets) and ms/image (mean over every batch of the images, each
timed once).

  python experiments/bucket_compile.py --table=ROWS.jsonl   # markdown, with efficiency

Efficiency against the file's SegViT row: (its ms / this ms) / (its executed GFLOPs / these),
1.0 when wall-clock falls exactly as the executed GFLOPs do.
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
from step_jax.models import capacity  # noqa: E402
from step_jax.models import segmenter  # noqa: E402
from step_jax.models import variables as variables_lib  # noqa: E402
from step_jax.runtime import checkpoint  # noqa: E402
from step_jax.runtime import writers  # noqa: E402

DESIGNS = {
    "eighths, device": dict(ladder=segmenter.BUCKETS, dispatch="device", scan=False,
                            group=False),
    "eighths, device, scan": dict(ladder=segmenter.BUCKETS, dispatch="device", scan=True,
                                  group=False),
    "eighths, device, grouped": dict(ladder=segmenter.BUCKETS, dispatch="device", scan=False,
                                     group=True),
    "geometric 1.1, scan": dict(ladder=capacity.geometric_buckets(1.1), dispatch="device",
                                scan=True, group=False),
    "geometric 1.05, host": dict(ladder=capacity.geometric_buckets(1.05), dispatch="host",
                                 scan=False, group=True),
    "geometric 1.05, host, split exits": dict(ladder=capacity.geometric_buckets(1.05),
                                              dispatch="host_split", scan=False, group=True),
}


def table(rows):
  """Markdown lines of bucket_compile rows, efficiency against the SegViT row."""
  ref = next((r for r in rows if r["method"] == "segvit"), None)
  out = ["| method | design | batch | programs | compile s | tokens (per stage) | capacity | "
         "GFLOPs useful / executed | executed / useful | ms/image | efficiency |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    eff = "–"
    if ref and r is not ref:
      speedup = ref["ms_per_image_mean"] / r["ms_per_image_mean"]
      eff = f"{speedup / (ref['gflops_executed'] / r['gflops_executed']):.2f}"
    out.append(f"| {r['method']} | {r['design']} | {r['batch']} | {r['programs']} | "
               f"{r['compile_s']} | {' / '.join(f'{t:.0f}' for t in r['tokens'])} | "
               f"{' / '.join(f'{c:.0f}' for c in r['capacity'])} | {r['gflops_useful']} / "
               f"{r['gflops_executed']} | {r['executed_over_useful']:.3f} | "
               f"{r['ms_per_image_mean']:.0f} | {eff} |")
  return out


def main(argv):
  del argv
  f = flags.FLAGS
  if f.table:
    with open(f.table) as fh:
      print("\n".join(table([json.loads(l) for l in fh if l.strip()])))
    return
  variables, weights = None, "given"
  if f.workdir:
    config = f.config or checkpoint.read_config(f.workdir)
    variables, step = variables_lib.restore(config, f.workdir)
    weights = f"trained ({f.workdir} step {step})"
  else:
    config = f.config
  config = config.copy_and_resolve_references()
  if f.res:
    config.data.image_size = (f.res, f.res)
  images = tokens.load_images(config, f.images, f.num_images)
  for name in f.designs:
    d = DESIGNS[name]
    for batch in f.batch:
      if batch == 1 and name.endswith(("grouped", "split exits")):
        continue   # grouping and splitting change nothing at batch 1
      cfg = config.copy_and_resolve_references()
      cfg.model.update(buckets=d["ladder"], exit_buckets=d["ladder"], scan_blocks=d["scan"])
      reps = f.reps or -(-len(images) // batch)   # 0: every batch once
      r = benchmark.measure(cfg, variables, images, batch=batch, reps=reps, warmup=1,
                            exit_share=f.exit_share if variables is None else -1.0,
                            weights=weights, dispatch=d["dispatch"], group=d["group"])
      row = dict(design=name, batch=batch, buckets=len(d["ladder"]), scan_blocks=d["scan"],
                 dispatch=d["dispatch"], grouped=d["group"], compile_s=round(r["compile_s"], 1),
                 programs=r["programs_compiled"], tokens=r["mean_tokens_per_stage"],
                 capacity=r["mean_capacity_per_stage"],
                 gflops_useful=round(r["gflops_useful"], 2),
                 gflops_executed=round(r["gflops_executed"], 2),
                 executed_over_useful=r["executed_over_useful"],
                 ms_per_image=round(r["ms_per_image_median"], 1),
                 ms_per_image_mean=round(r["ms_per_image_mean"], 1), timed_calls=reps,
                 method=r["method"], variant=r["variant"], image_size=r["image_size"],
                 images=len(images),
                 weights=r["weights"], device=r["device"])
      writers.print_row(row, f.out)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config (path:arg); default: the "
                                  "--workdir's config.json.")
  flags.DEFINE_string("workdir", "", "A trained run: its weights (and config).")
  flags.DEFINE_integer("res", 0, "Square image size (0: the config's).")
  flags.DEFINE_string("images", "", "Folder of images; default: the config's eval split.")
  flags.DEFINE_integer("num_images", 16, "Images for the token statistics and the timing.")
  flags.DEFINE_multi_integer("batch", [1], "Batch sizes, repeatable.")
  flags.DEFINE_integer("reps", 0, "Timed calls (0: every batch of the images once).")
  flags.DEFINE_float("exit_share", 0.4, "Random exit heads: halt this share per exit.")
  flags.DEFINE_multi_string("designs", ["eighths, device", "eighths, device, grouped",
                                        "geometric 1.05, host"], "Designs to measure.")
  flags.DEFINE_string("out", "", "Append the JSON lines to this file.")
  flags.DEFINE_string("table", "", "Print this JSON-lines file as a markdown table instead.")
  app.run(main)
