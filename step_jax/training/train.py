"""Training: sharded jit steps, orbax checkpoints with input state, clu writers, evaluation.

`train_and_evaluate(config, workdir)` is the entry point (`python -m step_jax.cli.train`). The
driver is one flat function in banner sections, in big_vision's order: setup → mesh →
model/optimizer → input → state (resume) → steps → loop → final evaluation.

Resume order (first that applies):
  1. the latest committed checkpoint in `<workdir>/checkpoints` (train state + input
     iterator state: the run continues exactly where it stopped);
  2. `config.init_from`: weights only (another workdir, e.g. a BASE model before pruning
     fine-tuning; a `.npz` of our names; a timm/mmseg `.pth`/`.safetensors` via
     step_jax.models.convert); optimizer state and step start fresh;
  3. random initialisation from `config.seed`.

Non-finite guard: every step checks the loss terms and gradients; a non-finite update is
*not applied* (parameters and optimizer state keep their values, inside jit) and the state
records the first offending step and which terms/gradients were non-finite.
`config.nan_policy='stop'` raises FloatingPointError at the next check (log step,
checkpoint, evaluation, end) naming that step; 'skip' continues and counts skipped steps
(`skipped_steps` in the metrics). Checking at log steps, not every step, keeps the host from
waiting on the device; the exact step is still reported. Checkpoints are never written
with non-finite parameters.
"""
import functools
import os
import time

from absl import logging
from clu import parameter_overview
import jax
import jax.numpy as jnp
import numpy as np
import optax

from step_jax.data import pipeline
from step_jax.evaluation import evaluator as eval_lib
from step_jax.evaluation import tokens
from step_jax.models import pretrained
from step_jax.models import builder
from step_jax.models import segmenter as segmenter_lib
from step_jax.models import variables as variables_lib
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.runtime import sharding
from step_jax.runtime import writers
from step_jax.runtime.writers import periodic_actions
from step_jax.training import losses
from step_jax.training import optim
from step_jax.training import train_policy

NAN_POLICIES = ("stop", "skip")


################################################################################
# Model, loss and steps.                                                       #
################################################################################
def model_inputs(model, batch):
  """Keyword inputs beyond the images: the oracle merge reads the labels."""
  return dict(labels=batch["label"]) if model.merge == "oracle" else {}


def prediction_weights(model, exit_weight=1.0):
  """Loss weight per prediction the model returns (final, then aux): `exit_weight` for the
  predictions its exits halt on, 1 for the rest (the final head and its deep supervision)."""
  exits = {1 + model.exit_output_index(s) for s in range(len(model.exit_layers))}
  return [exit_weight if i in exits else 1.0 for i in range(model.num_predictions())]


def loss_fn(params, model, batch, rng, config, model_state=None, exit_weight=1.0):
  variables = dict(model_state or {}, params=optim.without_gradient(params))
  outputs, _ = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng},
                           **model_inputs(model, batch))
  lc = config.loss
  return losses.atm_loss(outputs, batch["label"], num_classes=config.num_classes,
                         no_object_weight=lc.no_object_weight, ce_weight=lc.ce_weight,
                         focal_weight=lc.focal_weight, dice_weight=lc.dice_weight,
                         weights=prediction_weights(model, exit_weight))


def train_model(model, config):
  """The model the train step differentiates.

  By default one static shape: supertokens in a single full-grid capacity and exits as
  masks. The outputs are the same as with capacity buckets and compaction (padding and
  masked tokens never change valid outputs; tests prove it), but one program compiles
  instead of one per bucket pair (7 x 7 for STEP), which keeps XLA compile time and memory
  sane. `config.train_bucketing=True` trains the bucketed model itself (faster steps when
  few tokens remain, many more compiled branches).
  """
  if config.get("train_bucketing", False):
    return model
  return model.clone(buckets=(1.0,), exit_mode="mask")


