"""ALGM merges against a plain NumPy re-derivation of the published rule (loops over windows,
sets and tokens; tue-mps/algm-segmenter's local_merge.py and global_merge.py)."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close
from step_jax.models import algm


def _cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _np_window_scores(x, gh, gw):
  """[B, gh//2 * gw//2]: mean cosine similarity over the 12 ordered pairs of each window."""
  out = np.zeros((x.shape[0], (gh // 2) * (gw // 2)))
  for b in range(x.shape[0]):
    for w, (i, j) in enumerate(itertools.product(range(gh // 2), range(gw // 2))):
      cells = [(2 * i + di) * gw + 2 * j + dj for di in (0, 1) for dj in (0, 1)]
      out[b, w] = np.mean([_cos(x[b, p], x[b, q]) for p in cells for q in cells if p != q])
  return out


def _np_local(x, gh, gw, threshold, batch_min):
  """Per cell the feature after the local merge and the token count per image."""
  scores = _np_window_scores(x, gh, gw)
  r = min(int((s >= threshold).sum()) for s in scores)
  full, counts = x.astype(np.float64).copy(), []
  for b in range(x.shape[0]):
    if batch_min:   # the reference: the r most similar windows of every image
      chosen = np.argsort(-scores[b], kind="stable")[:r]
    else:
      chosen = np.flatnonzero(scores[b] >= threshold)
    for w in chosen:
      i, j = divmod(int(w), gw // 2)
      cells = [(2 * i + di) * gw + 2 * j + dj for di in (0, 1) for dj in (0, 1)]
      full[b, cells] = x[b, cells].mean(0)
    counts.append(gh * gw - 3 * len(chosen))
  return full, np.array(counts)


def _np_global(x, size, valid, layer, batch_min):
  """Per input slot the feature it holds after the global merge (padding: nan), counts."""
  b_n = x.shape[0]
  stats, per_image = [], []
  for b in range(b_n):
    slots = np.flatnonzero(valid[b])
    a_set, b_set = slots[0::2], slots[1::2]
    best = {a: max((_cos(x[b, a], x[b, t]), -k) for k, t in enumerate(b_set)) for a in a_set}
    best = {a: (s, b_set[-k]) for a, (s, k) in best.items()}
    vals = np.array([s for s, _ in best.values()])
    stats.append((vals.mean(), vals.std(ddof=1)))
    per_image.append(best)
  if batch_min:
    thr = [np.mean([m for m, _ in stats]) + np.mean([s for _, s in stats]) / layer] * b_n
  else:
    thr = [m + s / layer for m, s in stats]
  eligible = [[a for a, (s, _) in best.items() if s >= thr[b]] for b, best in enumerate(per_image)]
  r = min(len(e) for e in eligible)
  out, counts = np.full(x.shape, np.nan), []
  for b, best in enumerate(per_image):
    if batch_min:
      merged = sorted(best, key=lambda a: -best[a][0])[:r]
    else:
      merged = eligible[b]
    groups = {t: [t] for t in np.flatnonzero(valid[b]) if t not in merged}
    for a in merged:
      groups[best[a][1]].append(a)
    for members in groups.values():
      w = size[b, members][:, None]
      value = (x[b, members] * w).sum(0) / w.sum()
      out[b, members] = value
    counts.append(len(groups))
  return out, np.array(counts)


def _run(plan, x, size, capacity):
  merged, new_size, ok = algm.merge(jnp.asarray(x), jnp.asarray(size), plan, capacity)
  source = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  back = algm.unmerge(merged, jnp.maximum(algm.compose(source, plan), 0))
  return np.asarray(back), np.asarray(new_size), np.asarray(ok)


@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])   # (5, 7): only complete windows merge
def test_window_scores_match_the_published_rule(grid):
  x = np.random.default_rng(0).normal(size=(2, grid[0] * grid[1], 8)).astype(np.float32)
  got = np.asarray(algm.window_similarity(jnp.asarray(x), grid)).reshape(2, -1)
  assert_close(got, _np_window_scores(x, *grid), 1e-5)


@pytest.mark.parametrize("batch_min", [False, True])
@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])
def test_local_merge_matches_the_published_rule(grid, batch_min):
  gh, gw = grid
  rng = np.random.default_rng(1)
  # Smooth-ish features so that some windows score high and others do not.
  base = rng.normal(size=(3, gh * gw, 6))
  x = (base + 3 * rng.normal(size=(3, 1, 6)) * rng.integers(0, 2, (3, gh * gw, 1))).astype(
      np.float32)
  scores = _np_window_scores(x, gh, gw)
  threshold = float(np.median(scores))
  plan = algm.local_merge_plan(jnp.asarray(x), grid, threshold, batch_min=batch_min)
  want, counts = _np_local(x, gh, gw, threshold, batch_min)
  np.testing.assert_array_equal(np.asarray(plan.count), counts)
  back, size, ok = _run(plan, x, np.ones(x.shape[:2], np.float32), gh * gw)
  assert_close(back, want, 1e-5)
  assert (size[ok] >= 1).all() and (size[~ok] == 0).all() and size.sum() == x.shape[0] * gh * gw
  if (gh, gw) == (5, 7):   # the last row and column are in no complete window: never merged
    edge = np.zeros((gh, gw), bool)
    edge[-1], edge[:, -1] = True, True
    assert_close(back[:, edge.reshape(-1)], x[:, edge.reshape(-1)], 0)
  if not batch_min:   # each image merges at least as much as under the batch minimum
    b_plan = algm.local_merge_plan(jnp.asarray(x), grid, threshold, batch_min=True)
    assert (np.asarray(plan.count) <= np.asarray(b_plan.count)).all()


@pytest.mark.parametrize("batch_min", [False, True])
def test_global_merge_matches_the_published_rule(batch_min):
  rng = np.random.default_rng(2)
  b, c = 3, 23
  x = rng.normal(size=(b, c, 5)).astype(np.float32)
  x[:, ::3] += 2.0   # a cluster of similar tokens
  size = rng.integers(1, 5, (b, c)).astype(np.float32)
  valid = rng.random((b, c)) < 0.8       # padding scattered, as after halting
  valid[0, -6:] = False                  # and at the end, as in a bucket
  size[~valid] = 0
  plan = algm.global_merge_plan(jnp.asarray(x), jnp.asarray(valid), 5, batch_min=batch_min)
  want, counts = _np_global(x, size, valid, 5, batch_min)
  np.testing.assert_array_equal(np.asarray(plan.count), counts)
  assert (np.asarray(plan.assign)[~valid] == -1).all()   # padding is never matched or kept
  back, new_size, ok = _run(plan, x, size, c)
  assert_close(back[valid], want[valid], 1e-5)
  assert_close(new_size.sum(1), size.sum(1), 0)   # no patch lost


def test_thresholds_above_one_merge_nothing():
  x = np.random.default_rng(3).normal(size=(2, 24, 4)).astype(np.float32)
  x[:, 1] = x[:, 0]   # identical tokens: similarity 1, still below a threshold above 1
  plan = algm.local_merge_plan(jnp.asarray(x), (4, 6), 1.01)
  assert (np.asarray(plan.count) == 24).all()
  np.testing.assert_array_equal(np.asarray(plan.assign), np.tile(np.arange(24), (2, 1)))
  back, _, ok = _run(plan, x, np.ones((2, 24), np.float32), 24)
  assert ok.all()
  assert_close(back, x, 0)


def test_unmerge_after_both_merges_covers_every_cell():
  """local then global (capacity from the count, as a bucket would): every cell maps to a
  valid slot, token sizes count the cells each token covers, and each cell gets the mean of
  the cells its token covers."""
  gh, gw = 6, 8
  rng = np.random.default_rng(4)
  x = np.repeat(np.repeat(rng.normal(size=(2, gh // 2, gw // 2, 4)), 2, 1), 2, 2)
  x = x.reshape(2, gh * gw, 4).astype(np.float32)
  x[:, -gw:] += rng.normal(size=(2, gw, 4)).astype(np.float32)   # windows that do not merge
  source = jnp.broadcast_to(jnp.arange(gh * gw), (2, gh * gw))
  p1 = algm.local_merge_plan(jnp.asarray(x), (gh, gw), 0.99)
  cap1 = int(np.asarray(p1.count).max())
  assert cap1 < gh * gw
  y, size, valid = algm.merge(jnp.asarray(x), jnp.ones((2, gh * gw)), p1, cap1)
  assert_close(np.asarray(algm.unmerge(y, algm.compose(source, p1)))[:, :-2 * gw],
               x[:, :-2 * gw], 1e-6)   # identical windows: the local merge changes nothing
  source = algm.compose(source, p1)
  p2 = algm.global_merge_plan(y, valid, 5)
  cap2 = int(np.asarray(p2.count).max())
  assert cap2 < cap1
  z, size2, valid2 = algm.merge(y, size, p2, cap2)
  source = np.asarray(algm.compose(source, p2))
  assert (source >= 0).all()
  assert all(np.asarray(valid2)[b, source[b]].all() for b in range(2))
  cover = np.stack([np.bincount(s, minlength=cap2) for s in source])
  assert_close(np.asarray(size2), cover, 0)
  want = np.stack([[x[b, source[b] == source[b, p]].mean(0) for p in range(gh * gw)]
                   for b in range(2)])
  assert_close(np.asarray(algm.unmerge(z, jnp.asarray(source))), want, 1e-5)
