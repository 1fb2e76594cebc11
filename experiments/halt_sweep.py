"""How many tokens the first exit of a trained run would halt, for a grid of thresholds τ and of
DToP's keep-top-k rule (the k most confident candidates of every predicted class stay
active), from one forward per image with nothing halting (the exit's confidences are read
from its auxiliary output, so every (τ, k) costs no extra forward).

  python experiments/halt_sweep.py --workdir=workdirs/camvid_ti_step68_from_segvit_s0 \
      --res=176x240 --num_images=101 [--taus=0.95,0.9,0.85,0.8,0.7] [--ks=0,1,2,5]

Images: the run's eval split, resized to --res (HxW). Tokens: one per supertoken (counted at
its anchor cell). Prints a markdown table: τ, the share of tokens above τ (candidates), and
the share halted for each k.
"""
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax import api  # noqa: E402
from step_jax.evaluation import tokens as tokens_lib  # noqa: E402
from step_jax.models import early_exit  # noqa: E402
from step_jax.models import supertokens  # noqa: E402
from step_jax.runtime import checkpoint  # noqa: E402


def sweep(model, variables, images, taus, ks):
  """(tokens per image, {τ: candidates}, {(τ, k): halted}) summed over `images`."""
  if not model.exit_layers:
    raise ValueError("the run has no exit layers")
  single = model.clone(buckets=(1.0,), exit_buckets=(1.0,),
                       exit_threshold=(1.0,) * len(model.exit_layers))
  run = jax.jit(single.apply)
  total, cand, halt = 0, dict.fromkeys(taus, 0), dict.fromkeys([(t, k) for t in taus for k in ks], 0)
  for im in images:
    out, info = run(variables, jnp.asarray(im[None], jnp.float32))
    cls, masks = tokens_lib.exit_prediction(model, out, 0)
    stage = np.asarray(info["halt_stage"])
    level = np.asarray(info["level"]) if "level" in info else np.ones_like(stage)
    active = jnp.asarray(supertokens.anchors(level).reshape(1, -1))
    total += int(active.sum())
    conf, _ = early_exit.token_confidence(cls, masks)
    for t in taus:
      cand[t] += int(((conf > t) & active).sum())
      for k in ks:
        halt[(t, k)] += int(early_exit.halting(cls, masks, active, t, k).sum())
  return total, cand, halt


def main(argv):
  del argv
  f = flags.FLAGS
  model, variables = api.load(f.workdir)
  config = checkpoint.read_config(f.workdir)
  config.data.image_size = tuple(int(v) for v in f.res.split("x"))
  images = tokens_lib.load_images(config, "", f.num_images)
  taus = [float(t) for t in f.taus.split(",")]
  ks = [int(k) for k in f.ks.split(",")]
  total, cand, halt = sweep(model, variables, images, taus, ks)
  print(f"{f.workdir}: {len(images)} images at {f.res}, {total / len(images):.1f} tokens per "
        f"image, exit at layer {model.exit_layers[0]}\n")
  print("| τ | candidates | " + " | ".join(f"halted, k={k}" for k in ks) + " |")
  print("|---|---|" + "---|" * len(ks))
  for t in taus:
    print(f"| {t:g} | {100 * cand[t] / total:.1f} % | " +
          " | ".join(f"{100 * halt[(t, k)] / total:.1f} %" for k in ks) + " |")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A trained run with exit layers.")
  flags.DEFINE_string("res", "176x240", "HxW the eval images are resized to.")
  flags.DEFINE_integer("num_images", 101, "Eval images.")
  flags.DEFINE_string("taus", "0.95,0.9,0.85,0.8,0.75,0.7", "Thresholds.")
  flags.DEFINE_string("ks", "0,1,2,5", "keep_top_k values (0: none kept).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
