"""python -m step_jax.cli.benchmark: wall-clock, tokens and GFLOPs of one configuration as one
JSON line (step_jax.analysis.benchmark).

  python -m step_jax.cli.benchmark --config=configs/step.py:method=step,variant=B/16,res=1024 \
      --batch=1 --dtype=fp32 [--workdir=DIR] [--images=DIR_OR_SPLIT] [--exit_share=0.4]
  python -m step_jax.cli.benchmark --workdir=DIR    # a trained run at its own config
"""
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from step_jax.analysis import benchmark
from step_jax.cli import common
from step_jax.evaluation import dispatch


def main(argv, taken=("", [])):
  del argv
  f = flags.FLAGS
  config = common.config_from(f.config, f.workdir, taken)
  result = benchmark.run_config(config, f.workdir, images=f.images, num_images=f.num_images,
                                batch=f.batch, dtype=f.dtype, reps=f.reps, warmup=f.warmup,
                                exit_share=f.exit_share, dispatch=f.dispatch,
                                group=f.group_by_tokens)
  result["config"] = common.config_name(f, taken)
  print(json.dumps(result))


def run():
  """`python -m step_jax.cli.benchmark` (flags are defined here so importing stays free)."""
  config_flags.DEFINE_config_file("config", None, "Config (path:arg, or a .json); default: "
                                  "the --workdir's config.json (--config.a.b=value overrides "
                                  "apply to either).")
  flags.DEFINE_string("workdir", None, "Trained run to load (optional).")
  flags.DEFINE_integer("batch", 1, "Images per call.")
  flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "Compute dtype.")
  flags.DEFINE_integer("reps", 5, "Timed repetitions.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
  flags.DEFINE_string("images", "", "Folder of images (PNG/JPEG) to benchmark on; "
                      "default: the config's eval split.")
  flags.DEFINE_integer("num_images", 8, "How many images to use.")
  flags.DEFINE_float("exit_share", -1.0, "Calibrate exit thresholds to halt this "
                     "share of active tokens per exit (random exit heads).")
  flags.DEFINE_enum("dispatch", None, list(dispatch.DISPATCHES),
                    "Bucket choice: in the one program, on the host, or on the host with each "
                    "image alone after the first exit (default: config.model.bucket_dispatch).")
  flags.DEFINE_bool("group_by_tokens", False, "Batch images of similar token counts.")
  common.list_flags_in_help(__name__)
  common.run_command(main, take_config=True)


if __name__ == "__main__":
  run()
