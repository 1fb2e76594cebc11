"""Analysis tools: exit analysis (table 7, figures 7-8), per-layer profile (figures 9-10),
table sweeps (tables 1, 3-6, figures 5-6) and the budget calibration, on tiny models."""
import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import step as step_configs
from step_jax.analysis import benchmark
from step_jax.data import datasets
from step_jax.models import flops
from step_jax.analysis import profile as profile_lib
from step_jax.models import builder
from step_jax.evaluation import tokens
from step_jax.models import variables as variables_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
import calibrate  # noqa: E402
import compare  # noqa: E402
import exit_analysis  # noqa: E402
import halt_sweep  # noqa: E402
import peer_bench  # noqa: E402
import sweep  # noqa: E402


def _cfg(method="step", tau="0.5-0.9-0.9-0.9", exits="1-2", res=64, exit_head="dtop"):
  """DToP's exit heads by default: the tables name its heads Aux1, Aux2 (the paper's)."""
  cfg = step_configs.get_config(f"method={method},variant=Mu/16,dataset=synthetic,smoke,"
                                f"tau={tau},exits={exits},exit_head={exit_head}")
  cfg.data.image_size = (res, res)
  cfg.model.posemb_grid = (res // 16, res // 16)
  cfg.model.buckets = (0.5, 1.0)          # few buckets: few programs to compile
  cfg.model.exit_buckets = (0.5, 1.0)
  cfg.model.keep_top_k = 0                # on a 4x4 grid top-5-per-class would keep most
  return cfg


@pytest.fixture(scope="module")
def images():
  return tokens.load_images(_cfg(), "", 3)


def _spread_policy(variables):
  """Random policy scores sit at 0.5 ± 1e-3; scale the 2x2 logit so τ=.5 merges some
  windows and not others (mixed superpatch levels)."""
  v = jax.tree.map(np.asarray, variables)
  v["params"]["policy"]["logit_2"]["kernel"] = v["params"]["policy"]["logit_2"]["kernel"] * 3e3
  return v


@pytest.fixture(scope="module")
def prepared(images):
  """STEP@[1,2] with mixed superpatches, exits calibrated to halt 40 % per exit."""
  cfg = _cfg()
  _, _, variables, _ = benchmark.prepare(cfg, images=images)
  return benchmark.prepare(cfg, "fp32", _spread_policy(variables), images, 0.4)


def test_exit_analysis_counts_match_the_model(images, prepared, tmp_path):
  cfg, model, variables, _ = prepared
  counts, maps = exit_analysis.analyse(model, variables, images)
  level, stage, active = maps["level"], maps["halt_stage"], maps["active_tokens"]
  assert (level > 1).any() and (level == 1).any()   # supertokens and single patches
  assert counts["halted"].sum() > 0
  # Tokens entering, halted per exit and never halted: the model's own active counts.
  np.testing.assert_array_equal(counts["tokens"], active[:, 0])
  np.testing.assert_array_equal(counts["halted"], active[:, :-1] - active[:, 1:])
  np.testing.assert_array_equal(counts["final"], active[:, -1])
  for s in range(2):   # cells: every patch cell of a halted supertoken
    np.testing.assert_array_equal(counts["halted_cells"][:, s], (stage == s).sum((1, 2)))

  rows = exit_analysis.summary(counts, model.exit_layers)
  assert [r["head"] for r in rows] == ["Aux1", "Aux2", "final (never halted)"]
  assert rows[0]["mean"] == counts["halted"][:, 0].mean()
  assert rows[1]["max"] == counts["halted"][:, 1].max()
  assert sum(r["share"] for r in rows) == pytest.approx(1.0)
  panel = exit_analysis.halted_maps(images, maps, 2, 16, datasets.palette("", cfg.num_classes),
                                   n=2)
  md = exit_analysis.write(rows, counts, str(tmp_path), dict(config="tiny", images=3,
                                                             weights="random", merge=True,
                                                             exit_threshold=[0.5, 0.5]), panel)
  assert "| Aux2 | 2 |" in md
  with open(tmp_path / "halted_per_image.csv") as f:
    per_image = list(csv.DictReader(f))
  assert [int(r["halted_aux1"]) for r in per_image] == counts["halted"][:, 0].tolist()
  # rows: image, superpatches, 2 exits, prediction; columns: 2 images (+2 px separators).
  assert Image.open(tmp_path / "halted_maps.png").size == (2 * 66, 5 * 66)
  assert exit_analysis.shrink(panel, (64, 64), 32).shape == (165, 66, 3)


@pytest.mark.slow   # ~30 s; the two tests below check the SegViT and ATM-exit pieces
def test_profile_pieces_sum_to_model_flops(images, prepared, tmp_path):
  cfg, model, variables, _ = prepared
  plans = profile_lib.stage_plan(model, variables, images)
  table = profile_lib.profile(cfg, model, variables, images, reps=1, warmup=0, plans=plans)
  names = [r["name"] for r in table]
  assert names == ["policy+merge", "embed", "block 1", "exit 1", "block 2", "exit 2",
                   "block 3", "block 4", "final head", "upsample", "full forward",
                   "other (full − Σ pieces)"]
  useful = np.mean([flops.token_macs(cfg, p["tokens"], p["active"])["total"] for p in plans])
  executed = np.mean([flops.token_macs(cfg, p["caps"][0], p["caps"])["total"] for p in plans])
  pieces = table[:-2]
  assert sum(r["gflops"] for r in pieces) == pytest.approx(useful)
  assert sum(r["gflops_executed"] for r in pieces) == pytest.approx(executed)
  assert table[-2]["gflops"] == pytest.approx(useful)
  assert all(r["ms"] > 0 for r in pieces)
  for r in pieces:   # XLA's count of each compiled piece agrees with the analytic executed
    if r["name"].startswith(("block", "exit", "final")):
      assert 0.8 < r["xla_gflops"] / r["gflops_executed"] < 1.4, r
  profile_lib.write(table, str(tmp_path), dict(config="tiny", device="cpu", weights="random",
                                               images=3, batch=1, reps=1))
  assert {"profile.md", "profile.csv", "profile.json"} <= set(os.listdir(tmp_path))
  with open(tmp_path / "profile.csv") as f:
    assert len(list(csv.reader(f))) == len(table) + 1


def test_run_profile_writes_the_forward_op_by_op(tmp_path):
  """step-profile's files: the per-piece table and ops.md/json, whose dot fusions hold the
  encoder's matmuls."""
  text = profile_lib.run_profile(_cfg("segvit"), str(tmp_path), num_images=1, reps=1,
                                 warmup=0, config_name="tiny segvit")
  assert {"profile.md", "ops.md", "ops.json"} <= set(os.listdir(tmp_path))
  assert "| full forward |" in text and "| op kind |" in text
  ops_rows = json.load(open(tmp_path / "ops.json"))["rows"]
  assert sum(r["count"] for r in ops_rows if r["dot"]) >= 4 * 4   # 4 blocks x 4 dense layers


def test_profile_segvit_pieces_sum_to_model_macs():
  cfg = _cfg("segvit")
  model = builder.build(cfg.model, cfg.num_classes, (64, 64), 255)
  plan = dict(tokens=16, active=[16], caps=[16], info={})
  pieces = profile_lib.pieces(cfg, model, plan, np.zeros((64, 64, 3), np.uint8), 1)
  assert [p["name"] for p in pieces] == ["embed", "block 1", "block 2", "block 3", "block 4",
                                    "final head", "upsample"]
  assert sum(p["useful"] for p in pieces) / 1e9 == pytest.approx(flops.model_macs(cfg)["total"])


def test_profile_segvit_exit_pieces_run_and_sum_to_model_macs():
  """exit_head=segvit: the exit (SegViT's stage 0 + halting) after its block, SegViT's head
  at the end on every token."""
  cfg = _cfg("dtop", exits="2")
  cfg.model.exit_head = "segvit"
  model = builder.build(cfg.model, cfg.num_classes, (64, 64), 255)
  plan = dict(tokens=16, active=[16, 10], caps=[16, 12], info={})
  pieces = profile_lib.pieces(cfg, model, plan, np.zeros((64, 64, 3), np.uint8), 1)
  assert [p["name"] for p in pieces] == [
      "embed", "block 1", "block 2", "exit 1 (head stage 1)", "block 3", "block 4",
      "final head", "upsample"]
  assert [p["tokens"] for p in pieces[3:7]] == [16, 10, 10, 16]
  assert sum(p["useful"] for p in pieces) / 1e9 == pytest.approx(
      flops.token_macs(cfg, 16, [16, 10])["total"])
  variables = variables_lib.random_variables(model, (64, 64))
  for p in (pieces[3], pieces[6]):
    out = jax.jit(lambda v, *a, fn=p["fn"]: model.apply(v, *a, method=fn))(variables, *p["args"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))


@pytest.mark.slow
def test_profile_atm_exit_pieces_run_and_sum_to_model_macs():
  """exit_head=atm_shallow_first: SegViT's stages are profiled where they run, the exit
  stage halts."""
  cfg = _cfg("dtop", exits="2")
  cfg.model.exit_head = "atm_shallow_first"
  model = builder.build(cfg.model, cfg.num_classes, (64, 64), 255)
  plan = dict(tokens=16, active=[16, 10], caps=[16, 12], info={})
  pieces = profile_lib.pieces(cfg, model, plan, np.zeros((64, 64, 3), np.uint8), 1)
  assert [p["name"] for p in pieces] == [
      "embed", "block 1", "block 2", "head stage 1 (exit)", "block 3", "head stage 2",
      "block 4", "head stage 3", "upsample"]
  assert sum(p["useful"] for p in pieces) / 1e9 == pytest.approx(
      flops.token_macs(cfg, 16, [16, 10])["total"])
  variables = variables_lib.random_variables(model, (64, 64))
  for p in pieces[3:6]:
    out = jax.jit(lambda v, *a, fn=p["fn"]: model.apply(v, *a, method=fn))(variables, *p["args"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("method", ["algm", pytest.param("dcts_algm", marks=pytest.mark.slow),
                                    pytest.param("algm_dtop", marks=pytest.mark.slow)])
def test_profile_algm_pieces_run_and_sum_to_model_macs(images, method):
  """ALGM: a merge's block is profiled as its attention, the merge, its MLP on the merged
  tokens (algm_dtop: then the exit on them); the pieces' useful and executed MACs are
  flops.token_macs of the model's own counts and capacities, and every piece runs."""
  cfg = _cfg(method, exits="3" if method == "algm_dtop" else "", exit_head="segvit")
  cfg.model.algm_threshold = -1.0   # every 2x2 window merges: counts below the grid's
  model = builder.build(cfg.model, cfg.num_classes, (64, 64), 255)
  variables = variables_lib.random_variables(model, (64, 64))
  plan = profile_lib.stage_plan(model, variables, images[:1])[0]
  pieces = profile_lib.pieces(cfg, model, plan, images[0], 1)
  names = [p["name"] for p in pieces]
  algm_blocks = ["embed", "block 1 attention", "local merge", "block 1 MLP",
                 "block 2 attention", "global merge", "block 2 MLP", "block 3"]
  if method == "algm":
    assert names == algm_blocks + ["block 4", "final head", "upsample"]
    assert plan["tokens"] == 16 and plan["merged"][0] == 4   # 2x2 windows of a 4x4 grid
  elif method == "algm_dtop":
    assert names == algm_blocks + ["exit 1 (head stage 1)", "block 4", "final head",
                                   "upsample"]
  else:
    assert names == ["policy+merge", "embed", "block 1", "block 2 attention", "global merge",
                     "block 2 MLP", "block 3", "block 4", "final head", "upsample"]
  stages = (plan["active"], plan["caps"]) if method == "algm_dtop" else (None, None)
  useful = flops.token_macs(cfg, plan["tokens"], stages[0],
                            merged_tokens=plan["merged"])["total"]
  executed = flops.token_macs(cfg, plan["slots"], stages[1],
                              merged_tokens=plan["merged_caps"])["total"]
  assert sum(p["useful"] for p in pieces) / 1e9 == pytest.approx(useful)
  assert sum(p["executed"] for p in pieces) / 1e9 == pytest.approx(executed)
  for p in pieces:
    out = jax.jit(lambda v, *a, fn=p["fn"]: model.apply(v, *a, method=fn))(variables, *p["args"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(out)), p["name"]


def test_compare_row_specs():
  assert compare.parse_row("SegViT=wd/a") == ("SegViT", "wd/a", None, None, "")
  assert compare.parse_row("DToP-BASE=wd/b@1500:noexit") == ("DToP-BASE", "wd/b", 1500, 1.0,
                                                              "noexit")
  assert compare.parse_row("STEP=wd/c:tau=0.85") == ("STEP", "wd/c", None, 0.85, "tau")
  assert compare.parse_row("dCTS=wd/d:without_exits") == ("dCTS", "wd/d", None, 1.0,
                                                          "without_exits")
  assert compare.parse_row("SegViT cost=wd/e:nomerge") == ("SegViT cost", "wd/e", None, None,
                                                           "nomerge")
  for bad, msg in (("wd/a", "use LABEL=WORKDIR"), ("x=wd@last", "@STEP must be a step"),
                   ("x=wd:off", "the suffix is ':noexit', ':without_exits'"),
                   ("x=wd:tau=high", "tau must be a number"), ("x=wd:tau=1.5", "tau must")):
    with pytest.raises(ValueError, match=msg):
      compare.parse_row(bad)
  assert compare.tokens_cell(dict(tokens=4096.0)) == "4096"
  assert compare.tokens_cell(dict(tokens=4096.0, merged_tokens=[1930.4, 1204.0])) == (
      "4096 → 1930 → 1204")
  row = dict(exit_head="atm", exits_on=True, exit_threshold=(0.85,))
  assert compare.exit_cell(row) == "atm, τ 0.85"
  assert compare.exit_cell(dict(row, exits_on=False)) == "atm (off)"
  assert compare.exit_cell(dict(row, exit_head="")) == "–"


def test_sweep_rows_and_labels():
  cfg = _cfg()
  taus = [sweep.parse_tau("6899"), sweep.parse_tau("4999")]
  rows = sweep.sweep_configs(cfg, "methods", taus, [], (1, 2), [(1, 2), (2,)], taus)
  assert [sweep.label(c) for c in rows] == [
      "SegViT", "+CTS K=2", "+DToP@[1,2]", "+CTS&DToP@[1,2] K=2", "+dCTS τ-6899",
      "+STEP@[1,2] τ-6899", "+STEP@[1,2] τ-4999", "+STEP@[2] τ-6899", "+STEP@[2] τ-4999"]
  assert [sweep.label(c) for c in sweep.sweep_configs(cfg, "tau", taus, [], (), [], taus)] == [
      "+CTS&DToP@[1,2] K=2", "+STEP@[1,2] τ-6899", "+STEP@[1,2] τ-4999"]
  dcts = sweep.with_method(cfg, "dcts")
  assert [sweep.label(c) for c in sweep.sweep_configs(dcts, "tau", taus, [], (), [], taus)] == [
      "+CTS K=2", "+dCTS τ-6899", "+dCTS τ-4999"]
  assert sweep.placements_for(12)[:3] == [(3,), (4,), (5,)] and (6, 8) in sweep.placements_for(12)
  assert sweep.pareto_front([1, 2, 3, 2, 1], [0.5, 0.7, 0.6, 0.7, 0.4]) == [0, 1]


@pytest.mark.slow  # experiments/ scripts: run with -m slow
def test_sweep_exits_writes_table(images, tmp_path):
  cfg = _cfg("dtop", exits="2")
  out = sweep.run_sweeps(cfg, images, ["exits"], placements=[(2,)], out=str(tmp_path),
                         header=dict(config="tiny", images=3), reps=1, warmup=0)
  base, dtop = out["exits"]
  assert (base["label"], dtop["label"]) == ("SegViT", "+DToP@[2]")
  assert base["gflops_useful"] == pytest.approx(flops.model_macs(cfg)["total"])
  assert base["halted_share"] == 0 and base["agreement"] == 1.0
  assert 0.2 < dtop["halted_share"] < 0.6 and 0 <= dtop["agreement"] <= 1
  assert base["miou"] is None   # no trained workdir
  with open(tmp_path / "sweep_exits.csv") as f:
    assert [r["label"] for r in csv.DictReader(f)] == ["SegViT", "+DToP@[2]"]
  md = (tmp_path / "sweep_exits.md").read_text()
  assert "| SegViT | – |" in md and "| +DToP@[2] | 2 |" in md
  ratio = base["gflops_useful"] / dtop["gflops_useful"]
  assert f"| {ratio:.2f}× |" in md and ratio > 1  # fewer GFLOPs than the first row
  assert md.count("| 1.00× | 1.00× |") == 1        # the first row against itself
  assert os.path.exists(tmp_path / "pareto_exits.png")


@pytest.mark.slow  # experiments/ scripts: run with -m slow
def test_calibrate_choice_is_within_budget_and_on_the_front(images, prepared):
  cfg, _, variables, _ = prepared
  result = calibrate.calibrate(cfg, variables, images, budget_gflops=1e9,
                               tau_values=(0.5, 1.0), exit_shares=(0.2, 0.4, 0.6))
  points = result["points"]
  assert len(points) == 5 * 3     # monotone τ combos × shares (placement: the config's)
  assert {tuple(p["exits"]) for p in points} == {(1, 2)}
  costs = sorted(p["gflops"] for p in points)
  assert costs[0] < costs[-1]
  budget = costs[len(costs) // 2]
  front, best = calibrate.choose(points, "gflops", budget)
  assert best in front and points[best]["gflops"] <= budget
  assert all(p["quality"] <= points[best]["quality"] for p in points if p["gflops"] <= budget)
  # The chosen thresholds, rebuilt as a static config, really cost what the search said.
  c = calibrate.point_config(cfg, points[best])
  c2, m2, v2, _ = benchmark.prepare(c, "fp32", variables)
  st = tokens.token_stats(c2, m2, v2, images)
  assert st["gflops_useful"] == pytest.approx(points[best]["gflops"], rel=1e-6)
  assert st["gflops_useful"] <= budget
  assert "Best within budget" in calibrate.report(result)
  _, none = calibrate.choose(points, "gflops", costs[0] / 2)
  assert none is None


@pytest.mark.slow  # experiments/ scripts: run with -m slow
def test_pick_trained_prefers_the_rows_own_method():
  """CTS and dCTS weights (policy included) have the same shapes: each row takes its own
  method's run, else the first run that fits."""
  cfg = _cfg("dcts")
  abstract = lambda c: jax.eval_shape(
      builder.build(c.model, c.num_classes, (64, 64), c.ignore_index).init,
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  fake = abstract(cfg)
  trained = [("cts_run", fake, "cts"), ("dcts_run", fake, "dcts"),
             ("segvit_run", abstract(sweep.with_method(cfg, "segvit")), "segvit")]
  assert sweep.pick_trained(cfg, trained)[0] == "dcts_run"
  assert sweep.pick_trained(sweep.with_method(cfg, "cts"), trained)[0] == "cts_run"
  assert sweep.pick_trained(sweep.with_method(cfg, "segvit"), trained)[0] == "segvit_run"
  assert sweep.pick_trained(sweep.with_method(cfg, "step", exits=(2,)), trained)[0] is None
  assert sweep.pick_trained(cfg, trained[:1])[0] == "cts_run"   # fallback: first that fits


@pytest.mark.slow
@pytest.mark.slow  # experiments/ scripts: run with -m slow
def test_sweep_miou_with_a_fitting_workdir_and_calibrate_ms(images, tmp_path):
  cfg = _cfg("dtop", exits="2")
  cfg.data.num_eval = 2
  _, _, variables, _ = benchmark.prepare(cfg, images=images)
  r = sweep.measure_row(cfg, images, trained=[("fake_run", variables, "dtop")], reps=1, warmup=0)
  assert r["weights"] == "trained (fake_run)" and 0 <= r["miou"] <= 1
  seg = sweep.measure_row(sweep.with_method(cfg, "segvit"), images,
                          trained=[("fake_run", variables, "dtop")], reps=1, warmup=0)
  assert seg["miou"] is None    # DToP weights do not fit SegViT's head
  with pytest.raises(ValueError, match="exit_heads_1"):
    calibrate.search(cfg, variables, images, placements=[(1, 2)], exit_shares=(0.5,))
  _, _, variables, _ = benchmark.prepare(_cfg("dtop", exits="1-2"), images=images)
  result = calibrate.calibrate(cfg, variables, images, budget_ms=1e6, exit_shares=(0.3, 0.6),
                               placements=[(1,), (2,), (1, 2)], max_timed=2)
  assert {tuple(p["exits"]) for p in result["points"]} == {(1,), (2,), (1, 2)}
  timed = [p for p in result["points"] if p.get("ms") is not None]
  assert 1 <= len(timed) <= 2 and result["best"] in result["front"]
  assert result["points"][result["best"]]["ms"] is not None


def test_bench_table_groups_and_ratios_against_segvit():
  import bench_table  # pylint: disable=g-import-not-at-top
  row = lambda method, tokens, gflops, ms, batch: dict(
      method=method, config=f"configs/step.py:method={method},variant=B/16", device="gpu",
      variant="B/16", image_size=[1024, 1024], dtype="bf16", batch=batch,
      mean_tokens_per_stage=[tokens], gflops_useful=gflops, gflops_executed=gflops,
      ms_per_image_median=ms, ms_per_image_min=ms, ms_per_image_max=ms,
      images_per_s=1000 / ms, peak_bytes=2**30)
  lines = bench_table.table([row("dcts", 1000, 20.0, 50.0, 1), row("segvit", 4000, 80.0, 200.0, 1),
                             row("segvit", 4000, 80.0, 100.0, 8)])
  text = "\n".join(lines)
  assert text.count("**B/16 1024x1024, bf16, batch") == 2       # one group per batch
  dcts = next(l for l in lines if l.startswith("| method=dcts"))
  assert "| 4.00× | 4.00× / 4.00× | 4.00× | 2.5× / 2.6× / 3.4× |" in dcts  # vs its SegViT
  assert "| 1024 |" in dcts                                       # peak MiB


def test_peer_bench_cells():
  """experiments/peer_bench.py: cells parse or name what is wrong; a small cell times timm's
  encoder, ours and our SegViT interleaved, and the memory rows see the N x N matrix go."""
  assert peer_bench.parse_cells("Ti/16@512,B/16@1024") == [("Ti/16", 512), ("B/16", 1024)]
  for bad in ("X/16@512", "Ti/16@500", "Ti/16"):
    with pytest.raises(ValueError, match="VARIANT@SIZE"):
      peer_bench.parse_cells(bad)
  pytest.importorskip("step_jax.testing.tv_shim")
  pytest.importorskip("timm")
  row = peer_bench.time_cell("Mu/16", 32, reps=1)
  for name in ("timm", "ours_encoder", "ours_segvit"):
    assert 0 < row[name]["ms_min"] <= row[name]["ms_median"] <= row[name]["ms_max"]
  assert row["timm_over_ours_encoder"]["median"] > 0
  mem = {impl: peer_bench.memory_cell("Mu/16", 512, impl)["temp_bytes"]
         for impl in ("einsum", "chunked")}
  assert mem["chunked"] < mem["einsum"]


def test_peer_bench_split_counts_the_encoders_flops():
  """--split rows: the analytic FLOPs they divide by are XLA's count of our encoder, and both
  encoders' time is split into dense layers, attention and the rest."""
  for variant, res in (("Ti/16", 256), ("B/16", 256)):   # XLA adds elementwise ops (≤ 5 %)
    compiled, _ = peer_bench.our_encoder_program(variant, res, impl="einsum")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    dense, attn = peer_bench.encoder_gflops(variant, res)
    assert 0.94 < (dense + attn) * 1e9 / cost["flops"] <= 1.0, variant
  pytest.importorskip("step_jax.testing.tv_shim")
  pytest.importorskip("timm")
  row = peer_bench.split_cell("Mu/16", 384, reps=1)   # 576 tokens (4 test devices: chunked)
  for side in ("ours", "timm"):
    assert row[side]["dense_ms"] > 0 and row[side]["dense_gflop_per_s"] > 0
    assert row[side]["attention_ms"] > 0 or row["ours_attention"] != "cpu_fused"


def test_halt_sweep_matches_the_model_at_each_threshold(images, prepared):
  """experiments/halt_sweep.py reads every (τ, k) from one forward: its halted count at the
  calibrated τ of exit 1 is what the model itself halts there; τ 0 / k 0 makes every
  active token a candidate and a halter, nothing passes τ 1, and keeping more is halting
  less."""
  _, model, variables, _ = prepared
  tau = float(model.exit_thresholds()[0])
  total, cand, halt = halt_sweep.sweep(model, variables, images, (0.0, tau, 1.0), (0, 5))
  _, maps = exit_analysis.analyse(model, variables, images)
  active = maps["active_tokens"]
  assert total == active[:, 0].sum()
  assert halt[(tau, 0)] == (active[:, 0] - active[:, 1]).sum() > 0   # keep_top_k=0 model
  assert cand[0.0] == halt[(0.0, 0)] == total and cand[1.0] == 0
  assert halt[(tau, 5)] <= halt[(tau, 0)] == cand[tau]


def test_print_row_prints_and_appends(tmp_path, capsys):
  """runtime.writers.print_row, the experiments' result lines: printed, and appended to a file
  in a folder it creates; read_jsonl reads them back in order."""
  from step_jax.runtime import writers   # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "new" / "rows.jsonl")
  writers.print_row({"a": 1}, path)
  writers.print_row({"b": [2, 3]}, path)
  writers.print_row({"c": 4})              # no file
  assert capsys.readouterr().out.splitlines() == ['{"a": 1}', '{"b": [2, 3]}', '{"c": 4}']
  assert writers.read_jsonl(path) == [{"a": 1}, {"b": [2, 3]}]


@pytest.mark.slow
def test_bench_gpu_dry_run_on_cpu(tmp_path):
  """experiments/bench_gpu.sh, the one-call GPU script, end to end on the CPU with tiny cells:
  a policy trained when none is given, synthetic frames, a benchmark row per cell, the peer
  row, the table; a cell that cannot fit the budget is skipped by name."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path), REPS="2",
             CELLS="Mu/16@64:fp32:1:segvit Mu/16@64:fp32:1:step peer:Mu/16@64:fp32",
             POLICY=str(tmp_path / "policy"),
             POLICY_CONFIG="configs/policy.py:dataset=synthetic,size=smoke")
  subprocess.run(["bash", "experiments/bench_gpu.sh"], cwd=root, env=env, check=True,
                 capture_output=True, timeout=900)
  rows = [json.loads(l) for l in open(tmp_path / "bench_gpu.jsonl")]
  assert [r["method"] for r in rows] == ["segvit", "step"]
  assert rows[1]["gflops_useful"] > 0 and rows[1]["exit_threshold"]
  peer = [json.loads(l) for l in open(tmp_path / "peer_bench_gpu.jsonl")]
  assert peer[0]["variant"] == "Mu/16" and peer[0]["timm"]["ms_median"] > 0
  assert "method=step" in open(tmp_path / "bench_gpu_table.md").read()
  env.update(BUDGET_S="10", MIN_CELL_S="60", OUT=str(tmp_path / "late"))
  subprocess.run(["bash", "experiments/bench_gpu.sh"], cwd=root, env=env, check=True,
                 capture_output=True, timeout=300)
  assert "Mu/16@64:fp32:1:segvit and later cells skipped" in open(
      tmp_path / "late" / "bench_gpu.log").read()
