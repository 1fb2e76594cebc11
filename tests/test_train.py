"""The training loop learns, the main job runs end to end, the optimiser does what it says."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import segvit
from step_jax import optim
from step_jax import train
from step_jax.data import get_source


def _smoke(**overrides):
  cfg = segvit.get_config("variant=Mu/16,dataset=synthetic,smoke")
  cfg.data.num_train, cfg.data.num_eval = 16, 8
  cfg.update(overrides)
  return cfg


def test_loss_falls_when_overfitting_one_batch():
  cfg = _smoke()
  cfg.optim.warmup_steps = 0
  model = train.create_model(cfg)
  params = train.init_params(model, cfg, jax.random.key(0))
  tx = optim.make_optimizer(cfg.optim)
  state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  src = get_source(cfg.data, "train", cfg.num_classes, cfg.ignore_index)
  batch = dict(image=np.stack([src[i]["image"] for i in range(4)]),
               label=np.stack([src[i]["label"] for i in range(4)]).astype(np.int32))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, config=cfg))
  first = None
  for _ in range(40):
    state, m = step(state, batch, jax.random.key(1))
    first = first if first is not None else float(m["loss"])
  assert float(m["loss"]) < 0.6 * first, (first, float(m["loss"]))


def test_main_job_end_to_end(tmp_path):
  cfg = _smoke()
  cfg.optim.total_steps = 6
  cfg.log_every = 3
  cfg.eval_every = 4
  _, ev = train.train_and_evaluate(cfg, str(tmp_path))
  saved = json.load(open(tmp_path / "eval_val.json"))
  assert saved["images"] == 8 and 0.0 <= saved["miou"] <= 1.0
  assert set(saved["per_class_iou"]) == {str(i) for i in range(6)}
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["step"] for l in lines if "loss" in l] == [3, 6]
  assert any("eval_miou" in l for l in lines)
  assert json.load(open(tmp_path / "config.json"))["model"]["variant"] == "Mu/16"


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
  np.testing.assert_allclose(upd["backbone"]["blk"]["kernel"], -0.1 * 0.5)
  np.testing.assert_allclose(upd["backbone"]["blk"]["bias"], 0.0)
  np.testing.assert_allclose(upd["backbone"]["pos_embedding"], 0.0)
  np.testing.assert_allclose(upd["head"]["lin"]["kernel"], -1.0 * 0.5)   # head lr ×10
  np.testing.assert_allclose(upd["head"]["queries"], 0.0)


def test_schedule_warmup_then_poly():
  cfg = _smoke().optim
  cfg.update(lr=1e-3, warmup_steps=10, total_steps=110, warmup_init=1e-6, poly_power=1.0)
  f = optim.learning_rate_fn(cfg)
  np.testing.assert_allclose(f(0), 1e-6, rtol=1e-5)
  np.testing.assert_allclose(f(10), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(f(60), 0.5e-3, rtol=1e-5)
  np.testing.assert_allclose(f(110), 0.0, atol=1e-9)
  with pytest.raises(ValueError, match="optim.schedule"):
    cfg.schedule = "linear"; optim.learning_rate_fn(cfg)
