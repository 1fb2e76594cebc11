"""Early-exit analysis: tokens halted per auxiliary head (paper table 7) and maps of halted
tokens per stage (figures 7-8).

  python experiments/exit_analysis.py \
      --config=configs/step.py:method=step,variant=B/16,dataset=cityscapes,res=1024,exits=8 \
      --out=experiments/results/exits_b16 [--workdir=DIR] [--images=DIR] [--num_images=16]

Weights: a trained `python -m step_jax.cli.train` workdir, or random weights with each exit
threshold calibrated to halt `--exit_share` of the still-active tokens (benchmark.prepare).

A token halts at most once; `info["halt_stage"]` [B, gh, gw] gives per patch cell the exit
where its token halted (len(exit_layers) = never). With supertokens a token covers
level×level cells and is counted once, at its anchor (top-left) cell of `info["level"]`.

Writes <out>/halted_tokens.{md,csv} (per head: halted tokens per image mean/max/min, share of
all tokens, share of the tokens that reached the head, cumulative share; the same for patch
cells, i.e. image area), <out>/halted_per_image.csv, and <out>/halted_maps.png: one column per
image; rows = image, superpatches (with token sharing), one row per exit (tokens halted at
this exit black, earlier-halted grey, superpatch outlines), prediction.
"""
import csv
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax.analysis import profile as profile_lib  # noqa: E402
from step_jax.analysis import visualize  # noqa: E402
from step_jax.data import datasets  # noqa: E402
from step_jax.models import segmenter  # noqa: E402
from step_jax.models import supertokens  # noqa: E402
from step_jax.evaluation import tokens


def halt_counts(info, num_exits):
  """Per image from the model's info: tokens [B], halted tokens [B, E] and halted cells
  [B, E] at each exit, tokens never halted [B]."""
  stage = np.asarray(info["halt_stage"])
  level = np.asarray(info["level"]) if "level" in info else np.ones_like(stage)
  anchor = supertokens.anchors(level)
  per_exit = lambda m: np.stack([(m & (stage == s)).sum((1, 2)) for s in range(num_exits)], 1)
  return dict(tokens=anchor.sum((1, 2)), halted=per_exit(anchor),
              halted_cells=per_exit(np.ones_like(anchor)),
              cells=np.full(stage.shape[0], stage.shape[1] * stage.shape[2]),
              final=(anchor & (stage == num_exits)).sum((1, 2)))


def analyse(model, variables, images):
  """Runs every image alone (its own buckets); returns halt_counts over all images and the
  per-image maps (halt_stage, level, predicted classes)."""
  if not model.exit_layers:
    raise ValueError("exit analysis needs a model with exit layers (method=dtop, cts_dtop or "
                     "step, or --config.model.exit_layers)")

  def fwd(v, x):
    out, info = model.apply(v, x)
    pred = jnp.argmax(segmenter.predict_scores(out, x.shape[1:3]), -1)
    keep = {k: info[k] for k in ("halt_stage", "level", "active_tokens") if k in info}
    return pred, keep
  fwd = jax.jit(fwd)
  preds, infos = [], []
  for im in np.asarray(images):
    pred, info = jax.device_get(fwd(variables, im[None]))
    preds.append(pred[0])
    infos.append(info)
  info = {k: np.concatenate([i[k] for i in infos]) for k in infos[0]}
  counts = halt_counts(info, len(model.exit_layers))
  return counts, dict(info, pred=np.stack(preds))


def summary(counts, exit_layers):
  """Rows per head (Aux1.., final): halted tokens per image mean/max/min and shares."""
  tokens = counts["tokens"].astype(float)
  reaching = tokens.copy()
  rows, cum = [], 0.0
  for s, layer in enumerate(exit_layers):
    h = counts["halted"][:, s].astype(float)
    cum += h.sum()
    rows.append(dict(head=f"Aux{s + 1}", layer=layer, mean=h.mean(), max=h.max(), min=h.min(),
                     share=h.sum() / tokens.sum(), share_of_reaching=h.sum() / reaching.sum(),
                     cumulative_share=cum / tokens.sum(),
                     cell_share=counts["halted_cells"][:, s].sum() / counts["cells"].sum()))
    reaching -= h
  f = counts["final"].astype(float)
  rows.append(dict(head="final (never halted)", layer="last", mean=f.mean(), max=f.max(),
                   min=f.min(), share=f.sum() / tokens.sum(), share_of_reaching=1.0,
                   cumulative_share=cum / tokens.sum(),
                   cell_share=1 - counts["halted_cells"].sum() / counts["cells"].sum()))
  return rows


def outline(im, level, patch, colour=(255, 255, 255)):
  """Draws superpatch (level > 1) outlines on a PIL image."""
  draw = ImageDraw.Draw(im)
  for i, j in zip(*np.nonzero(supertokens.anchors(level[None])[0] & (level > 1))):
    k = int(level[i, j])
    draw.rectangle([j * patch, i * patch, (j + k) * patch - 1, (i + k) * patch - 1],
                   outline=colour, width=1)
  return im


