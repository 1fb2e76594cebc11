"""Host-dispatched buckets: the same outputs as the one-program model, only the capacities a
batch needs compiled, the smallest capacity that holds the batch, grouping by token count."""
import functools
import itertools

import jax
import numpy as np
import pytest

from numerics import assert_close  # tests/numerics.py

from configs import step as step_configs
from step_jax import api
from step_jax.analysis import benchmark
from step_jax.evaluation import dispatch
from step_jax.evaluation import tokens
from step_jax.models import capacity
from step_jax.models import segmenter


@functools.lru_cache(maxsize=None)
def _prepared_once(method, exit_head, exit_mode):
  """Variables, calibrated model and images, once per module: the buckets change no value."""
  cfg = step_configs.get_config(f"method={method},variant=Mu/16,dataset=synthetic,smoke,"
                                f"tau=0.5-0.9-0.9-0.9,exits=1-2,exit_head={exit_head}")
  cfg.data.image_size = (128, 128)
  # keep_top_k=1: a token stays active per class, so no image halts entirely (its last head
  # would then attend to no token, whose output depends on the slots of the bucket).
  ladder = (0.5, 0.75, 1.0)   # few device programs
  cfg.model.update(posemb_grid=(8, 8), buckets=ladder, exit_buckets=ladder, keep_top_k=1,
                   exit_mode=exit_mode)
  images = tokens.load_images(cfg, "", 4)
  _, _, variables, _ = benchmark.prepare(cfg, images=images)
  if "policy" in variables["params"]:   # random scores sit at .5: spread the 2x2 ones
    v = jax.tree.map(np.asarray, variables)
    v["params"]["policy"]["logit_2"]["kernel"] = v["params"]["policy"]["logit_2"]["kernel"] * 3e3
    variables = v
  _, model, variables, _ = benchmark.prepare(cfg, "fp32", variables, images, 0.4)
  return model, variables, images


def _prepared(method, exit_head="dtop", exit_mode="compact", buckets=(0.5, 0.75, 1.0)):
  model, variables, images = _prepared_once(method, exit_head, exit_mode)
  return model.clone(buckets=tuple(buckets), exit_buckets=tuple(buckets)), variables, images


@pytest.mark.parametrize("method,exit_head,exit_mode", [
    ("step", "segvit", "compact"),    # the default STEP model: programs in sequence
    pytest.param("step", "dtop", "compact", marks=pytest.mark.slow),  # DToP's exit heads
    pytest.param("dtop", "atm_shallow_first", "compact", marks=pytest.mark.slow),  # no merge
    pytest.param("step", "segvit", "mask", marks=pytest.mark.slow),  # a program per capacity
])
def test_host_buckets_give_the_one_program_outputs(method, exit_head, exit_mode):
  model, variables, images = _prepared(method, exit_head, exit_mode)
  # The reference: the one program with a single capacity (the buckets change no value, see
  # test_supertokens/test_early_exit), so that it compiles one encoder, not 3 x 3.
  want, want_info = jax.jit(model.clone(buckets=(1.0,), exit_buckets=(1.0,)).apply)(
      variables, images)
  host = dispatch.HostBuckets(model)
  got, info = host(variables, images)
  assert_close(got, want, 1e-5)
  for key in ("num_tokens", "active_tokens", "halt_stage", "level"):
    if key in want_info:
      np.testing.assert_array_equal(info[key], want_info[key])
  if model.merge != "none":   # the smallest ladder capacity that holds the batch
    caps = model.capacities((8, 8))
    assert int(info["capacity"]) == dispatch.pick_capacity(
        int(np.max(want_info["num_tokens"])), caps)
  if model.exit_layers and exit_mode == "compact":   # exits: no slot beyond the ladder's
    active = np.asarray(info["active_tokens"]).max(0)
    ladder = model.exit_capacities((8, 8))   # the one program's exit ladder
    for s, cap in enumerate(np.asarray(info["stage_capacity"])[1:], start=1):
      assert int(cap) == dispatch.pick_capacity(int(active[s]), ladder)
    # split_exits: each image alone after the first exit, in its own smallest capacity;
    # the same outputs, and token_stats reads the per-image capacities.
    split, split_info = dispatch.HostBuckets(model, split_exits=True)(variables, images)
    assert_close(split, want, 1e-5)
    np.testing.assert_array_equal(split_info["halt_stage"], want_info["halt_stage"])
    own = np.asarray(split_info["stage_capacity"])       # [stages, images]
    assert own.shape == (len(model.exit_layers) + 1, len(images))
    for s in range(1, own.shape[0]):
      for i in range(len(images)):
        assert own[s, i] == dispatch.pick_capacity(
            int(np.asarray(split_info["active_tokens"])[i, s]), ladder)
      assert own[s].max() == np.asarray(info["stage_capacity"])[s]
    # The Python API with the same dispatch: the one program's classes and halt map.
    pred, api_info = api.segment(model, variables, images, dispatch="host_split")
    want_scores = segmenter.predict_scores(want, images.shape[1:3])
    assert_close(api_info["scores"], want_scores, 1e-5)
    np.testing.assert_array_equal(pred, np.argmax(api_info["scores"], -1))
    np.testing.assert_array_equal(api_info["halt_stage"], want_info["halt_stage"])
    with pytest.raises(ValueError, match="bucket dispatch 'gpu'"):
      api.segment(model, variables, images, dispatch="gpu")


