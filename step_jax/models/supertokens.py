"""dCTS / CTS token sharing with static shapes: merge plans, supertokens, un-sharing.

Vocabulary (docs/design.md §1): the image is a grid of gh x gw cells of 16 px. A *window* of size k
covers k x k cells and is anchored at multiples of k; only complete windows exist (grids that
are not a multiple of k merge only the top-left complete region). The *level map*
[B, gh, gw] says for every cell the side k ∈ {1, 2, 4, 8, 16} of the superpatch covering it.
A superpatch's *anchor* is its top-left cell; tokens are the anchors in raster order.

Everything is array arithmetic with static shapes: token counts vary per image, so tokens are
gathered into a capacity C from a small fixed set of buckets with a validity mask, and un-shared
back to the grid through the *leaf* map (cell → token index).
"""
import math
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SIZES = (2, 4, 8, 16)  # window sides in patches; merged coarse to fine


def merge_levels(scores: Dict[int, jax.Array], thresholds: Dict[int, float], grid):
  """Coarse-to-fine dCTS merge: level map [B, gh, gw] int32.

  scores: {k: [B, >= gh//k, >= gw//k]} "same class" probabilities per window; a window merges
  when its score exceeds τ_k and no coarser superpatch already covers it (windows nest, so a
  finer window is either wholly inside a merged coarser one or wholly free).
  """
  gh, gw = grid
  b = next(iter(scores.values())).shape[0]
  level = jnp.ones((b, gh, gw), jnp.int32)
  for k in sorted(scores, reverse=True):
    nh, nw = gh // k, gw // k
    if nh == 0 or nw == 0:
      continue
    free = level[:, :nh * k:k, :nw * k:k] == 1       # anchor cell of each window not covered
    take = (scores[k][:, :nh, :nw] > thresholds[k]) & free
    cells = jnp.repeat(jnp.repeat(take, k, axis=1), k, axis=2)
    level = level.at[:, :nh * k, :nw * k].set(jnp.where(cells, k, level[:, :nh * k, :nw * k]))
  return level


