"""Inference with token buckets chosen on the host and compiled on first use.

The one-program model (`Segmenter.__call__`) picks its bucket on device with `lax.switch`, so
every capacity of the ladder is compiled up front, whether or not an image ever needs it: a
fine ladder, the only kind that wastes little, costs a compile time that grows with its
length. `HostBuckets` splits the forward where the token count becomes known: the merge runs
first and its count is read back; the batch then runs in a capacity that holds it; with
compacting exits, each later segment is a program of its own, run in a capacity that holds
the tokens still active. Every (program, capacity) pair is compiled the first time a batch
needs it and kept. The state leaves the first segment padded to the grid's slots and the
exit capacities do not depend on the supertoken capacity, so a later segment compiles once
per exit capacity, not once per (supertoken capacity, exit capacity) pair. The price is one
device→host read per segment, small next to a ViT forward at the resolutions STEP is for;
outputs equal the one-program model's.

Which capacities: without `plan_ratio`, the smallest of the model's ladder (e.g.
`capacity.geometric_buckets(1.05)`, padding ≤ 5 % per image). With it, `HostBuckets.run`
takes a pool of calls and passes all of them through a program before any goes on to the
next, so each program's token counts are known before it runs: `plan_capacities` then
places the fewest new capacities on those counts such that the pool's padding in that
program stays within the ratio. A ladder must put rungs where no count falls; the plan puts
them where the counts are, and fewer of them bound the same padding.

`group_by_tokens` orders images so that a batch holds images of similar token counts, which
keeps the batch's capacity (set by its largest count) close to every image's own.

Several processes (jax.distributed, a batch split over them): every count is read as the
whole batch's, gathered from all processes (`host_value`), so each process picks (or plans,
from the same counts) the same capacities and compiles and runs the same programs, as SPMD
requires.
"""
import time

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from step_jax.models import capacity
from step_jax.models import segmenter as segmenter_lib


# Where the capacity buckets are chosen (`model.bucket_dispatch`): in the one jitted program
# by lax.switch, on the host (HostBuckets), or on the host with each image in its own
# capacity after the first exit (HostBuckets(split_exits=True)).
DISPATCHES = ("device", "host", "host_split")
CHOICES = ("auto",) + DISPATCHES   # what config.eval.dispatch and step-segment accept

# config.eval.dispatch='auto' (the evaluation and step-segment default) picks the host for
# every model whose token counts vary, measured on a quiet 2-core CPU (Intel Xeon), ViT-B/16,
# 8 CamVid val images at 1024², trained CamVid policy, random ViT/heads (exits calibrated to
# halt 40 %), seconds per image (compile seconds), experiments/results/eval_dispatch_cpu/
# {dcts,step}_b16_1024_reuse.jsonl (a ladder then, before capacities were planned):
#   dCTS  batch 1: device 5.79 (37.0)  host       5.82 (7.9);  batch 8: 9.48 (19.5) vs 7.69 (9.8)
#   STEP  batch 1: device 4.83 (39.2)  host_split 5.29 (19.4); batch 8: 8.70 (39.3) vs 6.82 (13.0)
# At the default evaluation batch (8) the host is 19-22 % faster per image and compiles 2-3×
# faster (only the capacities the data needs); at batch 1 it is level (dCTS) or 9 % slower
# (STEP: each segment's read-back), which its shorter compile repays on splits up to ~40
# images. Executed/useful GFLOPs: 1.03-1.08 on the host, 1.04-1.30 on the device (the 1/8
# exit ladder at batch 8). Over a whole split the host compiles every capacity the data
# needs: with a fixed ladder (state padded to the grid, capacity.exit_ladder) the 101 CamVid
# val frames at 1024², STEP B/16, compiled 128 s against the one program's 91 s at batch 1
# (50 programs). Evaluation and step-segment plan the capacities over pools of
# evaluator.POOL_IMAGES images (HostBuckets.run, plan_capacities) instead: the same frames
# compile 35 programs in 86 s against the one program's 102 s at batch 1 (executed/useful
# 1.040) and 33 in 79 s against 107 s at batch 8 (grouped; 1.051), measured one after the
# other (experiments/results/host_compile_cpu/b16_planned.py). A training's periodic
# evaluations compile once; a persistent compilation cache (JAX_COMPILATION_CACHE_DIR) loads
# the programs on later runs. Unmeasured on a GPU, where each read-back costs a host sync.
AUTO_RATIO = 1.05   # the host's padding bound under 'auto' (≤ 5 % per program and pool)