def init_state(rng, policy_vars=None, *, model, tx, config):
  """Train state: params, model_state, optimizer state, step and the non-finite guard.

  model_state holds the variable collections that are not trained (the frozen policy net's
  BatchNorm statistics); guard.first_bad holds a boolean per loss term and per parameter
  array (in `jax.tree.leaves(params)` order), set at the first non-finite step, so a 'stop'
  error can name what went wrong.
  """
  variables = variables_lib.init_variables(model, config, rng, policy_vars)
  params = variables.pop("params")
  n_leaves = len(jax.tree.leaves(params))
  loss_names = losses.atm_loss_names(model.num_predictions())   # loss_fn's metrics
  guard = dict(skipped=jnp.zeros((), jnp.int32), first_bad_step=jnp.full((), -1, jnp.int32),
               first_bad=dict(loss={k: jnp.zeros((), bool) for k in loss_names},
                              grads=jnp.zeros((n_leaves,), bool)))
  return dict(params=params, model_state=variables, opt_state=tx.init(params),
              step=jnp.zeros((), jnp.int32), guard=guard)


def train_step(state, batch, rng=None, *, model, tx, config, lr_fn=None, exit_weight=1.0):
  """One optimizer step; non-finite updates are dropped (see module docstring).

  Returns the new state and scalar metrics: loss terms, grad_norm, lr, nonfinite (0/1 for
  this step) and skipped_steps (total so far); `lr_fn(step)` gives the lr metric (default:
  config.optim's schedule); `exit_weight` weighs the exits' own losses (may be traced:
  phased_train_step). `rng` defaults to a key from config.seed;
  dropout is keyed by (rng, step), so a resumed run draws the same masks.
  """
  if rng is None:
    rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  step = state["step"]
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (_, metrics), grads = grad_fn(state["params"], model, batch, jax.random.fold_in(rng, step),
                                config, state.get("model_state"), exit_weight)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)

  # One scalar decides (the global norm is non-finite iff some gradient is); the per-array
  # flags are computed only on that rare path: hundreds of separate reductions in the main
  # program made XLA:CPU compile 3-5x longer.
  loss_bad = jax.tree.map(lambda v: ~jnp.all(jnp.isfinite(v)), metrics)
  grad_norm = optax.tree.norm(grads)
  # The update too: a finite gradient can still overflow it (e.g. a huge learning rate).
  bad = (jnp.any(jnp.stack(jax.tree.leaves(loss_bad))) | ~jnp.isfinite(grad_norm)
         | ~jnp.isfinite(optax.tree.norm(updates)))
  grad_bad = jax.lax.cond(
      bad, lambda gs: jnp.stack([~jnp.all(jnp.isfinite(g)) for g in gs]),
      lambda gs: jnp.zeros((len(gs),), bool), jax.tree.leaves(grads))
  keep_old = lambda new, old: jax.tree.map(lambda a, b: jnp.where(bad, b, a), new, old)
  params = keep_old(params, state["params"])
  opt_state = keep_old(opt_state, state["opt_state"])

  new_state = dict(state, params=params, opt_state=opt_state, step=step + 1)
  metrics = dict(metrics)
  metrics["grad_norm"] = grad_norm
  metrics["lr"] = (lr_fn or optim.learning_rate_fn(config.optim))(step)
  metrics["nonfinite"] = bad.astype(jnp.int32)
  if "guard" in state:  # states built by hand (tests, notebooks) may omit the guard
    g = state["guard"]
    first = bad & (g["first_bad_step"] < 0)
    new_state["guard"] = dict(
        skipped=g["skipped"] + bad.astype(jnp.int32),
        first_bad_step=jnp.where(first, step + 1, g["first_bad_step"]),
        first_bad=jax.tree.map(lambda new, old: jnp.where(first, new, old),
                               dict(loss=loss_bad, grads=grad_bad), g["first_bad"]))
    metrics["skipped_steps"] = new_state["guard"]["skipped"]
  return new_state, metrics


