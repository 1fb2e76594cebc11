"""The training loop learns, runs end to end, resumes after a kill, guards against NaNs;
the optimiser does what it says."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import killed  # tests/killed.py

from numerics import assert_close  # tests/numerics.py

from configs import segvit
from step_jax.training import optim
from step_jax.training import train
from step_jax.runtime import writers
from step_jax.data import get_source
from step_jax.models import variables as variables_lib


def _smoke(**overrides):
  cfg = segvit.get_config("variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.num_train, cfg.data.num_eval = 16, 8
  cfg.update(overrides)
  return cfg


def _tiny():
  """The smallest smoke model (one ATM stage, one decoder layer, 32x32): compiles fast."""
  cfg = _smoke()
  cfg.data.update(image_size=(32, 32), num_train=16, num_eval=6)
  cfg.model.update(out_layers=(2,), head_layers=1, posemb_grid=(2, 2))
  cfg.optim.update(total_steps=8, warmup_steps=2)
  cfg.update(log_every=4, eval_every=0, checkpoint_every=4, keep_checkpoints=2,
             eval_batch_size=4)
  return cfg


def _single_device_step():
  """(cfg, state, jitted train_step, batch of 4) on one device, no shardings."""
  cfg = _tiny()
  cfg.optim.update(warmup_steps=0, total_steps=600)
  model, tx = variables_lib.create_model(cfg), optim.make_optimizer(cfg.optim)
  state = jax.jit(functools.partial(train.init_state, model=model, tx=tx, config=cfg))(
      jax.random.key(0))   # eagerly, every op of the init would compile on its own
  src = get_source(cfg.data, "train", cfg.num_classes, cfg.ignore_index)
  batch = dict(image=np.stack([src[i]["image"] for i in range(4)]),
               label=np.stack([src[i]["label"] for i in range(4)]).astype(np.int32))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=cfg))
  return cfg, state, step, batch


def test_loss_falls_when_overfitting_one_batch():
  _, state, step, batch = _single_device_step()
  first = None
  for _ in range(40):
    state, m = step(state, batch)
    first = first if first is not None else float(m["loss"])
  assert float(m["loss"]) < 0.6 * first, (first, float(m["loss"]))


def test_main_job_end_to_end(tmp_path):
  cfg = _tiny()
  cfg.eval_every = 4
  state, ev = train.train_and_evaluate(cfg, str(tmp_path))
  saved = json.load(open(tmp_path / "eval_val.json"))
  assert saved["images"] == 6 and 0.0 <= saved["miou"] <= 1.0
  assert set(saved["per_class_iou"]) == {str(i) for i in range(6)}
  assert saved["step"] == 8 and saved["gflops"] > 0 and saved["compiled_shapes"] == 1
  lines = writers.read_jsonl(tmp_path / "metrics.jsonl")
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [4, 8]
  assert all(l["skipped_steps"] == 0 and l["grad_norm"] > 0 for l in train_lines)
  assert [l["step"] for l in lines if "val/miou" in l] == [4, 8]
  assert any("steps_per_sec" in l for l in lines)   # clu ReportProgress
  assert json.load(open(tmp_path / "config.json"))["model"]["variant"] == "Mu/16"
  # Periodic (4) and final (8) checkpoints, with the input iterator's state.
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps == [4, 8]
  assert os.listdir(tmp_path / "checkpoints" / "8" / "data")
  assert int(state["step"]) == 8
  # Running again resumes at the last step: nothing to train, same result.
  _, ev2 = train.train_and_evaluate(cfg, str(tmp_path))
  assert ev2["resumed_from"] == 8 and ev2["miou"] == ev["miou"]


def _tiny_pruning():
  """_tiny with an exit after block 1 that halts every token, pruning on from step 2 (DToP's
  second phase, a fresh optimizer): the step-4 checkpoint lies inside the pruning phase."""
  cfg = _tiny()
  cfg.model.update(out_layers=(4,), exit_layers=(1,), exit_threshold=0.0, keep_top_k=0)
  cfg.prune_from_step = 2
  cfg.prune_optim.warmup_steps = 1
  return cfg


@pytest.mark.parametrize("pruning", [pytest.param(False, marks=pytest.mark.slow), True])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, pruning):
  """SIGKILLed after its step-4 checkpoint, the run resumes bit-identical to an
  uninterrupted one; by default during the pruning fine-tuning of a model with an exit
  (SegViT alone with -m slow)."""
  cfg = _tiny_pruning() if pruning else _tiny()
  # Uninterrupted reference.
  ref_state, _ = train.train_and_evaluate(cfg, str(tmp_path / "ref"))
  ref = jax.device_get(ref_state["params"])
  # Same run in a subprocess, SIGKILLed right after its step-4 checkpoint.
  wd = tmp_path / "run"
  killed.run_killed_after("step_jax.training.train", str(wd), cfg, 4, timeout=240)
  # (with pruning the BASE model's step-2 checkpoint is kept too)
  assert sorted(os.listdir(wd / "checkpoints")) == (["2", "4"] if pruning else ["4"])
  # Resume: steps 5..8 from the checkpoint (state + grain iterator position).
  state, ev = train.train_and_evaluate(cfg, str(wd))
  assert ev["resumed_from"] == 4
  if pruning:   # tokens really halted in the evaluation after the pruning steps
    tokens = ev["tokens_per_stage"]
    assert tokens[1] < tokens[0], tokens
  got = jax.device_get(state["params"])
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref)[0], jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))  # bit-identical


def _nan_params(cfg, tmp_path):
  """An init_from .npz whose class-head bias is NaN (every step's loss is non-finite)."""
  model = variables_lib.create_model(cfg)
  shapes = jax.eval_shape(lambda: variables_lib.init_variables(model, cfg, jax.random.key(0)))
  bias = np.zeros(shapes["params"]["head"]["class_embed"]["bias"].shape, np.float32)
  bias[0] = np.nan
  path = str(tmp_path / "nan.npz")
  np.savez(path, **{"head/class_embed/bias": bias})
  return path


def test_nan_policy_stop_raises_with_step_and_saves_nothing(tmp_path):
  cfg = _tiny()
  cfg.update(init_from=_nan_params(cfg, tmp_path), nan_policy="stop", checkpoint_every=1,
             log_every=4)
  with pytest.raises(FloatingPointError,
                     match=r"step 1: loss terms \['loss', 'loss_ce'\]; gradients of \['"):
    train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert not [d for d in os.listdir(tmp_path / "wd" / "checkpoints") if d.isdigit()]


def test_nan_policy_skip_counts_and_never_checkpoints_nan(tmp_path):
  cfg = _tiny()
  cfg.update(init_from=_nan_params(cfg, tmp_path), nan_policy="skip")
  state, ev = train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  assert ev["skipped_steps"] == 8 and int(state["guard"]["first_bad_step"]) == 1
  lines = [l for l in writers.read_jsonl(tmp_path / "wd" / "metrics.jsonl") if "loss" in l]
  assert [l["skipped_steps"] for l in lines] == [4, 8] and lines[0]["nonfinite"] == 4
  # The parameters were never updated, and nothing non-finite reached the disk.
  assert not [d for d in os.listdir(tmp_path / "wd" / "checkpoints") if d.isdigit()]


def test_skip_drops_only_the_bad_update():
  """Inside the step: a NaN update leaves params and optimizer state untouched."""
  _, state, step, batch = _single_device_step()
  good, _ = step(state, batch)
  bad_in = jax.tree.map(lambda x: x, good)
  bad_in["params"]["backbone"]["pos_embedding"] = good["params"]["backbone"][
      "pos_embedding"].at[0, 0, 0].set(jnp.inf)
  out, m = step(bad_in, batch)
  assert int(m["nonfinite"]) == 1 and int(out["guard"]["skipped"]) == 1
  assert int(out["guard"]["first_bad_step"]) == 2 and int(out["step"]) == 2
  for a, b in zip(jax.tree.leaves((bad_in["params"], bad_in["opt_state"])),
                  jax.tree.leaves((out["params"], out["opt_state"]))):
    np.testing.assert_array_equal(a, b)
  report = train.nonfinite_report(out["guard"], out["params"])
  assert "step 2" in report and "gradients of ['backbone/" in report
  with pytest.raises(FloatingPointError, match="step 2"):
    train.check_guard(out, "stop")
  assert train.check_guard(out, "skip") == report
  # A good step afterwards applies normally and the count stays.
  fixed = dict(out, params=good["params"])
  out2, m2 = step(fixed, batch)
  assert int(m2["nonfinite"]) == 0 and int(out2["guard"]["skipped"]) == 1


def test_weight_decay_mask_and_head_lr_multiplier():
  cfg = _smoke()
  cfg.optim.update(warmup_steps=0, schedule="constant", lr=0.1, head_lr_mult=10.0,
                   weight_decay=0.5, clip_norm=0.0)
  params = {"backbone": {"blk": {"kernel": jnp.ones(3), "bias": jnp.ones(3)},
                         "pos_embedding": jnp.ones(3)},
            "head": {"lin": {"kernel": jnp.ones(3)}, "queries": jnp.ones(3)}}
  tx = optim.make_optimizer(cfg.optim)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, tx.init(params), params)
  # Zero gradient ⇒ the update is pure decoupled weight decay: -lr · wd · w where decayed.
  assert_close(upd["backbone"]["blk"]["kernel"], np.full(3, -0.1 * 0.5), 1e-7)
  np.testing.assert_array_equal(upd["backbone"]["blk"]["bias"], 0.0)
  np.testing.assert_array_equal(upd["backbone"]["pos_embedding"], 0.0)
  assert_close(upd["head"]["lin"]["kernel"], np.full(3, -1.0 * 0.5), 1e-7)   # head lr ×10
  np.testing.assert_array_equal(upd["head"]["queries"], 0.0)


def test_schedule_warmup_then_poly():
  cfg = _smoke().optim
  cfg.update(lr=1e-3, warmup_steps=10, total_steps=110, warmup_init=1e-6, poly_power=1.0)
  f = optim.learning_rate_fn(cfg)
  # On the schedule's scale, its peak: float32 computes the warmup's start as a difference of
  # peak-sized numbers (ulp(1e-3) = 1.2e-10, 1e-4 of 1e-6).
  assert_close([float(f(s)) for s in (0, 10, 60)], [1e-6, 1e-3, 0.5e-3], 1e-6)
  assert float(f(110)) == 0.0   # optax's polynomial decay ends at exactly end_value
  with pytest.raises(ValueError, match="optim.schedule"):
    cfg.schedule = "linear"; optim.learning_rate_fn(cfg)
