"""dCTS analysis: token statistics per superpatch size (paper table 2) and figure-3 overlays.

  python experiments/dcts_analysis.py --policy=workdirs/policy_camvid_cpu2 \
      --config=configs/policy.py:dataset=camvid,size=cpu --out=experiments/results/dcts_camvid

Writes <out>/token_stats.md and .csv (per τ configuration: tokens per image, mean/max/min, by
superpatch size, and the reduction factor), <out>/policy_accuracy.md, and
<out>/overlay_<tau>.png: val images with the superpatch grid drawn over them (colour = size).
"""
import csv
import json
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax.training import train_policy  # noqa: E402
from step_jax.data import get_source  # noqa: E402
from step_jax.models import supertokens  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Policy config (data + τ sets).")
_POLICY = flags.DEFINE_string("policy", None, "Policy workdir (train_policy output).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_OVERLAYS = flags.DEFINE_integer("overlays", 4, "Images per overlay figure.")

COLOURS = {1: None, 2: (255, 220, 0), 4: (0, 200, 255), 8: (255, 60, 200), 16: (80, 255, 80)}


def draw_superpatches(image, level, patch=16):
  """The image with every superpatch outlined (1x1 patches left plain)."""
  im = Image.fromarray(image).convert("RGB")
  draw = ImageDraw.Draw(im, "RGBA")
  gh, gw = level.shape
  for i in range(gh):
    for j in range(gw):
      k = int(level[i, j])
      if k > 1 and i % k == 0 and j % k == 0:
        x0, y0 = j * patch, i * patch
        draw.rectangle([x0, y0, x0 + k * patch - 1, y0 + k * patch - 1],
                       outline=COLOURS[k] + (255,), fill=COLOURS[k] + (40,), width=2)
  return np.asarray(im)


def main(argv):
  del argv
  config = _CONFIG.value
  os.makedirs(_OUT.value, exist_ok=True)
  model = train_policy.build(config)
  variables = train_policy.load_variables(_POLICY.value)
  ev = train_policy.evaluate(variables, model, config)
  with open(os.path.join(_OUT.value, "eval_policy.json"), "w") as f:
    json.dump(ev, f, indent=1)

  sizes = ["1x1", "2x2", "4x4", "8x8", "16x16"]
  lines = [f"Tokens per image on {config.data.name} {config.data.eval_split} "
           f"({ev['images']} images, crop {ev['crop'][0]}x{ev['crop'][1]}, "
           f"{ev['tokens_full']} patches without merging).", "",
           "| τ (2,4,8,16) | stat | " + " | ".join(sizes) + " | tokens | reduction |",
           "|---|---|" + "---|" * (len(sizes) + 2)]
  rows = []
  for name, st in ev["tokens"].items():
    tau = config.policy.tau_configs[name]
    for stat in ("mean", "max", "min"):
      vals = [st[s][stat] for s in sizes]
      red = f"{st['reduction']:.2f}x" if stat == "mean" else ""
      lines.append(f"| τ-{name} {tuple(tau)} | {stat} | "
                   + " | ".join(f"{v:.1f}" if stat == "mean" else str(v) for v in vals)
                   + f" | {st['total'][stat]:.1f} | {red} |")
      rows.append([name, stat] + vals + [st["total"][stat]])
  with open(os.path.join(_OUT.value, "token_stats.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(_OUT.value, "token_stats.csv"), "w", newline="") as f:
    csv.writer(f).writerows([["tau", "stat"] + sizes + ["total"]] + rows)
  acc = ["| window | accuracy | precision | recall | positives | windows |", "|---|---|---|---|---|---|"]
  for k, v in ev["sizes"].items():
    acc.append(f"| {k} | {v['accuracy']:.3f} | {v['precision']:.3f} | {v['recall']:.3f} | "
               f"{v['positive_rate']:.3f} | {v['windows']} |")
  with open(os.path.join(_OUT.value, "policy_accuracy.md"), "w") as f:
    f.write(f"Thresholds for precision/recall: {tuple(config.policy.thresholds)}\n\n"
            + "\n".join(acc) + "\n")

  # Overlays (figure 3).
  src = get_source(config.data, config.data.eval_split, config.num_classes, config.ignore_index)
  h, w = config.data.eval_crop
  apply = jax.jit(model.apply)
  picks = np.linspace(0, len(src) - 1, _OVERLAYS.value).astype(int)
  for name, tau in config.policy.tau_configs.items():
    tiles = []
    for i in picks:
      im = src[int(i)]["image"][:h, :w]
      scores = {k: jax.nn.sigmoid(v) for k, v in apply(variables, im[None]).items()}
      level = supertokens.merge_levels(scores, dict(zip(supertokens.SIZES, tau)),
                                       (h // 16, w // 16))
      tiles.append(draw_superpatches(im, np.asarray(level[0])))
    Image.fromarray(np.concatenate(tiles, axis=0)).save(
        os.path.join(_OUT.value, f"overlay_{name}.png"))
  print("\n".join(lines))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "policy", "out"])
  app.run(main)
