"""ALGM token merging (Norouzi et al., "ALGM: Adaptive Local-then-Global Token Merging for
Efficient Semantic Segmentation with Plain Vision Transformers", CVPR 2024; semantics read from
tue-mps/algm-segmenter, code written here), in static shapes.

Both merges run inside a ViT block, between the attention residual and the MLP, on the block's
token features x [B, N, D]:
  * local (first merge layer, e.g. block 1): the grid is cut into 2x2 windows; a window's
    score is the mean cosine similarity of its 4 tokens over the 12 ordered pairs (self-pairs
    excluded); windows scoring >= `threshold` become one token;
  * global (a middle layer, e.g. block 5): ToMe's bipartite matching. The valid tokens, in
    slot order, alternate between set A (1st, 3rd, ...) and set B; each A token's best match
    is its most similar B token (cosine); A tokens whose best similarity is >= mean + std / i
    (over the image's A tokens; i = the block's 1-based index; std with Bessel's correction, as
    torch.std) merge into their match.
Merged features are size-weighted means (a token's size = the patches it covers), sizes add.

Where we differ from the reference, and why:
  * counts per image: the reference merges the same number of tokens in every image of a
    batch (the minimum over the batch of the images' counts; its global threshold is one
    scalar from batch means), so the easiest image sets the count for all. Here each image
    merges everything above its own threshold and runs in a capacity bucket (`batch_min=True`
    reproduces the reference's rule: every image merges its top-r);
  * order: after a merge the surviving tokens keep their relative slot order (a merged window
    sits at its top-left cell), where the reference puts merged windows first in order of
    similarity. Order changes which tokens fall in set A of the global merge, nothing else;
  * no class token (ours has none): the reference's global mean/std skip the first A token,
    which is its class token;
  * grids that are not a multiple of 2 merge only complete windows (the reference asserts).

A merge returns a `Plan`: for each input slot the output slot it goes to (`assign`, -1 for
padding) and the number of output tokens per image. `merge` applies a plan to features and
sizes in a static `capacity`; `compose` follows a source map (pixel cell -> slot) through a
plan, and `unmerge` copies every token back to the cells it covers, so the decoder sees the
full grid.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Plan(NamedTuple):
  assign: jax.Array   # [B, N] int32: output slot of each input slot, -1 for padding
  count: jax.Array    # [B] int32: output tokens per image


def _normalize(x):
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _survivor_slots(survives):
  """Output slot of every surviving input slot (their order kept), -1 elsewhere."""
  slot = jnp.cumsum(survives, axis=-1) - 1
  return jnp.where(survives, slot, -1).astype(jnp.int32)


def window_similarity(x, grid):
  """Mean pairwise cosine similarity (self-pairs excluded) of the tokens of every complete
  2x2 window: x [B, gh*gw, D] in raster order → [B, gh//2, gw//2]."""
  gh, gw = grid
  b, _, d = x.shape
  wh, ww = gh // 2, gw // 2
  f = _normalize(x).reshape(b, gh, gw, d)[:, :2 * wh, :2 * ww]
  f = f.reshape(b, wh, 2, ww, 2, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, wh, ww, 4, d)
  # Σ_{i≠j} cos_ij = |Σ_i f_i|² - Σ_i |f_i|² (unit vectors: the diagonal is 4).
  total = jnp.sum(jnp.square(f.sum(axis=3)), axis=-1)
  return (total - jnp.sum(jnp.square(f), axis=(3, 4))) / 12.0


def _top_r_mask(scores, eligible, batch_min):
  """Which entries merge: every eligible one (per image), or with `batch_min` the r
  highest-scoring entries of every image, r = the smallest eligible count in the batch."""
  if not batch_min:
    return eligible
  r = jnp.min(jnp.sum(eligible, axis=-1))
  order = jnp.argsort(-scores, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  return rank < r


def local_merge_plan(x, grid, threshold, *, batch_min=False):
  """Local merge of x [B, gh*gw, D] (every cell a valid token, raster order): windows whose
  score is >= threshold become one token at their top-left cell."""
  gh, gw = grid
  b = x.shape[0]
  sim = window_similarity(x, grid).reshape(b, -1)
  merged_win = _top_r_mask(sim, sim >= threshold, batch_min)
  wh, ww = gh // 2, gw // 2
  ii, jj = jnp.meshgrid(jnp.arange(gh), jnp.arange(gw), indexing="ij")
  in_window = (ii < 2 * wh) & (jj < 2 * ww)
  win = jnp.where(in_window, (ii // 2) * ww + jj // 2, 0).reshape(-1)       # [N]
  anchor = ((ii - ii % 2) * gw + (jj - jj % 2)).reshape(-1)                # window's top-left
  merged = merged_win[:, win] & in_window.reshape(-1)[None]                 # [B, N]
  survives = ~merged | (jnp.arange(gh * gw) == anchor)[None]
  slots = _survivor_slots(survives)
  assign = jnp.where(merged, jnp.take(slots, anchor, axis=1), slots)
  return Plan(assign, jnp.sum(survives, axis=-1).astype(jnp.int32))


def global_merge_plan(x, valid, layer, *, batch_min=False, min_similarity=None):
  """Global merge of x [B, C, D] with valid [B, C] (padding never matched): the adaptive
  bipartite matching of the module docstring at 1-based block `layer`. `min_similarity`
  (not in the reference) also requires a pair's similarity to reach it: above 1, nothing
  merges."""
  rank = jnp.cumsum(valid, axis=-1) - 1
  in_a = valid & (rank % 2 == 0)
  in_b = valid & (rank % 2 == 1)
  f = _normalize(x)
  sim = jnp.einsum("bid,bjd->bij", f, f)
  sim = jnp.where(in_a[:, :, None] & in_b[:, None, :], sim, -jnp.inf)
  best = jnp.max(sim, axis=-1)                                          # [B, C]
  match = jnp.argmax(sim, axis=-1)
  candidate = in_a & jnp.any(in_b, axis=-1, keepdims=True)            # A tokens with a B
  n = jnp.sum(candidate, axis=-1)
  vals = jnp.where(candidate, best, 0.0)
  mean = jnp.sum(vals, axis=-1) / jnp.maximum(n, 1)
  var = jnp.sum(jnp.where(candidate, jnp.square(best - mean[:, None]), 0.0), axis=-1)
  std = jnp.sqrt(var / jnp.maximum(n - 1, 1))
  if batch_min:   # the reference: one scalar threshold from the batch means
    threshold = jnp.mean(mean) + jnp.mean(std) / layer
  else:
    threshold = mean + std / layer
  eligible = candidate & (best >= jnp.reshape(threshold, (-1, 1)))
  if min_similarity is not None:
    eligible = eligible & (best >= min_similarity)
  merged = _top_r_mask(jnp.where(candidate, best, -jnp.inf), eligible, batch_min)
  survives = valid & ~merged
  slots = _survivor_slots(survives)
  assign = jnp.where(merged, jnp.take_along_axis(slots, match, axis=-1), slots)
  return Plan(assign, jnp.sum(survives, axis=-1).astype(jnp.int32))


def merge(x, size, plan, capacity):
  """Applies `plan` to x [B, N, D] and token sizes [B, N] (patches covered; 0 for padding):
  (x [B, capacity, D] size-weighted means, size [B, capacity], valid [B, capacity]). The
  capacity must hold every image's `plan.count` (a bucket chosen from it)."""
  ids = jnp.where(plan.assign >= 0, plan.assign, capacity)   # padding → a dropped slot
  w = size.astype(jnp.float32)
  seg = jax.vmap(lambda v, i: jax.ops.segment_sum(v, i, num_segments=capacity + 1))
  total = seg(x.astype(jnp.float32) * w[..., None], ids)[:, :capacity]
  new_size = seg(w, ids)[:, :capacity]
  valid = jnp.arange(capacity)[None] < plan.count[:, None]
  out = total / jnp.where(new_size > 0, new_size, 1.0)[..., None]
  return out.astype(x.dtype), new_size, valid


def compose(source, plan):
  """source [B, P] (cell → slot) followed by `plan`: cell → slot after the merge."""
  return jnp.take_along_axis(plan.assign, source, axis=-1)


def unmerge(x, source):
  """x [B, C, D] → [B, P, D]: every cell gets the token that covers it."""
  return jnp.take_along_axis(x, source[..., None], axis=1)