def resolve(model, dispatch, bucket_ratio):
  """(dispatch, bucket ratio) to run `model` with. 'auto': 'host_split' for models with
  exits (halting varies per image far more than the merge), 'host' for token sharing without
  exits, 'device' where there is nothing to choose on the host (SegViT; ALGM and the oracle,
  whose counts are decided inside the one program); bucket_ratio 0 then means AUTO_RATIO on
  the host. The ratio is the host dispatches' (their ladder, and with HostBuckets.run on a
  pool the padding bound of its planned capacities): 'device' runs the model's own buckets
  (a fine ladder there compiles every capacity), so it resolves to 0."""
  if dispatch not in CHOICES:
    raise ValueError(f"bucket dispatch {dispatch!r}: use one of {', '.join(CHOICES)}")
  if dispatch == "auto":
    varies = model.shares_tokens or bool(model.exit_layers)
    if not varies or model.merges_in_encoder or model.merge == "oracle":
      dispatch = "device"
    else:
      dispatch = "host_split" if model.exit_layers else "host"
      bucket_ratio = bucket_ratio or AUTO_RATIO
  return dispatch, 0.0 if dispatch == "device" else float(bucket_ratio)


def host_buckets(model, dispatch, plan_ratio=0.0):
  """HostBuckets for 'host' / 'host_split'; None for 'device' (the one jitted program).
  plan_ratio: see HostBuckets (0: the model's ladder)."""
  if dispatch not in DISPATCHES:
    raise ValueError(f"bucket dispatch {dispatch!r}: use one of {', '.join(DISPATCHES)}")
  return None if dispatch == "device" else HostBuckets(model, dispatch == "host_split",
                                                       plan_ratio)


def with_ladder(model, ratio):
  """The model with the geometric ladder `capacity.geometric_buckets(ratio)` for its
  supertokens and `capacity.exit_ladder(ratio)` after its first exit (ratio 0: the model's
  own buckets). The buckets change no output, only the padding and the programs compiled:
  with the host dispatch only the capacities the data needs compile, so a fine ladder (1.05)
  costs little; on device every one of them does."""
  if not ratio:
    return model
  if ratio <= 1:
    raise ValueError(f"bucket ratio {ratio}: use 0 (the model's own buckets) or a ratio > 1, "
                     "e.g. 1.05")
  if model.merges_in_encoder:   # its buckets are chosen inside the encoder, on device
    raise ValueError(f"merge={model.merge!r} chooses its buckets inside the encoder, in the "
                     "one program: a fine ladder would compile every capacity; use ratio 0")
  return model.clone(buckets=capacity.geometric_buckets(ratio),
                     exit_buckets=capacity.exit_ladder(ratio))