def phase_model(model, step, prune_from):
  """`model` whose exits halt no token while `step` < `prune_from` (threshold 1: every token
  runs every layer) and use its own thresholds after; `step` may be traced."""
  if not prune_from:
    return model
  return model.clone(exit_threshold=tuple(jnp.where(step >= prune_from, t, 1.0)
                                           for t in model.exit_thresholds()))


def phase_optimizer(txs, phases, step):
  """(tx, lr_fn): the optimizer and learning-rate schedule of the phase `step` is in, chosen
  at run time (`step` may be traced). `phases` = optimizer_phases(config), `txs` their
  optimizers (same state layout: the loop re-initialises it at a phase start)."""
  if len(txs) == 1:
    return txs[0], optim.learning_rate_fn(phases[0][1])
  phase = sum((step >= first).astype(jnp.int32) for first, _ in phases[1:])
  update = lambda g, s, p: jax.lax.switch(phase, [tx.update for tx in txs], g, s, p)
  lr_fns = [functools.partial(lambda s, f, c: optim.learning_rate_fn(c)(s - f), f=first, c=cfg)
            for first, cfg in phases]
  return (optax.GradientTransformation(txs[0].init, update),
          lambda s: jax.lax.switch(phase, lr_fns, s))


def exit_weights(config):
  """(before pruning, while pruning): the weights of the exits' own losses, one home for
  their defaults (config.loss.base_exit_weight, config.loss.exit_weight; 1 each)."""
  return (float(config.loss.get("base_exit_weight", 1.0)),
          float(config.loss.get("exit_weight", 1.0)))


def phased_train_step(state, batch, rng=None, *, model, txs, phases, prune_from, config):
  """`train_step` for DToP's recipe in ONE program: pruning off for the first `prune_from`
  steps, then on (phase_model), each optimizer phase with its own optimizer and schedule
  (phase_optimizer); the exits' own losses weigh `config.loss.base_exit_weight` before
  pruning starts and `config.loss.exit_weight` (default 1) after. The phase is read from state['step'] at run time, so one
  train program compiles instead of one per phase."""
  step = state["step"]
  tx, lr_fn = phase_optimizer(txs, phases, step)
  base, tuned = exit_weights(config)
  exit_weight = tuned
  if prune_from and base != tuned:
    exit_weight = jnp.where(step >= prune_from, tuned, base)
  return train_step(state, batch, rng, model=phase_model(model, step, prune_from),
                    tx=tx, config=config, lr_fn=lr_fn, exit_weight=exit_weight)


def optimizer_phases(config, has_exits=True):
  """[(first step, optim config)]: one schedule over `config.optim.total_steps`, or DToP's
  two-step recipe when a model with exits has `prune_from_step` and `prune_optim` set:

    BASE     steps 1..prune_from_step, pruning off, `config.optim` over those steps;
    pruning  the remaining steps from the BASE weights with a FRESH optimizer (new moments,
             new warmup + decay): `config.optim` updated by `config.prune_optim`.

  Without `prune_optim` the pruning steps continue the one schedule (the older recipe).
  """
  total = int(config.optim.total_steps)
  prune_from = int(config.get("prune_from_step", 0) or 0) if has_exits else 0
  if prune_from and not 0 < prune_from < total:
    raise ValueError(f"prune_from_step={prune_from} must lie in (0, optim.total_steps={total})")
  fresh = config.get("prune_optim", None)
  if not prune_from or fresh is None:
    return [(0, config.optim)]
  base = config.optim.copy_and_resolve_references()
  base.total_steps = prune_from
  tune = config.optim.copy_and_resolve_references()
  unknown = sorted(set(fresh.keys()) - set(tune.keys()))
  if unknown:
    raise ValueError(f"prune_optim has keys {unknown} that config.optim does not; allowed: "
                     f"{sorted(tune.keys())}")
  tune.update(fresh.to_dict() if hasattr(fresh, "to_dict") else dict(fresh))
  tune.total_steps = total - prune_from
  if int(tune.warmup_steps) >= tune.total_steps:
    raise ValueError(f"prune_optim.warmup_steps={tune.warmup_steps} must be below the "
                     f"{tune.total_steps} pruning steps")
  return [(0, base), (prune_from, tune)]


