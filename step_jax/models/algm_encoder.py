"""SegViT with ALGM's merges (models/algm.py) inside the encoder, in static capacity buckets.

The encoder runs in three segments, cut where the merges happen (between the attention
residual and the MLP of blocks l1 and l2, 1-based `Segmenter.algm_layers`):
  0. the full grid: blocks 1 .. l1-1 and block l1's attention; the local merge plan;
  1. the locally merged tokens: block l1's MLP, blocks l1+1 .. l2-1, block l2's attention;
     the global merge plan;
  2. the globally merged tokens: block l2's MLP and the blocks after it.
After a merge the tokens of an image lie compact in slots [0, count) of a full-size buffer;
segments 1 and 2 each run in the smallest capacity of the ladder that holds the batch's
largest count, chosen on device (`nn.switch`: one program per capacity; the two switches in
sequence, not nested). Padded slots are masked keys, have size 0 and are never matched.

Every out_layer's features are unmerged to the full grid (each cell gets its token's), so
SegViT's ATM head reads the grid as without merging. The plans carry no gradient (integers;
the reference computes them under torch.no_grad()); the merged values do.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import algm
from step_jax.models import supertokens


def _pad(a, n, value=0):
  """[B, c, ...] → [B, n, ...], padded with `value` after slot c."""
  widths = [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
  return jnp.pad(a, widths, constant_values=value)


def first_segment(mdl, tokens, grid, *, train):
  """Segment 0 on every patch token [B, N, D]: (x after block l1's attention, the local merge
  plan, {out_layer: features [B, N, D]} for the out_layers before l1)."""
  vit, (l1, _) = mdl.backbone, mdl.algm_layers
  outs = vit.run_blocks(tokens, None, 0, l1 - 1, train=train)
  x = vit.attend(l1 - 1, outs[-1] if outs else tokens, train=train)
  plan = algm.local_merge_plan(jax.lax.stop_gradient(x), grid, mdl.algm_threshold,
                               batch_min=mdl.algm_batch_min)
  return x, plan, {l: outs[l - 1] for l in mdl.out_layers if l < l1}


def merged_segment(mdl, x, size, plan, source, *, start, stop, capacity, train):
  """A segment after the merge in block `start` (1-based): x [B, N, D] and sizes [B, N] merged
  by `plan` into `capacity` slots; block `start`'s MLP and the blocks up to `stop` (the next
  merge's block, whose attention ends the segment and whose plan it returns; None: to the
  end). source [B, N]: cell → slot after this merge, for unmerging the out_layers.
  Returns (x, sizes, the next plan, all padded to N slots (None: no next merge),
  {out_layer: features [B, N, D]} for the out_layers from `start` to before `stop`)."""
  vit, n = mdl.backbone, x.shape[1]
  x, size, valid = algm.merge(x, size, plan, capacity)
  end = stop - 1 if stop else vit.depth
  outs = [vit.feed_forward(start - 1, x, train=train)]
  outs += vit.run_blocks(outs[0], valid, start, end, train=train)
  kept = {l: algm.unmerge(outs[l - start], source) for l in mdl.out_layers if start <= l <= end}
  x, next_plan = outs[-1], None
  if stop:
    x = vit.attend(stop - 1, x, valid, train=train)
    p = algm.global_merge_plan(jax.lax.stop_gradient(x), valid, stop,
                               batch_min=mdl.algm_batch_min,
                               min_similarity=mdl.algm_global_min
                               if mdl.algm_global_min > -1 else None)
    next_plan = algm.Plan(_pad(p.assign, n, -1), p.count)
  return _pad(x, n), _pad(size, n), next_plan, kept


def encode_decode(mdl, tokens, grid, capacity=None, *, train):
  """Patch tokens [B, N, D] → ViT with ALGM → SegViT's head on the unmerged out_layers;
  outputs per cell, with `stats` (algm_tokens [B, 2]: tokens after each merge; algm_capacity
  [2]: the capacity each merged segment ran in) and `token_maps` (algm_source_local,
  algm_source [B, N]: the slot each cell's token had after the local merge / the global
  merge). capacity: run both merged segments in it instead of the bucket chosen on device
  (it must hold every count)."""
  b, n, _ = tokens.shape
  l1, l2 = mdl.algm_layers
  if not 1 <= l1 < l2 <= mdl.backbone.depth or mdl.exit_layers:
    raise ValueError(f"merge='algm' needs algm_layers = (local, global) 1-based blocks with "
                     f"local < global <= depth {mdl.backbone.depth} and no exit_layers; got "
                     f"algm_layers={tuple(mdl.algm_layers)}, "
                     f"exit_layers={tuple(mdl.exit_layers)}")
  caps = (capacity,) if capacity else supertokens.bucket_capacities(n, mdl.buckets, multiple=8)
  x, plan, kept = first_segment(mdl, tokens, grid, train=train)
  size = jnp.ones((b, n), jnp.float32)
  source = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  counts, used, sources = [], [], []
  for start, stop in ((l1, l2), (l2, None)):
    source = algm.compose(source, plan)
    counts.append(plan.count)
    sources.append(source)
    run = functools.partial(merged_segment, start=start, stop=stop, train=train)
    if len(caps) == 1:
      idx = jnp.zeros((), jnp.int32)
      x, size, plan, more = run(mdl, x, size, plan, source, capacity=caps[0])
    else:
      idx = supertokens.bucket_index(plan.count, caps)
      branches = [functools.partial(run, capacity=c) for c in caps]
      x, size, plan, more = nn.switch(idx, branches, mdl, x, size, plan, source)
    used.append(jnp.asarray(caps, jnp.int32)[idx])
    kept.update(more)
  out = mdl.head([kept[l] for l in mdl.out_layers], None, train=train)
  return dict(out, stats=dict(algm_tokens=jnp.stack(counts, 1), algm_capacity=jnp.stack(used)),
              token_maps=dict(algm_source_local=sources[0], algm_source=sources[1]))
