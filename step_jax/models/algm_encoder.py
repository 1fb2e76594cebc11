"""SegViT with ALGM's merges (models/algm.py) inside the encoder, in static capacity buckets:
method=algm, and its two compositions, algm_dtop (early exits) and dcts_algm (supertokens).

method=algm (merge='algm'). The encoder runs in three segments, cut where the merges happen
(between the attention residual and the MLP of blocks l1 and l2, 1-based
`Segmenter.algm_layers`):
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

method=algm_dtop (merge='algm' with exit_layers; exit_head='segvit' only, exits at or after
the global merge's block l2). Segments 0 and 1 as above; segment 2 is Segmenter's staged
encoder (`first_block=l2`): the globally merged tokens, in their capacity, run block l2's MLP
and the blocks to the first exit, where SegViT's stage 0 rates the *merged* tokens (each once,
as the encoder's attention sees them) and the confident ones halt. A merged token is one
token: halting it halts every patch it covers. Later segments compact the active tokens into
the exit buckets. At the end every out_layer's features (a halted token's from its exit on),
the exits' masks and the halt stages are unmerged to the grid, and SegViT's head reads the
grid as in method=algm: with nothing halting it is method=algm.

method=dcts_algm (merge='dcts_algm'). ALGM's global merge over dCTS supertokens. Supertokens
no longer tile the grid in 2x2 windows of single patches, so ALGM's local merge has nothing
to work on; dCTS's merge takes its place (like it, it shares similar windows, but before the
encoder). The global merge in block l2 (algm_layers[1]) matches the valid supertokens
(padding never matched) with its adaptive threshold; a supertoken's size is the patches it
covers (k² for a k x k superpatch), so merged features are area-weighted means as in ALGM.
Before SegViT's head the merged tokens are unmerged to the supertoken slots (each slot gets
its merged token's features): the head reads the supertoken layout as with dCTS, and dCTS's
un-sharing takes its outputs to the grid. With nothing merging it is method=dcts. Two
switches in sequence: the supertoken capacity up to block l2's attention, then the merged
tokens' capacity.
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


def _in_bucket(mdl, fn, count, caps, *args):
  """(fn(mdl, *args, capacity=c), c) for c the smallest of `caps` that holds the batch's
  largest `count`, chosen on device (nn.switch: one program per capacity)."""
  if len(caps) == 1:
    return fn(mdl, *args, capacity=caps[0]), jnp.asarray(caps[0], jnp.int32)
  idx = supertokens.bucket_index(count, caps)
  out = nn.switch(idx, [functools.partial(fn, capacity=c) for c in caps], mdl, *args)
  return out, jnp.asarray(caps, jnp.int32)[idx]


def global_plan(mdl, x, valid, layer):
  """ALGM's global merge plan on x [B, C, D] after block `layer`'s attention (no gradient)."""
  return algm.global_merge_plan(jax.lax.stop_gradient(x), valid, layer,
                                batch_min=mdl.algm_batch_min,
                                min_similarity=mdl.algm_global_min
                                if mdl.algm_global_min > -1 else None)


def check(mdl):
  """Raises ValueError unless the Segmenter's ALGM fields fit its merge and exits."""
  l1, l2 = mdl.algm_layers
  exits, depth = tuple(mdl.exit_layers), mdl.backbone.depth
  if not 1 <= l1 < l2 <= depth or exits and (
      mdl.merge != "algm" or mdl.exit_head != "segvit" or exits[0] < l2):
    raise ValueError(f"merge={mdl.merge!r} needs algm_layers = (local, global) 1-based blocks "
                     f"with local < global <= depth {depth}, and exits only with merge='algm' "
                     f"and exit_head='segvit', at or after the global merge; got "
                     f"algm_layers={tuple(mdl.algm_layers)}, exit_layers={exits}, "
                     f"exit_head={mdl.exit_head!r}")


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
  end). source [B, N]: cell (or slot) → slot after this merge, for unmerging the out_layers.
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
    p = global_plan(mdl, x, valid, stop)
    next_plan = algm.Plan(_pad(p.assign, n, -1), p.count)
  return _pad(x, n), _pad(size, n), next_plan, kept


def encode_decode(mdl, tokens, grid, capacity=None, *, train):
  """Patch tokens [B, N, D] → ViT with ALGM (and exits: algm_dtop) → SegViT's head on the
  unmerged out_layers; outputs per cell, with `stats` (algm_tokens [B, 2]: tokens after each
  merge; algm_capacity [2]: the capacity each merged segment ran in; with exits also
  Segmenter.stage_finish's) and `token_maps` (algm_source_local, algm_source [B, N]: the slot
  each cell's token had after the local merge / the global merge; with exits halt_stage).
  capacity: run every merged segment in it instead of the bucket chosen on device (it must
  hold every count; the exits' buckets are then the ladder inside it)."""
  b, n, _ = tokens.shape
  check(mdl)
  l1, l2 = mdl.algm_layers
  caps = (capacity,) if capacity else supertokens.bucket_capacities(n, mdl.buckets, multiple=8)
  x, plan, kept = first_segment(mdl, tokens, grid, train=train)
  size = jnp.ones((b, n), jnp.float32)
  source = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
  counts, used, sources = [], [], []
  for start, stop in ((l1, l2), (l2, None)):
    source = algm.compose(source, plan)
    counts.append(plan.count)
    sources.append(source)
    if stop is None and mdl.exit_layers:   # algm_dtop: the staged encoder takes it from here
      break
    run = functools.partial(merged_segment, start=start, stop=stop, train=train)
    (x, size, plan, more), cap = _in_bucket(mdl, run, plan.count, caps, x, size, plan, source)
    used.append(cap)
    kept.update(more)
  if mdl.exit_layers:
    out = staged(mdl, x, size, plan, source, kept, caps, train=train)
    used.append(out["stats"]["stage_capacity"][0])
  else:
    out = dict(mdl.head([kept[l] for l in mdl.out_layers], None, train=train), stats={},
               token_maps={})
  return dict(out, stats=dict(out["stats"], algm_tokens=jnp.stack(counts, 1),
                              algm_capacity=jnp.stack(used)),
              token_maps=dict(out["token_maps"], algm_source_local=sources[0],
                              algm_source=sources[1]))