def abstract_train_state(config, model, mesh, tx=None):
  """(eval_shape of the train state, its NamedShardings on `mesh`)."""
  tx = tx or optim.make_optimizer(config.optim)
  init = functools.partial(init_state, model=model, tx=tx, config=config)
  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  return abstract, sharding.state_shardings(abstract, mesh, config)


def policy_variables(config, model, workdir):
  """Trained policy-net variables for a CTS/dCTS model (None for other models).

  From `config.model.policy.init_from` (a `train_policy` workdir or its policy_ckpt), or,
  with `model.policy.auto_train_steps > 0`, trained first on this config's data into
  `<workdir>/policy` (reused when it is already there, so a restarted run does not retrain).
  """
  if model.policy is None:
    return None
  pc = config.model.policy
  path = pc.get("init_from", "")
  if not path:
    path = os.path.join(workdir, "policy")
    if not os.path.isdir(os.path.join(path, "policy_ckpt")):
      if int(pc.get("auto_train_steps", 0)) <= 0:
        raise ValueError(
            f"model.merge={model.merge!r} needs a trained policy net: set "
            "config.model.policy.init_from to a `python -m step_jax.cli.train_policy` workdir, "
            "or config.model.policy.auto_train_steps > 0 to train one here first")
      print(f"training the policy net first ({pc.auto_train_steps} steps) into {path}",
            flush=True)
      train_policy.train_and_evaluate(train_policy.config_from_segmenter(config), path)
  loaded = train_policy.load_variables(path)
  want = jax.tree.map(lambda a: a.shape, variables_lib.abstract_policy_variables(model, config))
  got = jax.tree.map(np.shape, {k: loaded[k] for k in ("params", "batch_stats")})
  if got != want:
    raise ValueError(f"policy checkpoint {path} does not fit model.policy (source/hidden "
                     "differ from the config it was trained with?)")
  return jax.tree.map(jnp.asarray, {k: loaded[k] for k in ("params", "batch_stats")})


