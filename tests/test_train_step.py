"""Training STEP-family models: the policy net is trained first (or loaded) and stays frozen,
its BatchNorm statistics travel in the train state, exits train without pruning until
`prune_from_step`, the oracle merge reads labels, and the train step uses one static shape
with the same outputs as the bucketed inference model."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, rel_diff  # tests/numerics.py

from configs import camvid
from configs import step as step_config
from step_jax.analysis import benchmark
from step_jax.training import optim
from step_jax.training import train
from step_jax.training import train_policy
from step_jax.models import variables as variables_lib
from step_jax.runtime import checkpoint as ckpt_lib


def _tiny(method, **model):
  cfg = step_config.get_config(f"method={method},variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.update(image_size=(64, 64), num_train=8, num_eval=4)
  cfg.model.update(posemb_grid=(4, 4), head_layers=1, **model)
  cfg.batch_size = 4
  cfg.optim.update(total_steps=4, warmup_steps=1)
  cfg.update(log_every=2, eval_every=0, checkpoint_every=0, eval_batch_size=4)
  return cfg


def _batch(cfg, seed=0):
  rng = np.random.default_rng(seed)
  h, w = cfg.data.image_size
  return dict(image=rng.integers(0, 256, (2, h, w, 3)).astype(np.uint8),
              label=rng.integers(0, cfg.num_classes, (2, h, w)).astype(np.int32))


def test_optimizer_freezes_the_policy_subtree():
  cfg = _tiny("dcts")
  tx = optim.make_optimizer(cfg.optim)
  params = dict(backbone=dict(kernel=jnp.ones((2, 2))), head=dict(kernel=jnp.ones((2, 2))),
                policy=dict(kernel=jnp.ones((2, 2))))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert np.all(np.asarray(updates["policy"]["kernel"]) == 0)      # no step, no decay
  assert np.all(np.asarray(updates["backbone"]["kernel"]) != 0)
  # ... and the loss does not differentiate it (a function that does depend on it).
  f = lambda p: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(optim.without_gradient(p)))
  g = jax.grad(f)(params)
  assert np.all(np.asarray(g["policy"]["kernel"]) == 0)
  assert np.all(np.asarray(g["backbone"]["kernel"]) == 2)
  assert optim.without_gradient(params, ("absent",)) == params


def test_a_seed_draws_the_recorded_initial_weights():
  """Init draws what it drew for the recorded runs (experiments/results). The blocks after
  the first exit sit inside the compact exit switch; initialising a switch-free clone instead
  draws other values for them (it did for a while: the README main job went 60.4 -> 59.3 %)."""
  cfg = _tiny("step")
  model = variables_lib.create_model(cfg)
  v = jax.jit(lambda r: variables_lib.init_variables(model, cfg, r))(jax.random.key(0))
  sums = [float(np.sum(v["params"]["backbone"][f"blocks_{i}"]["mlp"]["fc1"]["kernel"]))
          for i in range(4)]
  # (recorded to 4 decimals: <= 5e-5 off, 4e-6 of the largest)
  assert_close(sums, [5.4848, 13.4846, 4.0909, -12.7573], 1e-5)


def test_policy_is_required_and_checked(tmp_path):
  cfg = _tiny("dcts")
  cfg.model.policy.auto_train_steps = 0
  model = variables_lib.create_model(cfg)
  with pytest.raises(ValueError, match="needs a trained policy net"):
    train.policy_variables(cfg, model, str(tmp_path))
  # A policy trained with another width does not fit.
  other = _tiny("dcts")
  other.model.policy.hidden = 16
  pol = variables_lib.random_variables(variables_lib.create_model(other).policy, (64, 64))
  train_policy.save(str(tmp_path / "pol"), pol)
  cfg.model.policy.init_from = str(tmp_path / "pol")
  with pytest.raises(ValueError, match="does not fit"):
    train.policy_variables(cfg, model, str(tmp_path))


def test_static_train_model_matches_bucketed_model():
  """Training uses one capacity and masked exits: same outputs as buckets + compaction."""
  cfg = _tiny("step", exit_threshold=0.3)
  model = variables_lib.create_model(cfg)
  variables = variables_lib.random_variables(model, (64, 64), seed=1)
  images = _batch(cfg)["image"]
  out_b, info_b = jax.jit(model.apply)(variables, images)
  out_s, info_s = jax.jit(train.train_model(model, cfg).apply)(variables, images)
  assert int(np.asarray(info_s["capacity"])) == 16                    # full grid
  np.testing.assert_array_equal(info_b["halt_stage"], info_s["halt_stage"])
  assert_close(out_s["pred_masks"], out_b["pred_masks"], 1e-5)
  assert_close(out_s["pred_logits"], out_b["pred_logits"], 1e-5)


def test_oracle_loss_reads_labels():
  cfg = _tiny("oracle")
  model = variables_lib.create_model(cfg)
  params = jax.eval_shape(lambda: variables_lib.init_variables(model, cfg, jax.random.key(0)))
  loss, _ = jax.eval_shape(lambda p, b: train.loss_fn(p, model, b, jax.random.key(0), cfg),
                           params["params"], _batch(cfg))
  assert loss.shape == ()


@pytest.mark.parametrize("method,exit_head", [("segvit", "segvit"), ("dtop", "dtop"),
                                              ("step", "segvit"), ("oracle", "segvit"),
                                              ("dtop", "atm_shallow_first")])
def test_guard_names_the_loss_terms_the_loss_returns(method, exit_head):
  """init_state names the loss terms from the model's head stages without tracing it: the
  names must be exactly loss_fn's metrics (train_step maps one over the other)."""
  cfg = _tiny(method, exit_head=exit_head, exit_layers=(1, 3) if method != "segvit" else ())
  model = train.train_model(variables_lib.create_model(cfg), cfg)
  v = jax.eval_shape(lambda: variables_lib.init_variables(model, cfg, jax.random.key(0)))
  _, metrics = jax.eval_shape(
      lambda v, b: train.loss_fn(v["params"], model, b, jax.random.key(0), cfg, v), v,
      _batch(cfg))
  state = jax.eval_shape(functools.partial(train.init_state, model=model,
                                           tx=optim.make_optimizer(cfg.optim), config=cfg),
                         jax.random.key(0))
  assert set(state["guard"]["first_bad"]["loss"]) == set(metrics)
  # DToP: two exit heads and the final one; 'segvit': a stage per out layer and an exit
  # prediction per exit; 'atm_shallow_first': a stage per out layer (the exits among them).
  stages = {"dtop": 3, "segvit": len(model.out_layers) + len(model.exit_layers),
            "atm_shallow_first": len(model.out_layers)}[exit_head]
  assert len(metrics) == 1 + 3 * stages == 1 + 3 * model.num_predictions()


