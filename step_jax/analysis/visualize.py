"""Pictures of what the model did, as uint8 arrays and PIL images (no matplotlib needed).

  pred, info = step_jax.segment(model, variables, image)
  visualize.figure(image, pred, info).save("step.png")   # all panels side by side

Panels (the STEP paper's figures):
  superpatches(image, level, patch)     figure 3: superpatch borders, tinted by size
  halted(image, halt_stage, patch, s)   figures 7/8: tokens halted at or before exit s greyed
  merged(image, source, patch)          ALGM's merged tokens: borders between tokens, tinted
                                        by their size in cells
  colorize(pred)                        prediction colour map
  overlay(image, pred, colours)         the image tinted with the class colours
"""
import numpy as np
from PIL import Image
from PIL import ImageDraw

from step_jax.data import datasets
from step_jax.models import supertokens

# Tint per superpatch side (in patches); single patches stay untinted.
LEVEL_COLOURS = {2: (255, 215, 0), 4: (255, 128, 0), 8: (220, 40, 40), 16: (150, 0, 200)}
EXIT_COLOURS = ((220, 40, 40), (40, 120, 255), (0, 200, 120), (255, 160, 0))

def colorize(pred, num_classes=None, ignore_index=255, colours=None):
  """Class map [H, W] → RGB uint8 [H, W, 3]; `ignore_index` (and anything out of range) black.
  `colours` (uint8 [C, 3]): a dataset's, `datasets.palette(name, C)`; by default the
  registry's generated ones for `num_classes` (or as many as `pred` shows)."""
  pred = np.asarray(pred)
  if colours is None:
    n = int(num_classes or (pred[pred != ignore_index].max(initial=0) + 1))
    colours = datasets.palette("", n)
  colours = np.asarray(colours, np.uint8)
  n = len(colours)
  table = np.concatenate([colours, np.zeros((1, 3), np.uint8)])
  return table[np.where((pred >= 0) & (pred < n), pred, n)]


def overlay(image, pred, colours, *, alpha=0.5):
  """The image blended with the class colours (uint8 [C, 3], e.g. data.datasets.palette)
  of `pred` [H, W]; `alpha`: the colours' weight."""
  tint = np.asarray(colours, np.float32)[np.asarray(pred)]
  out = (1 - alpha) * _as_rgb(image).astype(np.float32) + alpha * tint
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _as_rgb(image):
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(image, 0, 255).astype(np.uint8)
  return image


def _cells_to_pixels(grid_map, patch, hw):
  """[gh, gw] → [H, W] (each cell a patch × patch block), cropped to the image."""
  up = np.repeat(np.repeat(np.asarray(grid_map), patch, axis=0), patch, axis=1)
  return up[:hw[0], :hw[1]]


def token_ids(level):
  """Cell → id of the superpatch covering it: its anchor (top-left) cell's raster index."""
  return supertokens.anchor_cells(np.asarray(level))


def superpatches(image, level, patch_size, *, tint=0.35, line=(255, 255, 255)):
  """Figure 3: the image with superpatch borders; merged tokens tinted by their size."""
  image = _as_rgb(image)
  hw = image.shape[:2]
  lev = _cells_to_pixels(level, patch_size, hw)
  ids = _cells_to_pixels(token_ids(level), patch_size, hw)
  return _tint_and_outline(image, ids, lambda k: lev == k, tint, line)


def _tint_and_outline(image, ids, tinted, tint, line):
  """The image with the pixels tinted(k) blended with LEVEL_COLOURS[k] and `line` drawn
  where the token id `ids` [H, W] changes between neighbouring pixels."""
  out = image.astype(np.float32)
  for k, colour in LEVEL_COLOURS.items():
    m = tinted(k)
    out[m] = (1 - tint) * out[m] + tint * np.asarray(colour, np.float32)
  edge = np.zeros(ids.shape, bool)
  edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
  edge[1:, :] |= ids[1:, :] != ids[:-1, :]
  out[edge] = line
  return out.astype(np.uint8)