def host_value(x):
  """`x` as a numpy array: with several processes, the whole (global) array, gathered from
  all of them, so that every process reads the same counts."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def pick_capacity(count, capacities):
  """The smallest of the sorted `capacities` that holds `count` tokens."""
  i = int(np.searchsorted(np.asarray(capacities), count, side="left"))
  if i == len(capacities):
    raise ValueError(f"{count} tokens exceed the largest capacity {capacities[-1]}")
  return int(capacities[i])


def plan_capacities(needs, weights, cost, ratio, compiled=(), multiple=8, limit=None):
  """Capacities for items (a batch, or an image, that needs `needs` tokens and holds
  `weights` images), each item then run in the smallest of them that holds it: the fewest
  capacities outside `compiled` (whose programs exist) such that the executed cost
  Σ weight·cost(capacity) stays within `ratio` times the useful Σ weight·cost(need), or,
  where rounding to `multiple` alone exceeds that, the least cost there is. cost(c): one
  image's cost in c slots, increasing. The candidates are the needs rounded up to `multiple`
  (at most `limit`) and the compiled capacities, chosen by a dynamic program over them
  (best[k][j]: the least cost of the items up to candidate j, j the largest capacity used,
  with at most k new ones). Returns the sorted capacities used.

  Unlike a fixed ladder, whose rungs sit where no count may fall, the capacities sit on the
  counts, so fewer of them meet the same padding (HostBuckets.run)."""
  needs = np.asarray(needs, np.int64)
  weights = np.asarray(weights, np.float64)
  if needs.ndim != 1 or needs.shape != weights.shape or not len(needs):
    raise ValueError(f"plan_capacities: needs {needs.shape} and weights {weights.shape} must "
                     "be equal, non-empty 1-d")
  if ratio < 1:
    raise ValueError(f"plan_capacities: ratio {ratio} < 1")
  limit = int(limit) if limit else int(needs.max()) + multiple
  if needs.max() > limit:
    raise ValueError(f"{needs.max()} tokens exceed the largest capacity {limit}")
  rounded = np.minimum(limit, np.maximum(multiple, -(-needs // multiple) * multiple))
  compiled = {int(c) for c in compiled if c >= needs.min()}
  above = [c for c in compiled if c >= rounded.max()]
  top = min(above) if above else int(rounded.max())
  cand = np.array(sorted(c for c in set(rounded.tolist()) | compiled if c <= top))
  f = np.array([cost(int(c)) for c in cand], np.float64)
  new = np.array([int(c) not in compiled for c in cand])
  slot = np.searchsorted(cand, needs, side="left")   # the smallest candidate holding each
  held = np.cumsum(np.bincount(slot, weights, minlength=len(cand)))   # items ≤ cand[j]
  useful = float(np.sum(weights * np.array([cost(int(c)) for c in needs], np.float64)))
  budget = max(ratio * useful, float(np.sum(weights * f[slot]))) * (1 + 1e-9)
  best, back = [], []
  for k in range(len(cand) + 1):
    cost_k, arg_k = np.full(len(cand), np.inf), np.full(len(cand), -2)
    for j in range(len(cand)):
      if k < new[j]:
        continue
      cost_k[j], arg_k[j] = held[j] * f[j], -1   # cand[j] the smallest capacity used
      if j:
        before = best[k - 1][:j] if new[j] else cost_k[:j]
        v = before + (held[j] - held[:j]) * f[j]
        i = int(np.argmin(v))
        if v[i] < cost_k[j]:
          cost_k[j], arg_k[j] = v[i], i
    best.append(cost_k)
    back.append(arg_k)
    whole = np.where(held >= held[-1], cost_k, np.inf)   # capacities that hold every item
    j = int(np.argmin(whole))
    if whole[j] <= budget:
      caps = []
      while j >= 0:
        caps.append(int(cand[j]))
        j, k = back[k][j], k - int(new[j])
      return tuple(sorted(caps))
  raise AssertionError("unreachable: every candidate its own capacity meets the budget")


def group_by_tokens(counts, batch):
  """Image indices in batches of `batch`, ordered by token count (ties in input order), so
  that each batch's largest count, which sets its capacity, is close to all of its counts."""
  order = np.argsort(np.asarray(counts), kind="stable")
  return [order[i:i + batch] for i in range(0, len(order), batch)]


def batch_indices(n, batch, counts=None):
  """Indices of n images in batches of `batch` (the last may be short): in input order, or
  grouped by token count when `counts` are given."""
  if counts is not None:
    return group_by_tokens(counts, batch)
  return [np.arange(i, min(i + batch, n)) for i in range(0, n, batch)]


