"""The segmentation model: ViT encoder + ATM head (SegViT), with the hooks STEP builds on.

Data flow (docs/design.md §1): pixels → normalise → tokens [B, N, D] (+ key mask) → ViT blocks
→ ATM head on the outputs of `out_layers` → per-token class/mask logits → token grid
[B, Q, gh, gw] → bilinear upsampling of mask logits to pixels → class scores.

Models return `(outputs, info)`: `outputs` is what the losses consume; `info` carries maps for
analysis (token grid, supertoken level map, halt stages, bucket capacities).
"""
import functools
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from step_jax.models import algm_encoder
from step_jax.models import atm
from step_jax.models import early_exit
from step_jax.models import inputs
from step_jax.models import resize
from step_jax.models import supertokens
from step_jax.models import vit as vit_lib


# One home for the method defaults (configs, analysis tools and the trainer read them here).
TAU_6899 = (0.6, 0.8, 0.9, 0.9)     # dCTS thresholds for windows of 2, 4, 8, 16 patches
TAU_PRESETS = {"6899": TAU_6899, "4999": (0.4, 0.9, 0.9, 0.9)}   # the paper's τ-6899, τ-4999
# Token capacities as fractions of the full grid (supertokens and exits: 1/8 steps).
BUCKETS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
# Token merges (Segmenter.merge) that a policy net drives, and those that merge inside the
# encoder (ALGM; 'dcts_algm': ALGM's global merge over dCTS supertokens, algm_encoder.py).
POLICY_MERGES = ("cts", "dcts", "dcts_algm")
ENCODER_MERGES = ("algm", "dcts_algm")


def encoder_merge_layers(merge, algm_layers):
  """1-based blocks where `merge` merges tokens inside the encoder: ALGM's local and global
  merge ('algm'), the global one only ('dcts_algm': supertokens form no 2x2 windows), none
  otherwise."""
  if merge not in ENCODER_MERGES:
    return ()
  return tuple(algm_layers)[0 if merge == "algm" else 1:]


# Early-exit head designs (Segmenter.exit_head):
#   'segvit' (default): SegViT's own head, unchanged; an exit at layer e runs the head's stage 0
#     (the stage that reads the deepest features) on layer e's features with the initial
#     queries and halts confident tokens; a halted token keeps its layer-e features for every
#     later out_layer, and at the end SegViT's full head runs deepest first over active and
#     halted tokens. With nothing halting it IS SegViT (same parameters, same outputs), so a
#     trained SegViT becomes a STEP model by training the policy and fine-tuning with pruning.
#   'atm_shallow_first': SegViT's head stages run shallowest first as the encoder reaches
#     out_layers ∪ exit layers, the stages at exit layers serving as the exits (called 'atm'
#     before 2026-12; a different head from SegViT, also with nothing halting).
#   'dtop': DToP exactly (single-stage heads with binary class logits at the exits and on the
#     last block; the layout of DToP's released checkpoints); 'dtop_multiclass': the same with
#     SegViT's (C+1)-way class logits.
# Measured (CamVid, ViT-Ti/16 STEP@[8] from scratch, same recipe, budget, policy and seed;
# experiments/results/camvid_ti_step_*): at the end of BASE 'atm_shallow_first' scored 36.6 %
# val mIoU and 'dtop' 27.8 %; after pruning fine-tuning 37.0 % (0.1x lr) against 30.3 % (1x);
# SegViT 38.4 %.
EXIT_HEADS = ("segvit", "atm_shallow_first", "dtop", "dtop_multiclass")
DEFAULT_EXIT_HEAD = "segvit"
RENAMED_EXIT_HEADS = {"atm": "atm_shallow_first"}

HEAD_LAYERS = 3                     # decoder layers per ATM stage (SegViT, DToP)