@pytest.mark.parametrize("auto_train", [
    False, pytest.param(True, marks=pytest.mark.slow)])  # compiling the policy's train step
def test_step_end_to_end_policy_frozen_and_pruning_schedule(tmp_path, capsys, auto_train):
  """method=step: the policy from init_from (or trained into the workdir first), 2 steps
  without pruning and 2 with; the policy (params and BatchNorm statistics) is kept exactly,
  GFLOPs come from real token counts, and the workdir restores as variables."""
  cfg = _tiny("step")
  cfg.prune_from_step = 2
  cfg.prune_optim.warmup_steps = 1
  if auto_train:
    cfg.model.policy.auto_train_steps = 1
    policy_dir = str(tmp_path / "run" / "policy")
  else:  # a saved policy with non-trivial BatchNorm statistics
    policy_dir = str(tmp_path / "policy")
    pol = variables_lib.random_variables(variables_lib.create_model(cfg).policy, (64, 64), seed=3)
    pol["batch_stats"] = jax.tree.map(lambda x: x + 0.5, pol["batch_stats"])
    train_policy.save(policy_dir, pol)
    cfg.model.policy.init_from = policy_dir
  wd = str(tmp_path / "run")
  state, ev = train.train_and_evaluate(cfg, wd)
  out = capsys.readouterr().out
  assert "steps 1..2: nothing halts, the exits' losses weigh 0 (BASE)" in out
  assert "with a fresh optimizer and schedule" in out
  # DToP's fine-tuning restarted the optimizer at step 3: Adam has counted 2 steps, not 4.
  counts = {int(x) for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
            if "count" in jax.tree_util.keystr(p)}
  assert counts == {2}
  assert ("training the policy net first" in out) == auto_train
  pol = train_policy.load_variables(policy_dir)
  for col, got in (("params", state["params"]["policy"]),
                   ("batch_stats", state["model_state"]["batch_stats"]["policy"])):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), pol[col])
  assert ev["step"] == 4 and 0.0 <= ev["miou"] <= 1.0
  assert len(ev["tokens_per_stage"]) == 2 and ev["tokens_full"] == 16
  assert ev["tokens_per_stage"][1] <= ev["tokens_per_stage"][0] <= 16
  assert ev["gflops"] <= ev["gflops_executed"] + 1e-9 <= ev["gflops_full"] + 1e-9
  with open(os.path.join(wd, "eval_val.json")) as f:
    assert json.load(f)["gflops"] == pytest.approx(ev["gflops"])
  variables = variables_lib.load(None, wd)
  assert set(variables) == {"params", "batch_stats"}
  restored, trained = jax.device_get(variables["params"]), jax.device_get(state["params"])
  # 64x64 crops have no 8x8/16x16 windows: restoring adds never-merging heads for them.
  added = set(restored["policy"]) - set(trained["policy"])
  assert added == {"hidden_8", "logit_8", "hidden_16", "logit_16"}
  restored = dict(restored, policy={k: v for k, v in restored["policy"].items()
                                    if k not in added})
  jax.tree.map(np.testing.assert_array_equal, restored, trained)
  if auto_train:   # (the slow variant; 40 s more on 2 CPU cores)
    # `python -m step_jax.cli.benchmark --workdir=wd`: the run's own config and weights; then
    # the same weights on 128x128 images, where the 8x8 windows the policy never saw exist.
    r = benchmark.run_config(None, wd, num_images=1, reps=1, warmup=0)
    assert r["weights"] == f"trained ({wd})" and len(r["mean_tokens_per_stage"]) == 2
    big = ckpt_lib.read_config(wd)
    big.data.image_size = (128, 128)
    r = benchmark.run_config(big, wd, num_images=1, reps=1, warmup=0)
    assert r["mean_tokens_per_stage"][0] <= 64 and r["gflops_useful"] <= r["gflops_executed"]


