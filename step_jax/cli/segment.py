"""python -m step_jax.cli.segment: segments a folder of images, a glob or a video with a
trained model and writes a label map per image plus summary.json (step_jax.inference).

  python -m step_jax.cli.segment --workdir=DIR --input=FRAMES_DIR --output=OUT \
      [--save=labels,overlay,tokens] [--batch_size=8] [--on_error=skip|fatal] \
      [--dispatch=auto|device|host|host_split] [--bucket_ratio=1.05]

--workdir is a training workdir or an export folder; a rerun into the same --output skips
the images already finished.
"""
from absl import app
from absl import flags

from step_jax.inference import segment as inference
from step_jax.cli import common
from step_jax.evaluation import dispatch


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  summary = inference.segment_files(
      f.workdir, f.input, f.output, save=tuple(x for x in f.save.split(",") if x),
      batch_size=f.batch_size, on_error=f.on_error, dispatch=f.dispatch,
      bucket_ratio=f.bucket_ratio)
  failed = f", {summary['failed_count']} failed (listed in summary.json)" \
      if summary["failed_count"] else ""
  print(f"segmented {summary['images']} images into {f.output} "
        f"({summary['already_done']} already done{failed}; "
        f"{summary['images_per_s']:.2f} images/s)", flush=True)


def run():
  """`python -m step_jax.cli.segment` and the `step-segment` console script."""
  flags.DEFINE_string("workdir", None, "Training workdir (latest checkpoint) or export folder.")
  flags.DEFINE_string("input", None, "A folder of images (searched recursively), a glob "
                      "('frames/*.jpg', quoted), an image or a video file.")
  flags.DEFINE_string("output", None, "Output folder: labels/, overlay/, tokens/ and "
                      "summary.json.")
  flags.DEFINE_string("save", "labels", "Comma-separated outputs per image: labels (indexed "
                      "PNG with the dataset's palette), overlay, tokens (token maps).")
  flags.DEFINE_integer("batch_size", 0, "Images per device call (0: the config's evaluation "
                       "batch); rounded up to a multiple of the local devices.")
  flags.DEFINE_enum("on_error", "skip", inference.ON_ERROR, "A file that cannot be segmented "
                    "(unreadable, corrupt, 16-bit, empty, too large): skip it and list it in "
                    "summary.json, or stop with an error.")
  flags.DEFINE_enum("dispatch", None, list(dispatch.CHOICES), "Where the "
                    "token-capacity buckets are chosen: per model (auto), in the one program, "
                    "on the host, or on the host with each image alone after the first exit "
                    "(default: the config's eval.dispatch).")
  flags.DEFINE_float("bucket_ratio", None, "The host's bucket ladder: 0 the model's own (auto: "
                     "1.05), r > 1 geometric with ratio r (default: the config's "
                     "eval.bucket_ratio).")
  flags.mark_flags_as_required(["workdir", "input", "output"])
  common.list_flags_in_help(__name__)
  common.quiet_by_default()
  common.run_command(main)


if __name__ == "__main__":
  run()