def test_only_the_capacities_used_are_compiled_and_then_reused():
  ladder = capacity.geometric_buckets(1.05, 0.1)    # 48 buckets: far too many to compile
  model, variables, images = _prepared("step", buckets=ladder)
  images = np.concatenate([images, images[1:3, ::-1]])   # upside down: 28 and 16 tokens
  host = dispatch.HostBuckets(model)
  for im in images:
    host(variables, im[None])
  for im in images:          # second pass: nothing new to compile
    host(variables, im[None])
  # Per call: the merge, three segments (exits after blocks 1 and 2), the finish.
  assert sum(host.calls.values()) == 2 * len(images) * 5
  counts = host.token_counts(variables, images)
  used = {dispatch.pick_capacity(int(c), model.capacities((8, 8))) for c in counts}
  firsts = [k for k in host.compile_s if k[0] == "segment 1"]
  assert len(firsts) == len(used) < len(model.capacities((8, 8)))
  # A later segment compiles once per exit capacity it runs in, whatever the supertoken
  # capacity before it: its state arrives padded to the grid's slots, one shape for all.
  assert len(used) > 1
  for name in ("segment 2", "segment 3"):
    keys = [k for k in host.compile_s if k[0] == name]
    assert len({k[2] for k in keys}) == 1 and len({k[1] for k in keys}) == len(keys)
  assert len([k for k in host.compile_s if k[0] == "finish"]) == len(used)
  summary = host.compile_summary()   # what evaluation and step-segment report
  assert summary["segment 1"]["programs"] == summary["finish"]["programs"] == len(used)
  assert sum(r["programs"] for r in summary.values()) == len(host.compile_s)
  assert len(host.compile_s) == len(host._compiled)   # pylint: disable=protected-access


def test_the_exit_ladder_steps_below_a_tenth_and_is_geometric_above():
  ladder = capacity.exit_ladder(1.05)
  assert ladder[:3] == (1 / 32, 2 / 32, 3 / 32) and ladder[-1] == 1.0
  above = np.asarray(ladder[3:])
  assert above[0] == 0.1 and np.all(above[1:] / above[:-1] <= 1.05 ** 2 + 1e-5)   # 6 digits
  model = dispatch.with_ladder(_prepared("step")[0], 1.05)
  assert model.exit_buckets == ladder and model.buckets == capacity.geometric_buckets(1.05)
  # On a 64x64 grid: 128-token steps up to 10 %, then at most 1.1025x apart.
  caps = np.asarray(model.exit_capacities((64, 64)))
  assert caps[:3].tolist() == [128, 256, 384] and caps[-1] == 4096
  assert np.all(caps[4:] / caps[3:-1] <= 1.1025 + 8 / caps[3:-1])