def merged(image, source, patch_size, *, tint=0.35, line=(255, 255, 255)):
  """ALGM's tokens (its info's algm_source_local / algm_source: cell → merged token): borders
  between tokens, and tokens covering several cells tinted as superpatches of about their
  size (2 to 3 cells as a 2x2 superpatch, 4 to 15 as 4x4, 16 to 63 as 8x8, 64 to 255 as
  16x16)."""
  image = _as_rgb(image)
  hw = image.shape[:2]
  source = np.asarray(source)
  _, inverse, counts = np.unique(source, return_inverse=True, return_counts=True)
  cells = counts[inverse].reshape(source.shape)
  ids = _cells_to_pixels(source, patch_size, hw)
  size = _cells_to_pixels(cells, patch_size, hw)
  return _tint_and_outline(image, ids, lambda k: (size >= max(k * k // 4, 2)) & (size < k * k),
                           tint, line)


def halted(image, halt_stage, patch_size, stage, *, tint=0.4):
  """Figures 7/8: tokens halted at exit `stage` or earlier greyed, darkened and tinted with
  their exit's colour; the tokens still active after that exit keep the image."""
  image = _as_rgb(image)
  hs = _cells_to_pixels(halt_stage, patch_size, image.shape[:2])
  out = image.astype(np.float32)
  for s in range(stage + 1):
    m = hs == s
    g = out[m].mean(axis=-1, keepdims=True)
    colour = np.asarray(EXIT_COLOURS[s % len(EXIT_COLOURS)], np.float32)
    out[m] = 0.5 * g + tint * colour
  return out.astype(np.uint8)


def upscale(image, factor):
  """Nearest-neighbour enlargement (small crops are easier to read that way)."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def side_by_side(images, titles=None, *, pad=4, background=255):
  """One PIL image with `images` (uint8 arrays) in a row, titles above them."""
  images = [_as_rgb(im if np.asarray(im).ndim == 3 else np.repeat(np.asarray(im)[..., None],
                                                                   3, -1)) for im in images]
  titles = list(titles or [""] * len(images))
  title_h = 14 if any(titles) else 0
  h = max(im.shape[0] for im in images) + title_h + 2 * pad
  w = sum(im.shape[1] for im in images) + pad * (len(images) + 1)
  canvas = Image.new("RGB", (w, h), (background,) * 3)
  draw = ImageDraw.Draw(canvas)
  x = pad
  for im, title in zip(images, titles):
    canvas.paste(Image.fromarray(im), (x, pad + title_h))
    if title:
      draw.text((x, pad), title, fill=(0, 0, 0))
    x += im.shape[1] + pad
  return canvas


def panels(image, pred, info, *, num_classes=None, ignore_index=255, colours=None):
  """(images, titles): input, superpatches (with supertokens), ALGM's tokens after each of its
  merges (with ALGM), one halted map per exit (with early exits) and the prediction (in
  `colours`, see colorize)."""
  image = _as_rgb(image)
  patch = int(info["patch_size"])
  ims, titles = [image], ["input"]
  if "level" in info:
    n = int(np.asarray(info["num_tokens"]))
    ims.append(superpatches(image, info["level"], patch))
    titles.append(f"superpatches: {n} tokens")
  for key, what in (("algm_source_local", "ALGM local merge"), ("algm_source", "ALGM merged")):
    if key in info:
      ims.append(merged(image, info[key], patch))
      titles.append(f"{what}: {len(np.unique(np.asarray(info[key])))} tokens")
  if "halt_stage" in info:
    active = np.asarray(info["active_tokens"])
    for s, layer in enumerate(info["exit_layers"]):
      ims.append(halted(image, info["halt_stage"], patch, s))
      left = f", {int(active[s + 1])} left" if active.ndim == 1 and len(active) > s + 1 else ""
      titles.append(f"halted by layer {layer}{left}")
  if colours is None and num_classes is None:
    num_classes = np.asarray(info["scores"]).shape[-1]
  ims.append(colorize(pred, num_classes, ignore_index, colours))
  titles.append("prediction")
  return ims, titles


def figure(image, pred, info, *, scale=1, num_classes=None, ignore_index=255, colours=None):
  """All panels of one image side by side (PIL image); `scale` enlarges small inputs."""
  ims, titles = panels(image, pred, info, num_classes=num_classes, ignore_index=ignore_index,
                       colours=colours)
  if scale > 1:
    ims = [upscale(im, scale) for im in ims]
  return side_by_side(ims, titles)