def test_phase_model_halts_nothing_before_pruning_starts():
  cfg = _tiny("dtop", exit_threshold=0.0, keep_top_k=0)   # pruning halts every token
  model = train.train_model(variables_lib.create_model(cfg), cfg)
  variables = variables_lib.random_variables(model, (64, 64))
  halt = jax.jit(lambda v, step, prune_from: train.phase_model(model, step, prune_from).apply(
      v, _batch(cfg)["image"])[1]["halt_stage"], static_argnums=2)
  n_exits = len(model.exit_layers)
  for step, prune_from, halted in ((0, 2, False), (1, 2, False), (2, 2, True), (7, 2, True),
                                   (0, 0, True)):
    got = np.asarray(halt(variables, jnp.asarray(step), prune_from))
    assert np.all(got < n_exits) if halted else np.all(got == n_exits), (step, prune_from)


def test_phase_optimizer_switches_optimizer_and_schedule_at_the_phase_start():
  cfg = _tiny("step")
  cfg.optim.update(total_steps=10, warmup_steps=0, lr=1e-2)   # first updates: 1e-2 vs 1e-6
  cfg.prune_from_step = 4
  cfg.prune_optim.update(warmup_steps=3, lr=1e-3)
  phases = train.optimizer_phases(cfg)
  txs = [optim.make_optimizer(c) for _, c in phases]
  params = dict(backbone=dict(kernel=jnp.ones((3, 2))), head=dict(bias=jnp.ones(2)))
  grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), params)

  @jax.jit
  def run(step):
    tx, lr_fn = train.phase_optimizer(txs, phases, step)
    return tx.update(grads, tx.init(params), params)[0], lr_fn(step)
  for step in range(10):
    phase = int(step >= 4)
    updates, lr = run(jnp.asarray(step))
    first, pcfg = phases[phase]
    want = txs[phase].update(grads, txs[phase].init(params), params)[0]
    assert_close(updates, want, 1e-6)   # jitted switch vs eager ops: equal up to rounding
    other = txs[1 - phase].update(grads, txs[1 - phase].init(params), params)[0]
    assert rel_diff(updates["backbone"]["kernel"], other["backbone"]["kernel"]) > 0.5
    assert float(lr) == pytest.approx(float(optim.learning_rate_fn(pcfg)(step - first)))
  one = [(0, cfg.optim)]
  tx, lr_fn = train.phase_optimizer(txs[:1], one, jnp.asarray(5))
  assert tx is txs[0] and float(lr_fn(5)) == pytest.approx(
      float(optim.learning_rate_fn(cfg.optim)(5)))