def test_pick_capacity_and_group_by_tokens():
  assert dispatch.pick_capacity(17, (16, 32, 64)) == 32
  assert dispatch.pick_capacity(16, (16, 32, 64)) == 16
  with pytest.raises(ValueError, match="65 tokens exceed the largest capacity 64"):
    dispatch.pick_capacity(65, (16, 32, 64))
  groups = dispatch.group_by_tokens([50, 10, 40, 10, 30], 2)
  assert [g.tolist() for g in groups] == [[1, 3], [4, 2], [0]]


def _fewest_new(needs, weights, cost, ratio, compiled, multiple, limit):
  """plan_capacities' answer by brute force: how many new capacities the cheapest plan
  within the budget needs."""
  up = lambda c: min(limit, max(multiple, -(-c // multiple) * multiple))
  cand = sorted({up(c) for c in needs} | {c for c in compiled if c >= min(needs)})
  executed = lambda caps: sum(w * cost(dispatch.pick_capacity(c, caps))
                              for c, w in zip(needs, weights))
  budget = max(ratio * sum(w * cost(c) for c, w in zip(needs, weights)), executed(cand))
  old = [c for c in cand if c in compiled]
  for k in range(len(cand) + 1):
    for new in itertools.combinations([c for c in cand if c not in compiled], k):
      caps = sorted(set(new) | set(old))
      if caps and caps[-1] >= max(needs) and executed(caps) <= budget * (1 + 1e-9):
        return k
  raise AssertionError("no plan")


def test_plan_capacities_is_the_fewest_new_programs_within_the_padding():
  rng = np.random.default_rng(0)
  cost = lambda c: c * (c + 100)
  for _ in range(200):
    n = int(rng.integers(1, 7))
    needs, weights = rng.integers(0, 200, n), rng.integers(1, 4, n)
    compiled = set(rng.integers(8, 210, int(rng.integers(0, 3))).tolist())
    ratio = float(rng.choice([1.0, 1.05, 1.2, 1.5]))
    caps = dispatch.plan_capacities(needs, weights, cost, ratio, compiled, 8, 256)
    assert list(caps) == sorted(set(caps)) and caps[-1] >= needs.max()
    assert all(c in compiled or c % 8 == 0 for c in caps)
    assert len(set(caps) - compiled) == _fewest_new(needs.tolist(), weights.tolist(), cost,
                                                    ratio, compiled, 8, 256)
    useful = np.sum(weights * needs * (needs + 100))
    executed = sum(w * cost(dispatch.pick_capacity(c, caps)) for c, w in zip(needs, weights))
    rounded = -(-np.maximum(needs, 1) // 8) * 8
    assert executed <= max(ratio * useful, np.sum(weights * rounded * (rounded + 100))) * 1.001
  # Capacities sit on the counts: three clusters, three capacities at 10 % padding.
  needs = [100, 98, 97, 400, 390, 800, 795, 790]
  assert dispatch.plan_capacities(needs, [1] * 8, cost, 1.1, multiple=1) == (100, 400, 800)
  assert dispatch.plan_capacities(needs, [1] * 8, cost, 1.0, multiple=1) == tuple(
      sorted(set(needs)))
  assert dispatch.plan_capacities(needs, [1] * 8, cost, 1.1, compiled={800, 1000},
                                  multiple=1) == (100, 400, 800)
  for bad, match in [(dict(needs=[], weights=[]), "non-empty"),
                     (dict(needs=[5], weights=[1, 2]), "must be equal"),
                     (dict(needs=[5], weights=[1], ratio=0.9), "ratio 0.9 < 1"),
                     (dict(needs=[300], weights=[1], limit=256), "300 tokens exceed")]:
    kw = {**dict(cost=cost, ratio=1.05), **bad}
    with pytest.raises(ValueError, match=match):
      dispatch.plan_capacities(**kw)


def test_planned_capacities_give_the_one_program_outputs_and_pad_within_the_ratio():
  model, variables, images = _prepared("step")
  images = np.concatenate([images, images[1:3, ::-1]])   # mixed token counts
  want, want_info = jax.jit(model.clone(buckets=(1.0,), exit_buckets=(1.0,)).apply)(
      variables, images)
  host = dispatch.HostBuckets(model, split_exits=True, plan_ratio=1.2)
  results = host.run(variables, [(images[i:i + 2], None) for i in range(0, len(images), 2)])
  got = jax.tree.map(lambda *a: np.concatenate(a), *[r[0] for r in results])
  assert_close(got, want, 1e-5)
  cost = lambda c: c * (c + 2 * model.backbone.width + model.backbone.mlp_dim)
  caps = np.concatenate([np.asarray(r[1]["stage_capacity"]) for r in results], -1)
  active = np.asarray(want_info["active_tokens"]).T        # [stages, images]
  np.testing.assert_array_equal(np.concatenate([r[1]["halt_stage"] for r in results]),
                                want_info["halt_stage"])
  for s in range(1, len(caps)):   # each later segment pads within 20 % (or to 8 slots)
    need = np.maximum(-(-active[s] // 8) * 8, 8)
    assert np.sum(cost(caps[s])) <= max(1.2 * np.sum(cost(active[s])), np.sum(cost(need)))
    assert np.all(caps[s] >= active[s])
  # The first segment: a capacity per pair of images, planned over the three pairs.
  firsts = [int(np.max(r[1]["capacity"])) for r in results]
  needs = [int(np.max(want_info["num_tokens"][i:i + 2])) for i in range(0, len(images), 2)]
  assert all(c >= n for c, n in zip(firsts, needs))
  assert sum(cost(c) for c in firsts) <= max(1.2 * sum(cost(n) for n in needs),
                                             sum(cost(-(-n // 16) * 16) for n in needs))
  assert len([k for k in host.compile_s if k[0] == "segment 1"]) == len(set(firsts))
  # A second run of the same calls compiles nothing: the planned capacities are reused.
  before = len(host.compile_s)
  host.run(variables, [(images[i:i + 2], None) for i in range(0, len(images), 2)])
  assert len(host.compile_s) == before


@pytest.mark.slow   # ~60 s on 2 CPU cores; the test above covers the host buckets' outputs
def test_batched_token_stats_grouping_and_the_host_benchmark():
  ladder = (0.5, 0.75, 1.0)
  model, variables, images = _prepared("dcts", buckets=ladder)
  images = np.concatenate([images, images[::-1]])[:6]   # 6 images, 2 batches of 3
  cfg = step_configs.get_config("method=dcts,variant=Mu/16,dataset=synthetic,smoke,"
                                "tau=0.5-0.9-0.9-0.9")
  cfg.data.image_size = (128, 128)
  cfg.model.buckets = ladder
  stats = lambda **kw: tokens.token_stats(cfg, model, variables, images, **kw)
  b1, b3, b3g = stats(), stats(batch=3), stats(batch=3, group=True)
  buckets = dispatch.HostBuckets(model)
  host = stats(batch=3, group=True, forward=buckets)
  assert b1["gflops_useful"] == pytest.approx(b3["gflops_useful"]) == pytest.approx(
      b3g["gflops_useful"])
  # A batch runs in the capacity of its largest count; grouping similar counts wastes less.
  assert b1["gflops_executed"] <= b3g["gflops_executed"] <= b3["gflops_executed"]
  assert host["gflops_executed"] == pytest.approx(b3g["gflops_executed"])
  counts = buckets.token_counts(variables, images)   # its merge program is compiled
  assert len(set(counts.tolist())) > 1    # the test needs images of different counts
  r = benchmark.measure(cfg, variables, images, batch=3, reps=2, warmup=0, dispatch="host",
                        group=True)
  assert r["bucket_dispatch"] == "host" and r["programs_compiled"] >= 2   # merge + a capacity
  assert r["executed_over_useful"] == pytest.approx(
      b3g["gflops_executed"] / b3g["gflops_useful"], rel=1e-3)
  with pytest.raises(ValueError, match="bucket dispatch 'gpu'"):
    benchmark.measure(cfg, variables, images, dispatch="gpu")
