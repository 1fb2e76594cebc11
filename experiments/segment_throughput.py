"""Issue 29 item 3: `step-segment` throughput by batch size, one run: the folder's images
resized to --res² (written once under --work), a model with random ViT and heads, the given
trained policy and exits calibrated to halt --exit_share of the active tokens per exit
(as experiments/bench_cpu_1024.sh), exported as parameters, then segmented at each --batch
into its own output folder; one JSON line per batch size with summary.json's images/s,
compile seconds, tokens and GFLOPs useful / executed.

  python experiments/segment_throughput.py --policy=workdirs/camvid_ti_step_segvit_s0/policy \
      --images=../shared/data/camvid_segnet/CamVid/val --batch=1 --batch=8 --batch=32 \
      --out=experiments/results/segment_throughput_cpu/rows.jsonl
"""
import io
import os
import shutil
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import step as step_config  # noqa: E402
from step_jax.analysis import benchmark  # noqa: E402
from step_jax.evaluation import dispatch  # noqa: E402
from step_jax.evaluation import tokens  # noqa: E402
from step_jax.inference import segment  # noqa: E402
from step_jax.interop import export  # noqa: E402
from step_jax.runtime import writers  # noqa: E402

KEYS = ("images", "images_per_s", "seconds", "compile_s", "compiled_shapes", "mean_tokens_full",
        "mean_tokens_kept", "mean_tokens_halted", "gflops_useful", "gflops_executed",
        "dispatch", "bucket_ratio", "batch_size", "model_compile")


def main(argv):
  del argv
  f = flags.FLAGS
  config = step_config.get_config(f"method={f.method},variant={f.variant},dataset=camvid,"
                                  f"res={f.res}")
  config.model.policy.init_from = f.policy
  frames = os.path.join(f.work, "frames")
  if not os.path.isdir(frames):   # the folder's images at res² (PNG, lossless)
    os.makedirs(frames + ".tmp", exist_ok=True)
    names = sorted(n for n in os.listdir(f.images) if n.lower().endswith((".png", ".jpg")))
    for n in names[:f.num_images or None]:
      im = Image.open(os.path.join(f.images, n)).convert("RGB")
      im.resize((f.res, f.res), Image.BILINEAR).save(
          os.path.join(frames + ".tmp", os.path.splitext(n)[0] + ".png"))
    os.replace(frames + ".tmp", frames)
  calib = tokens.load_images(config, frames, 8)
  config, model, variables, weights = benchmark.prepare(config, "fp32", None, calib,
                                                        f.exit_share)
  if model.exit_layers:   # the calibrated thresholds, one per exit, into the exported config
    taus = tuple(float(t) for t in np.atleast_1d(model.exit_threshold))
    del config.model["exit_threshold"]   # a float field (a reference): re-set as a tuple
    config.model.exit_threshold = taus
  folder = os.path.join(f.work, "model")
  shutil.rmtree(folder, ignore_errors=True)
  export.export_model(config, variables, folder, formats=("msgpack",), model=model)
  for batch in f.batch:
    out = os.path.join(f.work, f"out_b{batch}_{f.dispatch}")
    shutil.rmtree(out, ignore_errors=True)   # every image segmented, none skipped
    summary = segment.segment_files(folder, frames, out, batch_size=batch,
                                    dispatch=f.dispatch, bucket_ratio=f.bucket_ratio,
                                    stream=io.StringIO())
    row = dict(method=f.method, variant=f.variant, res=f.res, weights=weights,
               exit_threshold=config.model.get("exit_threshold"),
               **{k: summary[k] for k in KEYS})
    row["executed_over_useful"] = (summary["gflops_executed"] / summary["gflops_useful"]
                                   if summary["gflops_useful"] else None)
    writers.print_row(row, f.out)


if __name__ == "__main__":
  flags.DEFINE_string("policy", None, "A trained dCTS policy (workdir or policy_ckpt).")
  flags.DEFINE_string("images", "../shared/data/camvid_segnet/CamVid/val", "Image folder.")
  flags.DEFINE_integer("num_images", 0, "The folder's first N images (0: all).")
  flags.DEFINE_string("method", "step", "configs/step.py method.")
  flags.DEFINE_string("variant", "Ti/16", "ViT variant.")
  flags.DEFINE_integer("res", 1024, "Square image side the frames are resized to.")
  flags.DEFINE_float("exit_share", 0.4, "Random exit heads: halt this share per exit.")
  flags.DEFINE_multi_integer("batch", [1, 8, 32], "Batch sizes, repeatable.")
  flags.DEFINE_enum("dispatch", "auto", list(dispatch.CHOICES),
                    "Bucket dispatch (auto: the evaluation default, dispatch.resolve).")
  flags.DEFINE_float("bucket_ratio", 0.0, "The host dispatches' ladder (0: the model's; "
                     "under auto 1.05).")
  flags.DEFINE_string("work", "workdirs/segment_throughput", "Frames, model and outputs.")
  flags.DEFINE_string("out", "", "Append the JSON lines to this file.")
  flags.mark_flags_as_required(["policy"])
  app.run(main)