def cts_levels(score2, num_shared: int, grid):
  """CTS baseline: exactly the `num_shared` highest-scoring 2x2 windows merge (top-K)."""
  gh, gw = grid
  b = score2.shape[0]
  s = score2[:, :gh // 2, :gw // 2].reshape(b, -1)
  if num_shared > s.shape[1]:
    raise ValueError(f"CTS num_shared={num_shared} exceeds the {s.shape[1]} 2x2 windows "
                     f"of a {gh}x{gw} grid")
  _, top = jax.lax.top_k(s, num_shared)
  take = jnp.zeros_like(s, bool).at[jnp.arange(b)[:, None], top].set(True)
  return merge_levels({2: take.reshape(b, gh // 2, gw // 2).astype(jnp.float32)}, {2: 0.5},
                      grid)


def window_purity(labels, k: int, patch: int, ignore_index: int, border_ignore=False):
  """Policy targets per k x k window (CTS rule generalised): [B, H//(k p), W//(k p)] uint8.

  1 if all pixels carry the same value (an all-ignore window counts as pure, CTS's
  `group_if_all_ignore`), 0 otherwise, including "one class + some ignore". With
  `border_ignore` (CTS on ADE20K), one-class+ignore windows on the outer ring get 255.
  """
  b, h, w = labels.shape
  s = k * patch
  nh, nw = h // s, w // s
  win = labels[:, :nh * s, :nw * s].reshape(b, nh, s, nw, s).astype(jnp.int32)
  hi, lo = win.max(axis=(2, 4)), win.min(axis=(2, 4))
  pure = hi == lo
  out = pure.astype(jnp.uint8)
  if border_ignore:
    hi_valid = jnp.where(win == ignore_index, -1000, win).max(axis=(2, 4))
    one_plus_ignore = (~pure) & (hi_valid == lo) & (hi == ignore_index)
    ring = np.zeros((nh, nw), bool)
    ring[[0, -1], :] = True
    ring[:, [0, -1]] = True
    out = jnp.where(one_plus_ignore & ring, 255, out).astype(jnp.uint8)
  return out


def level_offsets(grid, sizes=SIZES):
  """Start of each level's cells in the concatenated pyramid table: {1: 0, 2: gh*gw, ...}."""
  gh, gw = grid
  offsets, total = {1: 0}, gh * gw
  for k in sizes:
    offsets[k] = total
    total += (gh // k) * (gw // k)
  return offsets, total


def anchors(level):
  """[..., gh, gw] bool: the cells that stand for a token (their superpatch's top-left);
  works on NumPy and JAX level maps."""
  ii, jj = np.arange(level.shape[-2])[:, None], np.arange(level.shape[-1])[None, :]
  return (ii % level == 0) & (jj % level == 0)


def anchor_cells(level):
  """[..., gh, gw] raster index of the anchor cell of the superpatch covering each cell."""
  gw = level.shape[-1]
  ii, jj = np.arange(level.shape[-2])[:, None], np.arange(gw)[None, :]
  return (ii - ii % level) * gw + (jj - jj % level)


def token_layout(level, sizes=SIZES):
  """Token bookkeeping for a level map [B, gh, gw].

  Returns dict of
    order [B, N]: cells sorted so the anchors come first, in raster order (stable);
    count [B]: number of tokens (anchors);
    table_index [B, N]: row of each cell's superpatch in the pyramid table;
    leaf [B, N]: token index covering each cell (un-sharing map).
  """
  b, gh, gw = level.shape
  offsets, _ = level_offsets((gh, gw), sizes)
  ii = jnp.arange(gh)[None, :, None]
  jj = jnp.arange(gw)[None, None, :]
  offset = jnp.zeros_like(level)
  width = jnp.full_like(level, gw)
  for k in sizes:
    offset = jnp.where(level == k, offsets[k], offset)
    width = jnp.where(level == k, gw // k, width)
  table_index = offset + (ii // level) * width + jj // level
  anchor = anchors(level).reshape(b, -1)
  order = jnp.argsort(jnp.logical_not(anchor).astype(jnp.int32), axis=-1, stable=True)
  rank = jnp.cumsum(anchor, axis=-1) - 1
  anchor_cell = anchor_cells(level).reshape(b, -1)
  return dict(order=order, count=jnp.sum(anchor, axis=-1).astype(jnp.int32),
              table_index=table_index.reshape(b, -1),
              leaf=jnp.take_along_axis(rank, anchor_cell, axis=-1))


def downsample(x, k: int, mode: str):
  """[B, H, W, C] → [B, H/k, W/k, C] for H, W multiples of k.

  'area': mean over each k x k block. 'bilinear': PyTorch `F.interpolate(scale_factor=1/k,
  mode='bilinear', align_corners=False)` without antialias, which samples the block centre:
  the mean of the central 2x2 pixels (for k = 2 the two modes agree).
  """
  b, h, w, c = x.shape
  blocks = x.reshape(b, h // k, k, w // k, k, c)
  if mode == "area":
    return blocks.mean(axis=(2, 4))
  if mode == "bilinear":
    m = k // 2
    return blocks[:, :, m - 1:m + 1, :, m - 1:m + 1].mean(axis=(2, 4))
  raise ValueError(f"superpatch resize mode {mode!r}: use 'area' or 'bilinear'")


def pyramid_table(x, patch: int, mode: str, sizes=SIZES):
  """All superpatch contents of every level, flattened: [B, P_total, patch*patch*C].

  x: [B, gh*patch, gw*patch, C] (pixels, patch=16; or a position-embedding grid, patch=1).
  Level k is the complete-window region downsampled by k and cut into patch x patch pieces, so
  every superpatch is resized to one patch (the supertoken input).
  """
  b, h, w, c = x.shape
  gh, gw = h // patch, w // patch

  def cut(y):
    n, m = y.shape[1] // patch, y.shape[2] // patch
    y = y.reshape(b, n, patch, m, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, n * m, patch * patch * c)

  parts = [cut(x)]
  for k in sizes:
    nh, nw = gh // k, gw // k
    if nh and nw:
      parts.append(cut(downsample(x[:, :nh * k * patch, :nw * k * patch], k, mode)))
  return jnp.concatenate(parts, axis=1)


def gather_tokens(table, layout, capacity: int):
  """Rows of `table` [B, P, F] for the first `capacity` tokens → ([B, C, F], valid [B, C])."""
  cells = layout["order"][:, :capacity]
  rows = jnp.take_along_axis(layout["table_index"], cells, axis=-1)
  valid = jnp.arange(capacity)[None, :] < layout["count"][:, None]
  rows = jnp.where(valid, rows, 0)  # padding reads row 0; it is masked everywhere
  return jnp.take_along_axis(table, rows[..., None], axis=1), valid


def unshare(values, leaf):
  """Token values [B, ..., C] → cell values [B, ..., N] through the leaf map [B, N]."""
  idx = leaf.reshape(leaf.shape[:1] + (1,) * (values.ndim - 2) + leaf.shape[1:])
  return jnp.take_along_axis(values, idx, axis=-1)


def bucket_capacities(n_full: int, fractions: Sequence[float], multiple: int = 16):
  """Sorted static capacities (token-count buckets); the last is always n_full."""
  caps = {min(n_full, max(multiple, math.ceil(f * n_full / multiple) * multiple))
          for f in fractions}
  return tuple(sorted(caps | {n_full}))


def bucket_index(count, capacities):
  """Index of the smallest capacity holding the largest token count of the batch."""
  return jnp.searchsorted(jnp.asarray(capacities), jnp.max(count), side="left")


def exit_capacities(caps, exit_buckets, limit=32):
  """The exit buckets after a first segment run in any of the capacities `caps` (supertokens,
  ALGM's merged tokens): every capacity the exit ladder gives inside each of them (so no exit
  bucket is larger than with the ladder relative to the image's own capacity), or, when that
  makes more than `limit` programs, the ladder relative to the largest capacity."""
  union = sorted({c for cap in caps
                  for c in bucket_capacities(cap, exit_buckets, multiple=8)})
  if len(union) <= limit:
    return tuple(union)
  return bucket_capacities(caps[-1], exit_buckets, multiple=8)