def test_one_program_trains_both_dtop_phases():   # compiles three small train steps
  """phased_train_step, one program for DToP's two phases, does what the two separate steps
  did: pruning off with the BASE optimizer, then pruning on with the fresh one."""
  cfg = _tiny("dtop", exit_threshold=0.0, keep_top_k=0)   # pruning halts every token
  cfg.prune_from_step = 1
  cfg.prune_optim.warmup_steps = 1
  model = train.train_model(variables_lib.create_model(cfg), cfg)
  phases = train.optimizer_phases(cfg)
  txs = [optim.make_optimizer(c) for _, c in phases]
  state = jax.jit(functools.partial(train.init_state, model=model, tx=txs[0], config=cfg))(
      jax.random.key(0))
  batch = _batch(cfg)
  one = jax.jit(functools.partial(train.phased_train_step, model=model, txs=txs,
                                  phases=phases, prune_from=1, config=cfg))
  base = jax.jit(functools.partial(train.train_step, model=model.clone(exit_threshold=1.0),
                                   tx=txs[0], config=cfg,
                                   exit_weight=cfg.loss.base_exit_weight))
  tune_lr = lambda s: optim.learning_rate_fn(phases[1][1])(s - 1)
  prune = jax.jit(functools.partial(train.train_step, model=model, tx=txs[1], config=cfg,
                                    lr_fn=tune_lr))
  close = lambda a, b: assert_close(a, b, 1e-5)
  (got, m_got), (want, m_want) = one(state, batch), base(state, batch)
  close((got["params"], m_got), (want["params"], m_want))
  fresh = lambda st: dict(st, opt_state=txs[1].init(st["params"]))
  got, want = fresh(got), fresh(want)
  (got, m_got), (want, m_want), (_, m_off) = one(got, batch), prune(want, batch), base(want, batch)
  close((got["params"], m_got), (want["params"], m_want))
  assert rel_diff(m_got["loss"], m_off["loss"]) > 1e-4   # pruning is on now
  assert float(m_got["lr"]) == pytest.approx(float(tune_lr(1)))


def test_segvit_exits_train_as_segvit_before_pruning():
  """exit_head='segvit' before prune_from_step: nothing halts and the exits' losses weigh 0
  (set_dtop_recipe), so the step is SegViT's own (the model without exit layers, same
  variables): same loss and gradient. Weighing the exits 1 changes the gradient; after
  pruning starts they weigh loss.exit_weight. (Head
  dropout off: the exits' stage-0 calls draw dropout keys, so with dropout the final head's
  masks are other draws from the same distribution.)"""
  cfg = _tiny("dtop", head_dropout=0.0)
  assert cfg.model.exit_head == "segvit" and cfg.loss.base_exit_weight == 0.0
  cfg.prune_from_step, cfg.prune_optim = 2, None          # one schedule
  model = train.train_model(variables_lib.create_model(cfg), cfg)
  tx = optim.make_optimizer(cfg.optim)
  state = jax.jit(functools.partial(train.init_state, model=model, tx=tx, config=cfg))(
      jax.random.key(0))
  batch = _batch(cfg)
  step = lambda c: jax.jit(functools.partial(train.phased_train_step, model=model, txs=[tx],
                                             phases=[(0, c.optim)], prune_from=2, config=c))
  segvit = jax.jit(functools.partial(train.train_step, model=model.clone(exit_layers=()),
                                     tx=tx, config=cfg))
  plain = {k: v for k, v in state.items() if k != "guard"}   # its loss names are the exits'
  (_, got), (_, want) = step(cfg)(state, batch), segvit(plain, batch)
  assert_close((got["loss"], got["grad_norm"]), (want["loss"], want["grad_norm"]), 1e-5)
  ones = cfg.copy_and_resolve_references()
  ones.loss.base_exit_weight = 1.0
  _, other = step(ones)(state, batch)
  assert rel_diff(other["grad_norm"], want["grad_norm"]) > 1e-3
  assert float(other["loss"]) > float(want["loss"])      # the exits' terms count now
  # After prune_from_step the exits weigh loss.exit_weight: 0 (and nothing halting) is
  # SegViT's step again.
  never = model.clone(exit_threshold=(1.0,) * len(model.exit_layers))
  late = dict(state, step=jnp.asarray(2, jnp.int32))
  zero = cfg.copy_and_resolve_references()
  zero.loss.exit_weight = 0.0
  after = lambda c: jax.jit(functools.partial(train.phased_train_step, model=never, txs=[tx],
                                              phases=[(0, c.optim)], prune_from=2, config=c))
  (_, got), (_, on) = after(zero)(late, batch), after(cfg)(late, batch)
  want = segvit(dict(plain, step=jnp.asarray(2, jnp.int32)), batch)[1]
  assert_close((got["loss"], got["grad_norm"]), (want["loss"], want["grad_norm"]), 1e-5)
  assert rel_diff(on["grad_norm"], want["grad_norm"]) > 1e-3
  assert train.prediction_weights(model, 0.0) == [1.0, 0.0] + [1.0] * (
      model.num_predictions() - 2)                         # final, the exit, SegViT's aux