def nonfinite_report(guard, params=None) -> str:
  """Human-readable summary of guard.first_bad ('' when no step was non-finite)."""
  guard = jax.device_get(guard)
  if int(guard["first_bad_step"]) < 0:
    return ""
  names = lambda tree: [jax.tree_util.keystr(p, simple=True, separator="/")
                        for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  loss = [n for n, v in zip(names(guard["first_bad"]["loss"]),
                            jax.tree.leaves(guard["first_bad"]["loss"])) if bool(v)]
  flags = np.asarray(guard["first_bad"]["grads"])
  grads = ([n for n, v in zip(names(params), flags) if v] if params is not None
           else [f"#{i}" for i in np.flatnonzero(flags)])
  more = f" (+{len(grads) - 8} more)" if len(grads) > 8 else ""
  what = (f"loss terms {loss or 'all finite'}; gradients of {grads[:8] or 'none'}{more}"
          if loss or grads else "loss and gradients finite, the update overflowed")
  return (f"non-finite values at step {int(guard['first_bad_step'])}: {what}; "
          f"{int(guard['skipped'])} step(s) skipped so far")


def check_guard(state, policy):
  """Raises FloatingPointError under policy 'stop' if a non-finite step happened."""
  report = nonfinite_report(state["guard"], state["params"])
  if report and policy == "stop":
    raise FloatingPointError(report + " (config.nan_policy='stop'; the update was not "
                             "applied and no checkpoint was written after it)")
  return report


################################################################################
# Input.                                                                       #
################################################################################
def make_train_iter(config, mesh, source=None):
  """This process's training batches (batch_size // process_count examples each); `source`
  default: the config's training split."""
  sharding.host_batch_size(config.batch_size, mesh)  # checks the batch divides the hosts
  return pipeline.make_train_iter(config, process_index=jax.process_index(),
                                  process_count=jax.process_count(), source=source)


def _next_batch(train_iter, mesh, host_batch):
  b = next(train_iter)
  b = {k: np.asarray(b[k]) for k in ("image", "label")}
  if b["image"].shape[0] != host_batch:
    raise ValueError(f"input pipeline gave {b['image'].shape[0]} examples per process; "
                     f"expected batch_size // process_count = {host_batch}")
  b["label"] = b["label"].astype(np.int32)
  return sharding.put_batch(b, mesh)


################################################################################
# Driver.                                                                      #
################################################################################
def _mean_metrics(history):
  """Averages a list of per-step metric dicts (device arrays) on the host."""
  history = jax.device_get(history)
  out = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
  out["nonfinite"] = int(sum(int(h["nonfinite"]) for h in history))
  out["skipped_steps"] = int(history[-1]["skipped_steps"])
  return out


def train_and_evaluate(config, workdir):
  """Trains to `config.optim.total_steps`, resuming if possible; returns (state, metrics)."""
  ######## Setup: distributed runtime, workdir, writers. ########
  sharding.initialize_distributed(config)
  # Everything that can reject the config runs before anything is written; the workdir and
  # the data first, so that a wrong path fails in the first second.
  ckpt_lib.check_workdir(workdir)
  source = pipeline.get_source(config.data, config.data.train_split, config.num_classes,
                               config.ignore_index)
  model = variables_lib.create_model(config)
  policy = config.get("nan_policy", "stop")
  if policy not in NAN_POLICIES:
    raise ValueError(f"config.nan_policy={policy!r}: use one of {NAN_POLICIES}")
  mesh = sharding.make_mesh(config)
  sharding.host_batch_size(config.batch_size, mesh)
  phases = optimizer_phases(config, bool(model.exit_layers))
  workdir = ckpt_lib.prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    ckpt_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  writer = writers.create_writer(workdir, process_index=jax.process_index())
  say = lambda msg: (logging.info(msg), is_chief and print(msg, flush=True))

  ######## Mesh, model, optimizer, shardings. ########
  txs = [optim.make_optimizer(c) for _, c in phases]
  tx = txs[0]
  abstract, state_sh = abstract_train_state(config, model, mesh, tx)
  say(f"mesh {dict(mesh.shape)} over {mesh.size} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es); state arrays {sharding.describe(state_sh)}")

  ######## Input. ########
  host_batch = sharding.host_batch_size(config.batch_size, mesh)
  train_iter = make_train_iter(config, mesh, source)

  ######## State: checkpoint > init_from > scratch (see module docstring). ########
  prune_from = int(config.get("prune_from_step", 0) or 0) if model.exit_layers else 0
  ckpt = ckpt_lib.Checkpointer(workdir, keep=int(config.get("keep_checkpoints", 3)),
                               async_save=bool(config.get("checkpoint_async", True)),
                               keep_steps=(prune_from,) if prune_from else ())
  rng = jax.random.key(config.seed)
  if ckpt.latest_step() is not None:
    state, train_iter, start = ckpt.restore(sharding.with_shardings(abstract, state_sh),
                                            train_iter)
    say(f"resumed from {ckpt.directory}/{start}")
  else:
    init = functools.partial(init_state, model=model, tx=tx, config=config)
    # The policy net is trained before the segmenter (or comes with an init_from workdir).
    pv = (None if _workdir_has_policy(config.get("init_from", ""))
          else policy_variables(config, model, workdir))
    state = jax.jit(init, out_shardings=state_sh)(jax.random.fold_in(rng, 0), pv)
    start = 0
    if config.get("init_from", ""):
      state = _load_init_from(state, config)
      say(f"initialised weights from {config.init_from}")
  n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
  say(f"model {config.model.variant}: {n_params / 1e6:.2f}M parameters, "
      f"dtype {config.model.get('dtype', 'float32')}, remat {config.model.get('remat', False)} "
      f"(table: {workdir}/parameters.txt); data {config.data.name} "
      f"{tuple(config.data.image_size)} crops, batch {config.batch_size}")
  if is_chief:
    with open(os.path.join(workdir, "parameters.txt"), "w") as f:
      f.write(parameter_overview.get_parameter_overview(state["params"], include_stats=False))
    writer.write_hparams({k: v for k, v in _flat_config(config).items()})

  ######## Jitted step (state donated: no second copy of params/opt state). ########
  # DToP's two steps in one run and one program: up to `prune_from_step` the exits are
  # trained with pruning off, then pruning is active, with a fresh optimizer when
  # `prune_optim` is set (optimizer_phases, phased_train_step).
  step_fn = jax.jit(functools.partial(phased_train_step, model=train_model(model, config),
                                      txs=txs, phases=phases, prune_from=prune_from,
                                      config=config),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  fresh_from = phases[-1][0] if len(phases) > 1 and phases[-1][0] >= start else None
  reset_opt = jax.jit(lambda st: dict(st, opt_state=txs[-1].init(st["params"])),
                      in_shardings=(state_sh,), out_shardings=state_sh, donate_argnums=(0,))
  if prune_from > start:
    base_weight = exit_weights(config)[0]
    say(f"steps {start + 1}..{prune_from}: nothing halts, the exits' losses weigh "
        f"{base_weight:g} (BASE); "
        f"pruning from step {prune_from + 1}"
        + (" with a fresh optimizer and schedule" if fresh_from is not None else ""))
  evaluators = {}

  def run_eval(state, step):
    # The model as its last step trained it: in BASE nothing halts (the 'segvit' exits are
    # not trained yet there, and halting with them would measure an untrained exit).
    base = step <= prune_from
    if base not in evaluators:   # always the val split (data.split redirects evaluate.py)
      halting = model.clone(exit_threshold=(1.0,) * len(model.exit_layers)) if base else model
      evaluators[base] = eval_lib.Evaluator(config, halting, mesh, split=config.data.eval_split)
    ev = evaluators[base](dict(state["model_state"], params=state["params"]))
    writer.write_scalars(step, {f"{ev['split']}/miou": ev["miou"],
                                f"{ev['split']}/pixel_acc": ev["pixel_acc"],
                                f"{ev['split']}/mean_acc": ev["mean_acc"]})
    say(f"step {step}: {ev['split']} mIoU {100 * ev['miou']:.2f} pixel acc "
        f"{100 * ev['pixel_acc']:.2f} ({ev['compiled_shapes']} eval shape(s))")
    return ev

  ######## Loop. ########
  total = int(config.optim.total_steps)
  log_every = int(config.get("log_every", 50))
  eval_every = int(config.get("eval_every", 0) or 0)
  ckpt_every = int(config.get("checkpoint_every", 0) or 0)
  progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                             every_steps=log_every, every_secs=None)
  hooks = [progress]
  if config.get("profile", False) and is_chief:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=5))
  history, t_last, step_last = [], time.time(), start
  # The ETA counts steady steps only: the interval that compiled the step function and the
  # time spent in checkpoints and evaluation are out.
  steady_s, steady_n, paused, compiling = 0.0, 0, 0.0, True
  t0 = time.time()
  for step in range(start + 1, total + 1):
    if fresh_from is not None and step == fresh_from + 1:
      state = reset_opt(state)   # DToP: pruning fine-tuning restarts the optimizer
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      batch = _next_batch(train_iter, mesh, host_batch)
      state, m = step_fn(state, batch)
    history.append(m)
    for h in hooks:
      h(step)
    if step % log_every == 0 or step == total:
      m = _mean_metrics(history)
      m["bad_records"] = int(getattr(train_iter, "bad_records", 0))  # skipped so far
      history = []
      now = time.time()
      busy = max(now - t_last - paused, 1e-9)
      rate = (step - step_last) / busy
      if not compiling:
        steady_s, steady_n = steady_s + busy, steady_n + step - step_last
      eta = (f"ETA {(total - step) * steady_s / steady_n:.0f} s" if steady_n
             else "ETA after compiling")
      t_last, step_last, paused, compiling = now, step, 0.0, False
      writer.write_scalars(step, m)
      say(f"step {step}/{total} loss {m['loss']:.4f} (ce {m['loss_ce']:.3f} focal "
          f"{m['loss_focal']:.4f} dice {m['loss_dice']:.3f}) grad {m['grad_norm']:.2f} "
          f"lr {m['lr']:.2e} {rate:.2f} steps/s {eta}"
          + (f" skipped {m['skipped_steps']}" if m["skipped_steps"] else "")
          + (f" bad records {m['bad_records']}" if m["bad_records"] else ""))
      report = check_guard(state, policy)
      if report and m["nonfinite"]:
        logging.warning(report)
    if ((ckpt_every and step % ckpt_every == 0) or step == prune_from) and step != total:
      check_guard(state, policy)
      t_pause = time.time()
      with progress.timed("checkpoint"):
        ckpt.save(step, state, train_iter, config.to_dict())
      paused += time.time() - t_pause
    if eval_every and step % eval_every == 0 and step != total:
      check_guard(state, policy)
      t_pause = time.time()
      with progress.timed("eval"):
        run_eval(state, step)
      paused += time.time() - t_pause
  train_time = time.time() - t0

  ######## Final checkpoint and evaluation. ########
  check_guard(state, policy)
  if total not in ckpt.all_steps():
    ckpt.save(total, state, train_iter, config.to_dict(), force=True)
  ckpt.close()
  ev = run_eval(state, total)
  ev.update(step=total, train_time_s=train_time, resumed_from=start,
            skipped_steps=int(jax.device_get(state["guard"]["skipped"])),
            bad_records=int(getattr(train_iter, "bad_records", 0)),
            **tokens.eval_gflops(config, model,
                                    dict(state["model_state"], params=state["params"]),
                                    split=ev["split"]))
  if is_chief:
    ckpt_lib.write_json(os.path.join(workdir, f"eval_{ev['split']}.json"), ev)
  writer.close()
  say(f"final {ev['split']} mIoU {100 * ev['miou']:.2f} pixel acc {100 * ev['pixel_acc']:.2f} "
      f"({ev['images']} images); trained steps {start + 1}..{total} in {train_time:.0f} s")
  return state, ev