class Segmenter(nn.Module):
  """SegViT (plain ViT + ATM head), optionally on supertokens (CTS / dCTS).

  Attributes:
    backbone: the ViT encoder.
    head: ATM head with `num_stages == len(out_layers)`.
    out_layers: 1-based block indices feeding the head, shallowest first (ViT-B: 6, 8, 12).
    pixel_mean, pixel_std: input normalisation; the model takes raw pixels in [0, 255].
    merge: token sharing: 'none' (plain ViT), 'dcts' (policy scores vs per-size
      thresholds), 'cts' (top-K 2x2 windows), 'oracle' (windows pure in the labels),
      'algm' (ALGM's local and global merges inside the encoder: models/algm_encoder.py),
      'dcts_algm' (dCTS supertokens, then ALGM's global merge over them inside the encoder).
    thresholds: τ for window sizes (2, 4, 8, 16) patches (dCTS, e.g. τ-6899 = .6 .8 .9 .9).
    cts_shared: K, the number of shared 2x2 windows in CTS mode (103 at 512²); a value in
      (0, 1) is a share of the grid's 2x2 windows instead (0.4 ≈ 103/256 at any size).
    superpatch_resize: 'area' or 'bilinear' (PyTorch, no antialias), see supertokens.py.
    buckets: token capacities as fractions of the full grid; the smallest that holds the
      batch's largest token count is selected on device (`lax.switch`), so only these shapes
      are ever compiled and fewer tokens really cost less.
    policy: module mapping pixels to {k: logits [B, H/(16k), W/(16k)]} (dcts/cts).
    exit_layers: 1-based blocks after which tokens may halt (DToP/STEP, e.g. (6, 8) for
      ViT-B); empty = no early exit. With DToP exit heads, `head` is the final DToP head (one
      stage) on block `out_layers == (depth,)`; otherwise it is SegViT's head.
    exit_heads: DToP: one single-stage ATM head per exit layer.
    exit_head: one of EXIT_HEADS (see the table there and `staged`): 'segvit' (SegViT's head
      unchanged, its stage 0 deciding at the exits), 'atm_shallow_first', 'dtop',
      'dtop_multiclass'.
    exit_threshold: confidence τ above which tokens halt (per exit, or one for all).
    exit_mode: 'mask' (halted tokens masked in place) or 'compact' (active tokens gathered
      into the smallest capacity bucket of `exit_buckets` at every exit).
    keep_top_k: DToP keeps the k most confident halting candidates per class as context.
    algm_layers: ALGM: 1-based blocks of the local and the global merge (Ti/S/B: 1, 5);
      'dcts_algm' uses the global one only.
    algm_threshold: ALGM: the local merge's window similarity threshold (Ti .90).
    algm_global_min: ALGM: a minimum similarity for the global merge on top of its adaptive
      threshold (-1: none, as the reference; above 1 nothing merges).
    algm_batch_min: ALGM: every image merges as many tokens as the image of the batch that
      merges fewest (the reference) instead of its own count.
  """
  backbone: vit_lib.ViT
  head: atm.ATMHead
  out_layers: Sequence[int]
  pixel_mean: Sequence[float] = (127.5, 127.5, 127.5)
  pixel_std: Sequence[float] = (127.5, 127.5, 127.5)
  merge: str = "none"
  thresholds: Sequence[float] = TAU_6899
  cts_shared: float = 0
  superpatch_resize: str = "area"
  buckets: Sequence[float] = (1.0,)
  ignore_index: int = 255
  policy: Optional[nn.Module] = None
  exit_layers: Sequence[int] = ()
  exit_heads: Sequence[nn.Module] = ()
  exit_threshold: Union[float, Sequence[float]] = 1.0
  exit_mode: str = "compact"
  exit_head: str = DEFAULT_EXIT_HEAD
  keep_top_k: int = 5
  exit_buckets: Sequence[float] = BUCKETS
  algm_layers: Sequence[int] = (1, 5)
  algm_threshold: float = 0.9
  algm_global_min: float = -1.0
  algm_batch_min: bool = False

  def normalize(self, images):
    inputs.check_images(images)
    x = (images.astype(jnp.float32) - jnp.asarray(self.pixel_mean)) / jnp.asarray(self.pixel_std)
    return x.astype(self.backbone.dtype)

  def grid(self, images):
    p = self.backbone.patch_size
    h, w = images.shape[1:3]
    if h % p or w % p:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}; "
                       "resize or pad the input first (evaluate.py pads to the patch grid)")
    return h // p, w // p

  def merge_scores(self, images, labels=None):
    """{k: [B, gh//k, gw//k]} window scores in [0, 1] that drive the merge."""
    if self.merge == "oracle":
      if labels is None:
        raise ValueError("merge='oracle' needs the labels: call model(images, labels=...)")
      return {k: (supertokens.window_purity(labels, k, self.backbone.patch_size,
                                            self.ignore_index) == 1).astype(jnp.float32)
              for k in supertokens.SIZES}
    if self.policy is None:
      raise ValueError(f"merge={self.merge!r} needs a policy network")
    logits = self.policy(images)
    # The policy is trained separately and frozen here (hard selection has no gradient).
    return {k: jax.nn.sigmoid(jax.lax.stop_gradient(v.astype(jnp.float32)))
            for k, v in logits.items()}

  @property
  def shares_tokens(self):
    """Whether tokens are shared before the encoder (CTS, dCTS, oracle: supertokens, their
    count known from the merge alone). ALGM merges inside the encoder: its input is every
    patch, as without a merge."""
    return self.merge not in ("none", "algm")

  @property
  def merges_in_encoder(self):
    """Whether ALGM's merges run inside the encoder (their token counts known only there)."""
    return self.merge in ENCODER_MERGES

  def merge_levels(self, images, labels=None):
    """Level map [B, gh, gw]: side (in patches) of the superpatch covering each cell."""
    grid = self.grid(images)
    scores = self.merge_scores(images, labels)
    if self.merge == "cts":
      return supertokens.cts_levels(scores[2], self.num_shared(grid), grid)
    if len(self.thresholds) != len(supertokens.SIZES):
      raise ValueError(f"thresholds={tuple(self.thresholds)} needs one τ per window size "
                       f"{supertokens.SIZES}")
    tau = dict(zip(supertokens.SIZES, self.thresholds))
    return supertokens.merge_levels({k: scores[k] for k in supertokens.SIZES}, tau, grid)

  def num_shared(self, grid):
    """CTS's K on this grid: `cts_shared` windows, or that share of the 2x2 windows."""
    if 0 < self.cts_shared < 1:
      return max(1, round(self.cts_shared * (grid[0] // 2) * (grid[1] // 2)))
    return int(self.cts_shared)

  def capacities(self, grid):
    n = grid[0] * grid[1]
    if self.merge == "cts":  # fixed token count: one exact bucket
      return (n - 3 * self.num_shared(grid),)
    return supertokens.bucket_capacities(n, self.buckets)

  def encode_decode(self, x, key_mask, *, train):
    """Tokens [B, C, D] (+ key mask) → ViT → ATM head(s); outputs per token.

    Without exits: SegViT's multi-stage head on `out_layers`. With exits: the staged
    encoder. `token_maps` holds per-token maps that the caller un-shares to the grid.
    """
    if not self.exit_layers:
      outs = self.backbone.run_blocks(x, key_mask, train=train)
      out = self.head([outs[i - 1] for i in self.out_layers], key_mask, train=train)
      return dict(out, token_maps={}, stats={})
    return self.staged(x, key_mask, train=train)

  def stage_layers(self):
    """1-based blocks after which a head stage runs during the encoder, shallowest first:
    'segvit': the exits (SegViT's stage 0 deciding; the full head runs at the end);
    'atm_shallow_first': SegViT's `out_layers`, which include the exits; DToP: its exit heads
    and its final head."""
    if self.exit_head == "segvit":
      return tuple(self.exit_layers)
    if self.exit_head == "atm_shallow_first":
      return tuple(self.out_layers)
    return tuple(self.exit_layers) + (self.backbone.depth,)

  def head_stage(self, i, q, y, key_mask, train):
    """Head stage i on block outputs y: (queries, class logits [B, Q, K], masks [B, Q, N]).

    'segvit': exit i is SegViT's stage 0 (its deepest-feature stage) with the initial queries;
    the queries carried (q) are not touched. 'atm_shallow_first': stage i of the one SegViT
    head, queries carried over from stage i - 1. DToP: the independent head i (exit heads,
    then the final head); no queries are carried (q None).
    """
    if self.exit_head == "segvit":
      q0, masks = self.head.stage(0, self.head.initial_queries(y.shape[0]), y, key_mask,
                                  train=train)
      return q, self.head.classify(q0), masks
    if self.exit_head == "atm_shallow_first":
      q, masks = self.head.stage(i, q, y, key_mask, train=train)
      return q, self.head.classify(q), masks
    out = (list(self.exit_heads) + [self.head])[i]([y], key_mask, train=train)
    return q, out["pred_logits"], out["pred_masks"]

  def kept_layers(self, start, stop, first=False):
    """out_layers in blocks (start, stop] whose features the 'segvit' design keeps for the
    final head; [start, stop] for the `first` segment, whose input is block `start`'s output
    (ALGM with exits starts the staged encoder after block `start`, see algm_encoder)."""
    if self.exit_head != "segvit":
      return ()
    return tuple(l for l in self.out_layers if start - first < l <= stop)

  def run_segment(self, x, q, active, start, stop, stages, capacity, train, first=False):
    """Blocks [start, stop) (0-based; x is block `start`'s 1-based output) and the head stages
    `stages` ((index, layer) pairs, start <= layer <= stop) on the active tokens.

    capacity None: every token in place, halted ones hidden by the key mask. Otherwise the
    active tokens are gathered into `capacity` slots, run, and scattered back. Halted tokens
    keep their features (x) as they were when they halted.
    Returns (x [B, N, D], queries, [(class logits [B, Q, K], mask logits [B, Q, N]), ...],
    [features [B, N, D] at each of `kept_layers(start, stop, first)`]).
    """
    if capacity is None:
      xs, sub = x, active
      back = lambda y: jnp.where(active[..., None], y, x)
    else:
      idx, sub = early_exit.compact_indices(active, capacity)
      xs = early_exit.gather(x, idx)
      back = lambda y: early_exit.scatter(x, y, idx, sub)
    # outs[k]: block start + k's output (outs[0] the input: a segment may have no blocks).
    outs = [xs] + self.backbone.run_blocks(xs, sub, start, stop, train=train)
    results = []
    for i, layer in stages:
      q, cls, masks = self.head_stage(i, q, outs[layer - start], sub, train)
      if capacity is not None:  # halted tokens get zeros; the canvas never reads them
        n = x.shape[1]
        masks = jnp.swapaxes(early_exit.scatter(
            jnp.zeros((x.shape[0], n, masks.shape[1]), jnp.float32),
            jnp.swapaxes(masks, 1, 2), idx, sub), 1, 2)
      results.append((cls, masks))
    kept = [back(outs[layer - start]) for layer in self.kept_layers(start, stop, first)]
    return back(outs[-1]), q, results, kept

  def staged(self, x, key_mask, *, train):
    """Early exit: encoder segments separated by exits; confident tokens halt (leave the
    queries and keys of every later block).

    'segvit': at each exit SegViT's stage 0 (fresh queries) rates the active tokens; a halted
    token keeps its features from then on, so every later out_layer sees them as they were
    at its exit; the final prediction is SegViT's head (deepest first) over all tokens, so
    with nothing halting this is SegViT. The exits' predictions (a canvas: halted tokens keep
    the masks of the exit they halted at) are auxiliary outputs for the loss.
    'atm_shallow_first': SegViT's head stages at `out_layers` run shallowest first as the
    encoder reaches them; the stages at exit layers are the exits, queries carry over and
    masks add up; halted tokens keep the masks summed so far.
    'dtop'/'dtop_multiclass': DToP, an independent single-stage head at each exit and after
    the last block, each writing its masks on the canvas (halted tokens keep their exit's).
    """
    state = self.stage_init(x, key_mask)
    caps = supertokens.bucket_capacities(x.shape[1], self.exit_buckets, multiple=8)
    for s in range(len(self.exit_layers) + 1):
      state = self.stage_segment(state, s, caps, train=train)
    return self.stage_finish(state, train=train)

  def num_predictions(self):
    """Predictions one forward returns: the final one plus its `aux` list (deep
    supervision), so the loss terms are known without tracing the model."""
    if not self.exit_layers:
      return self.head.num_stages
    if self.exit_head == "segvit":
      return self.head.num_stages + len(self.exit_layers)
    return len(self.stage_layers())

  def exit_output_index(self, s):
    """Index in `outputs['aux']` of the prediction exit s halts on."""
    if self.exit_head == "atm_shallow_first":
      return list(self.out_layers).index(self.exit_layers[s])
    return s

  def exit_thresholds(self):
    """One threshold per exit (exit_threshold may be one value for all)."""
    taus = self.exit_threshold
    return tuple(taus) if isinstance(taus, (tuple, list)) else (taus,) * len(self.exit_layers)

  def check_stages(self):
    depth = self.backbone.depth
    if self.exit_head not in EXIT_HEADS:
      raise ValueError(f"exit_head={self.exit_head!r}: use one of {EXIT_HEADS}")
    if self.exit_head in ("segvit", "atm_shallow_first"):
      layers = tuple(self.out_layers)
      if list(layers) != sorted(set(layers)) or layers[-1] != depth or self.exit_heads or (
          self.exit_head == "atm_shallow_first" and not set(self.exit_layers) <= set(layers)):
        need = " that include exit_layers" if self.exit_head == "atm_shallow_first" else ""
        raise ValueError(f"exit_head={self.exit_head!r} needs increasing out_layers ending at "
                         f"the depth {depth}{need} and no DToP exit heads; got "
                         f"out_layers={layers}, exit_layers={tuple(self.exit_layers)}")
    elif tuple(self.out_layers) != (depth,) or len(self.exit_heads) != len(self.exit_layers):
      raise ValueError(f"early exit needs out_layers == ({depth},) and one exit head per exit "
                       f"layer; got out_layers={tuple(self.out_layers)}, "
                       f"{len(self.exit_heads)} heads for exit_layers={tuple(self.exit_layers)}")
    if self.exit_mode not in ("compact", "mask"):
      raise ValueError(f"exit_mode={self.exit_mode!r}: use 'mask' or 'compact'")

  def stage_init(self, x, key_mask):
    """The state the staged encoder carries from segment to segment (arrays only, so that it
    can leave a lax.switch branch): tokens, queries, valid/active and halt maps, the canvas,
    the head stages' outputs so far, the kept out_layer features ('segvit'), active counts
    and capacities per segment."""
    self.check_stages()
    b, n, _ = x.shape
    valid = jnp.ones((b, n), bool) if key_mask is None else key_mask
    return dict(x=x, q=self.head.initial_queries(b) if self.exit_head == "atm_shallow_first"
                else None, valid=valid, active=valid,
                halt_stage=jnp.full((b, n), len(self.exit_layers), jnp.int32),
                canvas=jnp.zeros((b, self.head.num_classes, n), jnp.float32),
                results=[], features=[], counts=[], caps=[])

  def stage_segment(self, state, s, caps, *, train, first_block=0):
    """Runs segment s (the blocks up to exit s, or to the end) and its head stages; in compact
    mode after the first exit, the active tokens in the smallest of `caps` that holds them.
    first_block: the 1-based block whose output the staged encoder starts from (0: the
    embedded tokens; ALGM with exits: the global merge's block, see algm_encoder)."""
    depth = self.backbone.depth
    layers = self.stage_layers()
    bounds = (first_block,) + tuple(self.exit_layers) + (depth,)
    taus = self.exit_thresholds()
    state = dict(state, results=list(state["results"]), features=list(state["features"]),
                 counts=list(state["counts"]), caps=list(state["caps"]))
    x, q, active, canvas = state["x"], state["q"], state["active"], state["canvas"]
    n = x.shape[1]
    state["counts"].append(jnp.sum(active, axis=-1))
    first = s == 0   # the first segment's input is block bounds[0]'s output: its layer too
    stages = tuple((i, l) for i, l in enumerate(layers)
                   if bounds[s] - first < l <= bounds[s + 1])
    run = functools.partial(Segmenter.run_segment, start=bounds[s], stop=bounds[s + 1],
                            stages=stages, train=train, first=first)
    if self.exit_mode == "compact" and s > 0 and len(caps) > 1:
      idx = supertokens.bucket_index(state["counts"][-1], caps)
      branches = [functools.partial(run, capacity=c) for c in caps]
      x, q, outs, kept = nn.switch(idx, branches, self, x, q, active)
      state["caps"].append(jnp.asarray(caps, jnp.int32)[idx])
    elif self.exit_mode == "compact" and s > 0 and caps and caps[0] < n:
      # One capacity chosen by the caller (host dispatch: it holds every active token).
      x, q, outs, kept = run(self, x, q, active, capacity=caps[0])
      state["caps"].append(jnp.asarray(caps[0], jnp.int32))
    else:
      x, q, outs, kept = run(self, x, q, active, capacity=None)
      state["caps"].append(jnp.asarray(n, jnp.int32))
    state["features"].extend(kept)
    for cls, masks in outs:
      new = canvas + masks if self.exit_head == "atm_shallow_first" else masks
      canvas = jnp.where(active[:, None, :], new, canvas)   # halted tokens keep theirs
      state["results"].append(dict(pred_logits=cls, pred_masks=canvas))
    if s < len(self.exit_layers):
      halt = early_exit.halting(jax.lax.stop_gradient(outs[-1][0]),
                                jax.lax.stop_gradient(canvas), active, taus[s],
                                self.keep_top_k)
      state["halt_stage"] = jnp.where(halt, s, state["halt_stage"])
      active = active & ~halt
    return dict(state, x=x, q=q, active=active, canvas=canvas)

  def stage_finish(self, state, *, train=False):
    """The staged outputs: 'segvit' runs SegViT's head over the kept features of every valid
    token (its predictions first, the exits' as further aux); the other designs' last head
    stage is the final prediction."""
    results = state["results"]
    if self.exit_head == "segvit":
      out = self.head(state["features"], state["valid"], train=train)
      out = dict(out, aux=list(results) + list(out["aux"]))
    else:
      out = dict(results[-1], aux=results[:-1])
    return dict(out, token_maps=dict(halt_stage=state["halt_stage"]),
                stats=dict(active_tokens=jnp.stack(state["counts"], 1),
                           stage_capacity=jnp.stack(state["caps"])))

  def embed_supertokens(self, x, layout, grid, capacity):
    """(tokens [B, capacity, D], valid [B, capacity]): the superpatches of `layout`, resized
    to one patch and embedded, with their area-pooled position embeddings."""
    p = self.backbone.patch_size
    patches, valid = supertokens.gather_tokens(
        supertokens.pyramid_table(x, p, self.superpatch_resize), layout, capacity)
    pos_table = supertokens.pyramid_table(self.backbone.posemb(grid)[None], 1, "area")
    pos, _ = supertokens.gather_tokens(
        jnp.broadcast_to(pos_table, (x.shape[0],) + pos_table.shape[1:]), layout, capacity)
    return self.backbone.embed_patches(patches) + pos, valid

  def run_supertokens(self, x, layout, grid, capacity, train):
    """Gathers `capacity` supertokens, runs the network, un-shares masks to the grid."""
    tokens, valid = self.embed_supertokens(x, layout, grid, capacity)
    return self.unshare_outputs(self.encode_decode(tokens, valid, train=train), layout)

  def unshare_outputs(self, out, layout):
    """Per-token outputs → per-cell (every cell takes its supertoken's)."""
    unshare = lambda o: dict(pred_logits=o["pred_logits"],
                             pred_masks=supertokens.unshare(o["pred_masks"], layout["leaf"]))
    return dict(unshare(out), aux=[unshare(o) for o in out["aux"]], stats=out["stats"],
                token_maps={k: supertokens.unshare(v, layout["leaf"])
                            for k, v in out["token_maps"].items()})

  def first_segment(self, x, layout, grid, capacity, slots, train):
    """Supertokens in `capacity` slots through the blocks up to the first exit, the state
    then padded to `slots` (the largest capacity), so that the later segments, with their own
    exit buckets, run outside this capacity's branch."""
    tokens, valid = self.embed_supertokens(x, layout, grid, capacity)
    state = self.stage_segment(self.stage_init(tokens, valid), 0, (), train=train)
    return self.pad_state(state, slots)

  def pad_state(self, state, slots):
    """The staged state of tokens in a capacity, padded to `slots` token slots (invalid), or
    cut back to its first `slots` (the host dispatch runs the later segments on one padded
    size and cuts the state back to the supertokens' capacity for the head)."""
    def fit(a, axis, value=0):
      if slots <= a.shape[axis]:
        return jax.lax.slice_in_dim(a, 0, slots, axis=axis)
      widths = [(0, 0)] * a.ndim
      widths[axis] = (0, slots - a.shape[axis])
      return jnp.pad(a, widths, constant_values=value)
    last = lambda a, value=0: fit(a, a.ndim - 1, value)
    return dict(state, x=fit(state["x"], 1), features=[fit(f, 1) for f in state["features"]],
                valid=last(state["valid"], False), active=last(state["active"], False),
                canvas=last(state["canvas"]),
                halt_stage=last(state["halt_stage"], len(self.exit_layers)),
                results=[dict(r, pred_masks=last(r["pred_masks"])) for r in state["results"]])

  def exit_capacities(self, grid):
    """The capacities of the segments after the first exit (one program and host dispatch
    alike): the exit ladder inside each supertoken capacity (supertokens.exit_capacities),
    or relative to the grid without token sharing."""
    if not self.shares_tokens:
      return supertokens.bucket_capacities(grid[0] * grid[1], self.exit_buckets, multiple=8)
    return supertokens.exit_capacities(self.capacities(grid), self.exit_buckets)

  def token_count(self, images, labels=None):
    """(level map [B, gh, gw], supertokens per image [B]): the merge alone, for callers that
    choose the capacity on the host (evaluation.dispatch)."""
    level = self.merge_levels(images, labels)
    return level, supertokens.token_layout(level)["count"]

  def begin_staged(self, images, level, capacity, slots=None):
    """Host-dispatched early exit, first program: tokens (supertokens of `level` in `capacity`
    slots, or every patch) through the blocks up to the first exit; the staged state, padded
    to `slots` (default: capacity) so that the later segments' programs do not depend on the
    supertoken capacity."""
    if self.merges_in_encoder:   # (evaluation.dispatch runs these in one program)
      raise ValueError(f"merge={self.merge!r} merges inside the encoder: no host-dispatched "
                       "early exit; call the model")
    x = self.normalize(images)
    grid = self.grid(images)
    if self.merge == "none":
      tokens = self.backbone.embed(x).reshape(x.shape[0], grid[0] * grid[1], -1)
      return self.stage_segment(self.stage_init(tokens, None), 0, (), train=False)
    layout = supertokens.token_layout(level)
    return self.first_segment(x, layout, grid, capacity, slots or capacity, False)

  def continue_staged(self, state, s, capacity):
    """Segment s of a host-dispatched early exit, its active tokens in `capacity` slots."""
    return self.stage_segment(state, s, (capacity,), train=False)

  def end_staged(self, state, images, level, capacity=None):
    """The last program of a host-dispatched early exit: (outputs, info) as __call__'s;
    capacity: the supertokens' (the state is cut back to it from begin_staged's slots)."""
    grid = self.grid(images)
    if capacity is not None and capacity < state["x"].shape[1]:
      state = self.pad_state(state, capacity)
    out, info = self.stage_finish(state), dict(grid=grid)
    if self.merge != "none":
      layout = supertokens.token_layout(level)
      out = self.unshare_outputs(out, layout)
      info.update(level=level, num_tokens=layout["count"], capacity=state["caps"][0])
    return self.assemble(out, info, images.shape[0], grid)

  def assemble(self, out, info, b, grid):
    """Per-cell outputs → (outputs on the patch grid, info with the stats and token maps)."""
    to_grid = lambda o: dict(pred_logits=o["pred_logits"],
                             pred_masks=o["pred_masks"].reshape(b, -1, *grid))
    outputs = to_grid(out)
    outputs["aux"] = [to_grid(o) for o in out["aux"]]
    info.update(out["stats"])
    info.update({k: v.reshape(b, *grid) for k, v in out["token_maps"].items()})
    return outputs, info

  @nn.compact
  def __call__(self, images, *, train=False, labels=None, capacity=None, level=None):
    """images [B, H, W, 3] in [0, 255] → (outputs, info).

    outputs: pred_logits [B, Q, K]; pred_masks [B, Q, gh, gw] mask logits on the patch grid;
      aux: list of the same for earlier head stages (deep supervision).
    info: grid; with token sharing also the level map, tokens per image and the capacity used;
      with exits the halt stage per cell, active tokens and capacity per stage; with ALGM
      the tokens after each merge, the capacities and source maps (algm_encoder).
    capacity: force one token capacity instead of the on-device bucket choice (ALGM: for
      every merged segment; with exits, their ladder inside it).
    level: the merge's level map when already computed (token_count), skipping the policy.
    """
    x = self.normalize(images)   # checks shape and dtype first: their errors say more
    grid = self.grid(images)
    b = images.shape[0]
    info = dict(grid=grid)
    if not self.shares_tokens:
      tokens = self.backbone.embed(x).reshape(b, grid[0] * grid[1], -1)
      out = (algm_encoder.encode_decode(self, tokens, grid, capacity, train=train)
             if self.merge == "algm" else self.encode_decode(tokens, None, train=train))
    else:
      level = self.merge_levels(images, labels) if level is None else level
      layout = supertokens.token_layout(level)
      caps = (capacity,) if capacity else self.capacities(grid)
      idx = (jnp.zeros((), jnp.int32) if len(caps) == 1
             else supertokens.bucket_index(layout["count"], caps))
      if self.merge == "dcts_algm":
        out = self.unshare_outputs(algm_encoder.supertoken_encode_decode(
            self, x, layout, grid, caps, train=train), layout)
      elif len(caps) == 1:
        out = self.run_supertokens(x, layout, grid, caps[0], train)
      elif self.exit_layers and self.exit_mode == "compact":
        # Two switches in sequence, not nested: the supertoken capacity covers the blocks up
        # to the first exit, the exit buckets the rest, so len(caps) + len(exit caps)
        # segment programs compile instead of len(caps) x len(exit caps).
        slots = caps[-1]
        branches = [functools.partial(Segmenter.first_segment, grid=grid, capacity=c,
                                      slots=slots, train=train) for c in caps]
        state = nn.switch(idx, branches, self, x, layout)
        exit_caps = self.exit_capacities(grid)
        for s in range(1, len(self.exit_layers) + 1):
          state = self.stage_segment(state, s, exit_caps, train=train)
        out = self.unshare_outputs(self.stage_finish(state, train=train), layout)
      else:
        branches = [functools.partial(Segmenter.run_supertokens, grid=grid, capacity=c,
                                      train=train) for c in caps]
        out = nn.switch(idx, branches, self, x, layout)
      info.update(level=level, num_tokens=layout["count"],
                  capacity=jnp.asarray(caps, jnp.int32)[idx])
    return self.assemble(out, info, b, grid)


def upsample_masks(mask_logits, out_hw):
  """Bilinear (PyTorch align_corners=False) upsampling of [B, Q, h, w] logits to out_hw."""
  return resize.resize_2d(mask_logits, out_hw, "bilinear", axes=(-2, -1))


def predict_scores(outputs, out_hw):
  """Per-pixel class scores [B, H, W, C] (SegViT: upsample mask logits, then combine)."""
  masks = upsample_masks(outputs["pred_masks"], out_hw)
  return jnp.moveaxis(atm.semantic_scores(outputs["pred_logits"], masks), 1, -1)