def test_optimizer_phases_restart_the_schedule_for_pruning():
  cfg = _tiny("step")
  cfg.optim.update(total_steps=100, warmup_steps=10, lr=1e-3)
  cfg.prune_from_step = 60
  cfg.prune_optim.update(warmup_steps=5)
  (s0, base), (s1, tune) = train.optimizer_phases(cfg)
  assert (s0, base.total_steps, s1, tune.total_steps) == (0, 60, 60, 40)
  assert (base.warmup_steps, tune.warmup_steps, tune.poly_power) == (10, 5, 0.9)
  lr_base, lr_tune = optim.learning_rate_fn(base), optim.learning_rate_fn(tune)
  assert float(lr_base(60)) == 0.0                              # BASE schedule ran out
  assert float(lr_tune(0)) == pytest.approx(1e-6, rel=1e-4)      # fresh warmup from init
  assert float(lr_tune(5)) == pytest.approx(1e-3, rel=1e-4)      # back at the peak
  cfg.optim.lr = 5e-4                       # prune_optim.lr follows optim.lr ...
  assert train.optimizer_phases(cfg)[1][1].lr == pytest.approx(5e-4)
  cfg.prune_optim.lr = 1e-4                 # ... until set: a gentler fine-tuning
  (_, base), (_, tune) = train.optimizer_phases(cfg)
  assert (base.lr, tune.lr) == (pytest.approx(5e-4), pytest.approx(1e-4))
  assert len(train.optimizer_phases(cfg, has_exits=False)) == 1  # SegViT: one schedule
  cfg.prune_optim = None                                         # the older recipe
  assert train.optimizer_phases(cfg) == [(0, cfg.optim)]
  bad = _tiny("step")
  bad.optim.total_steps, bad.prune_from_step = 100, 60
  bad.prune_optim.warmup_steps = 40
  with pytest.raises(ValueError, match="prune_optim.warmup_steps=40 must be below the 40"):
    train.optimizer_phases(bad)
  bad.prune_optim.warmup_steps, bad.prune_from_step = 5, 100
  with pytest.raises(ValueError, match="prune_from_step=100 must lie in"):
    train.optimizer_phases(bad)