def _workdir_has_policy(path):
  """Whether `path` is a training workdir of a model with a (trained) policy net."""
  if not os.path.isfile(os.path.join(path or "", "config.json")):
    return False
  return ckpt_lib.read_config(path).model.get("merge", "none") in segmenter_lib.POLICY_MERGES


def _load_init_from(state, config):
  """state with weights from config.init_from (see module docstring); a step_jax workdir
  also brings its non-trained collections (policy BatchNorm statistics)."""
  path = config.init_from
  source_model = None
  if os.path.isfile(os.path.join(path, "config.json")):
    loaded = jax.tree.map(np.asarray, variables_lib.load(None, path))
    source_model = ckpt_lib.read_config(path).model
  else:
    loaded = dict(params=pretrained.load_pretrained(path, config.model))
  # Head stages land on the stage that reads the same block (designs order them differently).
  stages = pretrained.source_head_stages(loaded["params"], source_model, config.model)
  loaded["params"] = pretrained.align_head_stages(
      loaded["params"], stages, builder.head_stages(config.model), source=path)
  params, _ = pretrained.merge_params(state["params"], loaded.pop("params"), source=path)
  model_state = state["model_state"]
  if loaded and model_state:
    model_state, _ = pretrained.merge_params(model_state, loaded, source=path)
  return dict(state, params=params, model_state=model_state)


def _flat_config(config, prefix=""):
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
  return out
