"""Training and evaluation loop (pure step functions + a flat driver).

The data/training issue grows this into sharded, checkpointed training on real datasets;
the entry points (`train_and_evaluate`, `evaluate`) and step functions stay.
"""
import functools
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from step_jax import losses
from step_jax import metrics as metrics_lib
from step_jax import optim
from step_jax.data import get_source
from step_jax.data import pipeline
from step_jax.models import segmenter


################################################################################
# Model, loss and steps.                                                       #
################################################################################
def create_model(config):
  return segmenter.build(config.model, config.num_classes, tuple(config.data.image_size))


def init_params(model, config, rng):
  h, w = config.data.image_size
  dummy = jnp.zeros((1, h, w, 3), jnp.float32)
  return jax.jit(model.init)(rng, dummy)["params"]


def loss_fn(params, model, batch, rng, config):
  outputs, _ = model.apply({"params": params}, batch["image"], train=True,
                           rngs={"dropout": rng})
  lc = config.loss
  return losses.atm_loss(outputs, batch["label"], num_classes=config.num_classes,
                         no_object_weight=lc.no_object_weight, ce_weight=lc.ce_weight,
                         focal_weight=lc.focal_weight, dice_weight=lc.dice_weight)


def train_step(state, batch, rng, *, model, tx, config):
  """One AdamW step; returns the new state and scalar metrics (incl. grad norm)."""
  rng = jax.random.fold_in(rng, state["step"])
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(state["params"], model, batch, rng, config)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = jax.tree.map(jnp.add, state["params"], updates)
  metrics["grad_norm"] = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2)
                                      for g in jax.tree.leaves(grads)))
  return dict(params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def predict(params, images, *, model):
  """Per-pixel class scores [B, H, W, C] at the input resolution."""
  outputs, _ = model.apply({"params": params}, images, train=False)
  return segmenter.predict_scores(outputs, images.shape[1:3])


def eval_step(params, batch, *, model, config):
  scores = predict(params, batch["image"], model=model)
  pred = jnp.argmax(scores, axis=-1)
  return metrics_lib.confusion_matrix(pred, batch["label"], config.num_classes,
                                      config.ignore_index, batch["valid"])


def evaluate(model, params, config, split=None):
  """Whole-image evaluation of `split` (default: config.data.eval_split)."""
  split = split or config.data.eval_split
  source = get_source(config.data, split, config.num_classes, config.ignore_index)
  step = jax.jit(functools.partial(eval_step, model=model, config=config))
  conf = np.zeros((config.num_classes,) * 2, np.int64)
  for batch in pipeline.eval_batches(source, config.eval_batch_size):
    conf += np.asarray(step(params, batch))
  out = metrics_lib.summarize(conf)
  out.update(split=split, images=len(source))
  return out


################################################################################
# Driver.                                                                      #
################################################################################
def _write_json(path, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(path + ".tmp", path)


def train_and_evaluate(config, workdir):
  """Trains `config.optim.total_steps` steps, evaluates, writes metrics to `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "config.json"), config.to_dict())
  rng = jax.random.key(config.seed)
  model = create_model(config)
  params = init_params(model, config, jax.random.fold_in(rng, 0))
  tx = optim.make_optimizer(config.optim)
  state = dict(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  logging.info("model %s: %.2fM parameters", config.model.variant, n_params / 1e6)
  print(f"model {config.model.variant}: {n_params / 1e6:.2f}M parameters", flush=True)

  source = get_source(config.data, config.data.train_split, config.num_classes,
                      config.ignore_index)
  batches = pipeline.train_batches(source, config.batch_size, config.seed)
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                    donate_argnums=(0,))
  total = int(config.optim.total_steps)
  log_path = os.path.join(workdir, "metrics.jsonl")
  t0 = t_last = time.time()
  history = []
  with open(log_path, "a") as log:
    for step in range(1, total + 1):
      batch = next(batches)
      state, m = step_fn(state, batch, jax.random.fold_in(rng, 1))
      if step % config.log_every == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"loss is {m['loss']} at step {step}; stopping")
        now = time.time()
        m.update(step=step, steps_per_s=config.log_every / max(now - t_last, 1e-9),
                 elapsed_s=now - t0)
        t_last = now
        history.append(m)
        log.write(json.dumps(m) + "\n"); log.flush()
        print(f"step {step}/{total} loss {m['loss']:.4f} (ce {m['loss_ce']:.3f} "
              f"focal {m['loss_focal']:.4f} dice {m['loss_dice']:.3f}) "
              f"{m['steps_per_s']:.2f} steps/s", flush=True)
      if step % config.eval_every == 0 and step != total:
        ev = evaluate(model, state["params"], config)
        print(f"step {step}: {ev['split']} mIoU {100 * ev['miou']:.2f}", flush=True)
        log.write(json.dumps(dict(step=step, eval_miou=ev["miou"])) + "\n"); log.flush()

  train_time = time.time() - t0
  ev = evaluate(model, state["params"], config)
  ev.update(step=total, train_time_s=train_time)
  _write_json(os.path.join(workdir, f"eval_{ev['split']}.json"), ev)
  print(f"final {ev['split']} mIoU {100 * ev['miou']:.2f} pixel acc "
        f"{100 * ev['pixel_acc']:.2f} ({ev['images']} images); trained {total} steps in "
        f"{train_time:.0f} s", flush=True)
  return state, ev