class HostBuckets:
  """`model.apply(variables, images)` with the capacities chosen on the host (module doc).

  split_exits: after the first exit every image continues alone, in the smallest capacity
  that holds its own active tokens. Halting differs from image to image much more than the
  merge does, so in a batch the image that halts least would otherwise set everyone's
  capacity; the price is a batch-1 program per later segment.

  Attributes after calls: `compile_s`, seconds spent compiling each (program, capacity, batch
  shape); `calls`, how many batches each ran.
  """

  def __init__(self, model, split_exits=False, plan_ratio=0.0):
    self.model = model
    self.split_exits = split_exits
    self.plan_ratio = float(plan_ratio)
    self.compile_s, self.calls, self._compiled, self._planned = {}, {}, {}, {}
    # One image's encoder MACs in c token slots, up to a constant: QKV, output and MLP
    # projections (linear in c) and attention (c²); what plan_capacities weighs padding by.
    v = model.backbone
    self._cost = lambda c: c * (c + 2 * v.width + v.mlp_dim)
    self._count = lambda v, x: model.apply(v, x, method=segmenter_lib.Segmenter.token_count)
    self._whole = lambda v, x, level, capacity: model.apply(v, x, level=level,
                                                            capacity=capacity)
    self._begin = lambda v, x, level, capacity, slots: model.apply(
        v, x, level, capacity, slots, method=segmenter_lib.Segmenter.begin_staged)
    self._segment = lambda v, state, s, capacity: model.apply(
        v, state, s, capacity, method=segmenter_lib.Segmenter.continue_staged)
    self._end = lambda v, state, x, level, capacity: model.apply(
        v, state, x, level, capacity, method=segmenter_lib.Segmenter.end_staged)

  def _run(self, name, fn, static, *args):
    """fn(*args, **static), compiled once per (name, static values, argument shapes)."""
    return self._run_each(name, fn, [(static, args)])[0]

  def _run_each(self, name, fn, items):
    """[fn(*args, **static) for (static, args) in items], every program they need compiled
    before any of them runs, and after their inputs are ready: nothing executes while XLA
    compiles (on a CPU both would share the cores) and compile_s counts compiling alone."""
    keys = [(name, tuple(sorted(static.items())),
             tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[1:])))
            for static, args in items]
    missing = {k: item for k, item in zip(keys, items) if k not in self._compiled}
    if missing:
      jax.block_until_ready([args for _, args in items])
    for key, (static, args) in missing.items():
      t = time.perf_counter()
      self._compiled[key] = jax.jit(
          lambda *a, static=static: fn(*a, **static)).lower(*args).compile()
      self.compile_s[key] = time.perf_counter() - t
    out = []
    for key, (_, args) in zip(keys, items):
      self.calls[key] = self.calls.get(key, 0) + 1
      out.append(self._compiled[key](*args))
    return out

  def __call__(self, variables, images, merge=None):
    """(outputs, info) as model.apply's. merge: these images' (level map, count), from
    `merge` on them earlier (e.g. by a pass that sorted images by count), so the policy net
    and the merge do not run twice; default: they run here."""
    return self.run(variables, [(images, merge)])[0]

  def run(self, variables, calls):
    """[(outputs, info)] of each call (images, merge or None), as __call__'s. Every call
    passes a program before any passes the next (their states are held in between), so
    that with `plan_ratio` each program's capacities are planned over all of them."""
    m = self.model
    calls = [(x, merge if merge is not None or not m.shares_tokens else self.merge(variables, x))
             for x, merge in calls]
    keys = [(m.grid(x), len(x)) for x, _ in calls]
    caps = [key[0][0] * key[0][1] for key in keys]
    # ALGM merges inside the encoder: its buckets (and with exits, theirs) are chosen on
    # device, in one program (dcts_algm: the supertokens' here, the merged tokens' in it).
    if m.shares_tokens:
      caps = self._capacities("segment 1", [merge[1] for _, merge in calls], keys,
                              [m.capacities(g) for g, _ in keys], 16)
    if not m.exit_layers or m.exit_mode != "compact" or m.merges_in_encoder:
      if not m.shares_tokens:
        return self._run_each("model", lambda v, x: m.apply(v, x),
                              [({}, (variables, x)) for x, _ in calls])
      return self._run_each("model", self._whole, [(dict(capacity=c), (variables, x, merge[0]))
                                                   for (x, merge), c in zip(calls, caps)])
    # The state leaves the first program padded to the grid's largest capacity, and the exit
    # ladder is the one program's (not relative to this batch's capacity): the later segments
    # compile once per exit capacity, not once per (supertoken capacity, exit capacity).
    states = self._run_each("segment 1", self._begin, [
        (dict(capacity=c, slots=m.capacities(grid)[-1]), (variables, x, merge and merge[0]))
        for (x, merge), (grid, _), c in zip(calls, keys, caps)])
    # Per call: its state, or one state per image (split_exits; 0-d leaves shared).
    parts = [[jax.tree.map(lambda a, i=i: a[i:i + 1] if a.ndim else a, state)
              for i in range(b)] if self.split_exits and b > 1 else [state]
             for state, (_, b) in zip(states, keys)]
    flat = [(i, j) for i, p in enumerate(parts) for j in range(len(p))]
    for s in range(1, len(m.exit_layers) + 1):
      active = [parts[i][j]["active"].sum(-1) for i, j in flat]
      part_keys = [(keys[i][0], len(parts[i][j]["active"])) for i, j in flat]
      part_caps = self._capacities(f"segment {s + 1}", active, part_keys,
                                   [m.exit_capacities(g) for g, _ in part_keys], 8)
      done = self._run_each(f"segment {s + 1}", self._segment, [
          (dict(s=s, capacity=c), (variables, parts[i][j])) for (i, j), c in zip(flat, part_caps)])
      for (i, j), state in zip(flat, done):
        parts[i][j] = state
    states = [p[0] if len(p) == 1 else jax.tree.map(   # per-image capacities: [B] per stage
        lambda *a: jnp.concatenate(a) if a[0].ndim else jnp.stack(a), *p) for p in parts]
    return self._run_each("finish", self._end, [
        (dict(capacity=c), (variables, state, x, merge and merge[0]))
        for (x, merge), state, c in zip(calls, states, caps)])

  def _capacities(self, name, counts, keys, ladders, multiple):
    """The capacity of each item of program `name` (counts: its tokens per image; keys:
    its (grid, batch size); ladders: the model's capacities for it): the smallest of the
    ladder that holds its largest count, or with `plan_ratio`, of the capacities
    plan_capacities chooses over the items of one key (beside those compiled before)."""
    needs = [int(np.max(host_value(c))) for c in counts]
    if not self.plan_ratio:
      return [pick_capacity(n, ladder) for n, ladder in zip(needs, ladders)]
    out = [None] * len(needs)
    for key in dict.fromkeys(keys):
      rows = [i for i, k in enumerate(keys) if k == key]
      ladder = ladders[rows[0]]
      caps = ladder if len(ladder) == 1 else plan_capacities(   # CTS: one exact capacity
          [needs[i] for i in rows], [key[1]] * len(rows), self._cost, self.plan_ratio,
          self._planned.get((name, key), ()), multiple, ladder[-1])
      self._planned[(name, key)] = self._planned.get((name, key), frozenset()) | set(caps)
      for i in rows:
        out[i] = pick_capacity(needs[i], caps)
    return out

  def compile_summary(self):
    """{program name: dict(programs=how many capacities/shapes compiled, seconds)}."""
    out = {}
    for key, seconds in self.compile_s.items():
      row = out.setdefault(key[0], dict(programs=0, seconds=0.0))
      row["programs"] += 1
      row["seconds"] += seconds
    return {k: dict(v, seconds=round(v["seconds"], 2)) for k, v in out.items()}

  def merge(self, variables, images):
    """(level map [B, gh, gw], supertokens per image [B]) as device arrays: the policy net
    and the merge alone (models that share tokens before the encoder)."""
    return self._run("merge", self._count, {}, variables, images)

  def token_counts(self, variables, images):
    """Supertokens per image [B] (the full grid without a merge, and for ALGM, which merges
    inside the encoder)."""
    if not self.model.shares_tokens:
      grid = self.model.grid(images)
      return np.full(len(images), grid[0] * grid[1])
    return host_value(self.merge(variables, images)[1])