def halted_maps(images, maps, num_exits, patch, colours, n=4):
  """uint8 [rows·H, n·W, 3] panel (see the module doc)."""
  cols = []
  for b in range(min(n, len(images))):
    im = np.asarray(images[b])
    up = lambda m: np.kron(m, np.ones((patch, patch), m.dtype))[:im.shape[0], :im.shape[1]]
    level = maps["level"][b] if "level" in maps else np.ones(maps["halt_stage"][b].shape, int)
    stage = up(maps["halt_stage"][b])
    col = [im]
    if "level" in maps:
      col.append(np.asarray(outline(Image.fromarray(im), level, patch, (255, 220, 0))))
    for s in range(num_exits):
      x = im.copy()
      x[stage < s] = 110                  # halted earlier: grey
      x[stage == s] = 0                   # halted at this exit: black
      col.append(np.asarray(outline(Image.fromarray(x), level, patch)))
    col.append(visualize.colorize(maps["pred"][b], colours=colours))
    cols.append(np.concatenate([np.pad(c, ((0, 2), (0, 2), (0, 0)), constant_values=255)
                                for c in col]))
  return np.concatenate(cols, axis=1)


def shrink(panel, image_hw, tile):
  """The panel scaled so that one image tile is at most `tile` px on its long side."""
  f = tile / max(image_hw)
  if f >= 1:
    return panel
  h, w = panel.shape[:2]
  return np.asarray(Image.fromarray(panel).resize((round(w * f), round(h * f)), Image.BILINEAR))


def write(rows, counts, out, header, maps_png=None):
  """halted_tokens.md/.csv and halted_per_image.csv (and the PNG panel when given)."""
  os.makedirs(out, exist_ok=True)
  keys = ("head", "layer", "mean", "max", "min", "share", "share_of_reaching",
          "cumulative_share", "cell_share")
  with open(os.path.join(out, "halted_tokens.csv"), "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(keys)
    wr.writerows([[r[k] for k in keys] for r in rows])
  e = counts["halted"].shape[1]
  with open(os.path.join(out, "halted_per_image.csv"), "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(["image", "tokens"] + [f"halted_aux{s + 1}" for s in range(e)] +
                ["never_halted"] + [f"halted_cells_aux{s + 1}" for s in range(e)])
    for i in range(len(counts["tokens"])):
      wr.writerow([i, counts["tokens"][i], *counts["halted"][i], counts["final"][i],
                   *counts["halted_cells"][i]])
  lines = [f"Tokens halted per auxiliary head: `{header['config']}`, {header['images']} "
           f"images, {header['weights']} weights, exit thresholds {header['exit_threshold']}; "
           f"tokens entering the encoder per image: mean {counts['tokens'].mean():.1f} "
           f"(max {counts['tokens'].max()}, min {counts['tokens'].min()}).", "",
           "| head | after layer | halted mean | max | min | share of all tokens | share of "
           "tokens reaching the head | cumulative share | share of image area |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['head']} | {r['layer']} | {r['mean']:.1f} | {r['max']:.0f} | "
                 f"{r['min']:.0f} | {100 * r['share']:.1f} % | "
                 f"{100 * r['share_of_reaching']:.1f} % | {100 * r['cumulative_share']:.1f} % | "
                 f"{100 * r['cell_share']:.1f} % |")
  if maps_png is not None:
    Image.fromarray(maps_png).quantize(256).save(os.path.join(out, "halted_maps.png"),
                                                 optimize=True)   # small enough to commit
    lines += ["", "halted_maps.png: one column per image; rows: image, " +
              ("superpatches, " if header.get("merge") else "") +
              "one row per exit (black: halted at this exit, grey: halted earlier), "
              "predicted classes."]
  with open(os.path.join(out, "halted_tokens.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  images = tokens.load_images(f.config, f.images, f.num_images * f.every)[::f.every]
  config, model, variables, weights = profile_lib.load(f.config, images, f.workdir,
                                                       f.exit_share)
  counts, maps = analyse(model, variables, images)
  rows = summary(counts, model.exit_layers)
  panel = shrink(halted_maps(images, maps, len(model.exit_layers), model.backbone.patch_size,
                             datasets.palette(config.data.name, config.num_classes), f.maps),
                 images.shape[1:3], f.tile) \
      if f.maps else None
  header = dict(config=config_flags.get_config_filename(f["config"]), images=len(images),
                weights=weights, merge=model.merge != "none",
                exit_threshold=[round(float(t), 4) for t in np.atleast_1d(model.exit_threshold)])
  print(write(rows, counts, f.out, header, panel))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config (path:arg) with exit layers.")
  flags.DEFINE_string("workdir", None, "Trained training run (default: random weights).")
  flags.DEFINE_string("images", "", "Folder of images; default: the config's eval split.")
  flags.DEFINE_integer("num_images", 16, "Images to analyse.")
  flags.DEFINE_integer("every", 1, "Take every k-th image (video datasets: varied scenes).")
  flags.DEFINE_float("exit_share", 0.4, "Random weights: calibrate exit thresholds to halt "
                     "this share of active tokens per exit.")
  flags.DEFINE_integer("maps", 4, "Images in halted_maps.png (0: none).")
  flags.DEFINE_integer("tile", 192, "Longest side of one image tile in halted_maps.png.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