def exit_first_segment(mdl, x, size, plan, *, capacity, train):
  """algm_dtop's first staged segment, in `capacity` slots: x [B, N, D] and sizes after block
  l2's attention merged by the global `plan`, block l2's MLP, the blocks to the first exit
  and its rating of the merged tokens (Segmenter.stage_segment); the state padded to N."""
  l2 = mdl.algm_layers[1]
  x, _, valid = algm.merge(x, size, plan, capacity)
  x = mdl.backbone.feed_forward(l2 - 1, x, train=train)
  state = mdl.stage_segment(mdl.stage_init(x, valid), 0, (), train=train, first_block=l2)
  return mdl.pad_state(state, size.shape[1])


def staged(mdl, x, size, plan, source, kept, caps, *, train):
  """algm_dtop from block l2's attention on (see the module doc): the exits on the merged
  tokens (the first segment in the smallest of `caps` that holds them, later ones in the exit
  buckets inside those), then everything unmerged to the grid through `source` (cell → merged
  slot) for SegViT's head, which also reads the grid features `kept` before l2. Returns
  Segmenter.stage_finish's outputs, per cell."""
  l2 = mdl.algm_layers[1]
  state, _ = _in_bucket(mdl, functools.partial(exit_first_segment, train=train), plan.count,
                        caps, x, size, plan)
  exit_caps = supertokens.exit_capacities(caps, mdl.exit_buckets)
  for s in range(1, len(mdl.exit_layers) + 1):
    state = mdl.stage_segment(state, s, exit_caps, train=train, first_block=l2)
  to_cells = lambda a: jnp.take_along_axis(a, source.reshape(
      source.shape[:1] + (1,) * (a.ndim - 2) + source.shape[1:]), axis=-1)   # [B, ..., N]
  features = [kept[l] for l in mdl.out_layers if l < l2]
  features += [algm.unmerge(f, source) for f in state["features"]]
  state = dict(state, features=features, valid=None, halt_stage=to_cells(state["halt_stage"]),
               results=[dict(r, pred_masks=to_cells(r["pred_masks"])) for r in state["results"]])
  return mdl.stage_finish(state, train=train)


def supertoken_segment(mdl, x, layout, grid, *, slots, capacity, train):
  """dcts_algm's first segment, in `capacity` slots: the supertokens of `layout` (x: the
  normalised images), blocks 1 .. l2-1 and block l2's attention, and the global merge plan.
  Returns (x, sizes (patches each token covers), plan, valid, {out_layer: features} for the
  out_layers before l2), padded to `slots` (padding: invalid, size 0, assigned -1)."""
  vit, l2 = mdl.backbone, mdl.algm_layers[1]
  tokens, valid = mdl.embed_supertokens(x, layout, grid, capacity)
  outs = vit.run_blocks(tokens, valid, 0, l2 - 1, train=train)
  y = vit.attend(l2 - 1, outs[-1] if outs else tokens, valid, train=train)
  plan = global_plan(mdl, y, valid, l2)
  # Token i covers the cells whose leaf is i (padding none): its size for the merge's means.
  leaf = layout["leaf"]
  size = jax.vmap(lambda l: jax.ops.segment_sum(jnp.ones(l.shape, jnp.float32), l,
                                                num_segments=capacity))(leaf)
  kept = {l: _pad(outs[l - 1], slots) for l in mdl.out_layers if l < l2}
  return (_pad(y, slots), _pad(size, slots), algm.Plan(_pad(plan.assign, slots, -1), plan.count),
          _pad(valid, slots, False), kept)


def supertoken_encode_decode(mdl, x, layout, grid, caps, *, train):
  """dcts_algm (module doc): normalised images x and dCTS's token `layout` → supertokens in the
  smallest of `caps` that holds them → ALGM's global merge in block l2 → merged tokens in the
  smallest capacity of the bucket ladder that holds them (in caps[0] when caps is one forced
  capacity) → SegViT's head on the out_layers unmerged to the supertoken slots. Outputs per
  supertoken slot (the caller un-shares them), with `stats` (algm_tokens [B, 1]: tokens after
  the global merge; algm_capacity [1]: the capacity they ran in) and `token_maps`
  (algm_source [B, slots]: each supertoken's slot after the merge)."""
  check(mdl)
  l2, slots = mdl.algm_layers[1], caps[-1]
  run = functools.partial(supertoken_segment, grid=grid, slots=slots, train=train)
  (y, size, plan, valid, kept), _ = _in_bucket(mdl, run, layout["count"], caps, x, layout)
  # Padded slots read merged slot 0: the head's key mask drops them.
  source = jnp.maximum(plan.assign, 0)
  merged_caps = caps if len(caps) == 1 else supertokens.bucket_capacities(
      slots, mdl.buckets, multiple=8)
  run = functools.partial(merged_segment, start=l2, stop=None, train=train)
  (_, _, _, more), cap = _in_bucket(mdl, run, plan.count, merged_caps, y, size, plan, source)
  kept.update(more)
  out = mdl.head([kept[l] for l in mdl.out_layers], valid, train=train)
  return dict(out, stats=dict(algm_tokens=plan.count[:, None], algm_capacity=cap[None]),
              token_maps=dict(algm_source=source))