def test_camvid_exit_head_designs():
  """'segvit' (default) and 'atm_shallow_first': SegViT's head, the latter with stages at
  out_layers ∪ exits; DToP otherwise. The old name 'atm' is refused with the new names."""
  for design, out_layers, exit_heads in (("segvit", (6, 8, 12), 0),
                                         ("atm_shallow_first", (6, 8, 12), 0),
                                         ("dtop", (12,), 2), ("dtop_multiclass", (12,), 2)):
    cfg = camvid.get_config(f"method=step,size=cpu,variant=Ti/16,exit_head={design}")
    model = variables_lib.create_model(cfg)
    assert (model.exit_head, tuple(model.out_layers), len(model.exit_heads)) == (
        design, out_layers, exit_heads)
    assert model.exit_layers == (6, 8) and model.head.binary_cls == (design == "dtop")
    assert model.exit_thresholds() == (0.8, 0.8)   # the dataset registry's CamVid value
  assert variables_lib.create_model(camvid.get_config("method=step,size=cpu")).exit_head \
      == "segvit"
  with pytest.raises(ValueError, match="model.exit_head='x'"):
    variables_lib.create_model(camvid.get_config("method=step,size=cpu,exit_head=x"))
  with pytest.raises(ValueError, match="renamed 'atm_shallow_first'"):
    variables_lib.create_model(camvid.get_config("method=step,size=cpu,exit_head=atm"))
  # Ti/16 with exits at layers 4 and 8: 'segvit' keeps SegViT's three stages; 'atm_shallow_first'
  # adds a stage at 4.
  cfg = camvid.get_config("method=step,size=cpu,variant=Ti/16,exits=4-8")
  assert variables_lib.create_model(cfg).head.num_stages == 3
  cfg = camvid.get_config("method=step,size=cpu,variant=Ti/16,exits=4-8,exit_head=atm_shallow_first")
  assert variables_lib.create_model(cfg).head.num_stages == 4


def test_camvid_configs_build_every_method():
  for method in ("segvit", "cts", "dcts", "dtop", "cts_dtop", "step"):
    cfg = camvid.get_config(f"method={method},size=cpu")
    model = variables_lib.create_model(cfg)
    assert (model.policy is not None) == (method in ("cts", "dcts", "cts_dtop", "step"))
    assert bool(model.exit_layers) == (method in ("dtop", "cts_dtop", "step"))
    assert cfg.prune_from_step == (1750 if model.exit_layers else 0)   # the last eighth
    if model.merge == "cts":  # 40 % of the 11x15 grid's 5x7 complete 2x2 windows
      assert model.num_shared((11, 15)) == 14


@pytest.mark.slow   # two small trainings
def test_fork_base_continues_a_segvit_run_into_pruning(tmp_path):
  """experiments/fork_base.py: the segvit-design run's checkpoint at prune_from_step holds the
  SegViT run's arrays there (parameters, optimizer moments, step), and training resumes from
  it into the pruning steps; a config whose BASE is not SegViT's training is refused."""
  import sys   # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
  import fork_base   # pylint: disable=g-import-not-at-top
  seg = _tiny("segvit")
  seg.update(checkpoint_every=2, keep_checkpoints=5)
  seg_wd = str(tmp_path / "segvit")
  train.train_and_evaluate(seg, seg_wd)
  cfg = _tiny("dtop")                     # SegViT's head with exits: the same arrays
  cfg.prune_from_step, cfg.prune_optim = 2, None
  wd = str(tmp_path / "fork")
  taken, own = fork_base.fork(cfg, seg_wd, wd)
  assert taken > 0 and all(k.startswith("['guard']") for k in own)
  model = variables_lib.create_model(cfg)
  want, _ = ckpt_lib.restore_subtree(seg_wd, _abstract_params(seg), 2)
  got, step = ckpt_lib.restore_subtree(wd, _abstract_params(cfg), None)
  assert step == 2 and int(got["step"]) == 2
  jax.tree.map(np.testing.assert_array_equal, got, want)
  state, _ = train.train_and_evaluate(cfg, wd)          # resumes: steps 3 and 4 prune
  assert int(state["step"]) == 4 and model.exit_layers
  bad = cfg.copy_and_resolve_references()
  bad.loss.base_exit_weight = 1.0
  with pytest.raises(ValueError, match="base_exit_weight=0"):
    fork_base.fork(bad, seg_wd, str(tmp_path / "bad"))


def _abstract_params(cfg):
  model = variables_lib.create_model(cfg)
  tx = optim.make_optimizer(cfg.optim)
  abstract = jax.eval_shape(functools.partial(train.init_state, model=model, tx=tx, config=cfg),
                            jax.random.key(0))
  return {"params": abstract["params"], "step": abstract["step"]}
