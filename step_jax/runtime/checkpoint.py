"""Checkpoints: orbax CheckpointManager for the train state + grain iterator + config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}` (orbax items) and
`<workdir>/config.json`. `state` is the whole train state (params, optimizer state, step,
NaN-guard counters); `data` is the input iterator's state (`grain.checkpoint`), one JSON file
per process, so a resumed run sees exactly the batches an uninterrupted one would.

Each replicated array is written whole by its first replica (see `_state_handler`: orbax's
replica-parallel default compiled a slice program per array shape at the first save).

Restoring takes an abstract target whose leaves carry the *current* mesh's shardings
(`sharding.with_shardings`), so a checkpoint written on 4 devices (or FSDP-sharded) loads
onto 1 device, or the other way round.

What can go wrong, and what happens:
  * killed while saving: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it when
    complete, so a partial checkpoint is never listed nor restored;
  * the latest checkpoint is unreadable (truncated or missing files): `restore()` logs a
    warning, tries the previous one, and once one restores moves the unreadable ones to
    `<workdir>/corrupt_checkpoints/` (kept for inspection; new saves of those steps work);
  * the checkpoint was written by another model config: CheckpointMismatchError naming the
    arrays whose shapes differ (or that only one side has), before anything is read.

Reading for inference builds no train state: `read_config` (a workdir's config.json, the one
way to read it), `restore_subtree` (e.g. params and model_state only, placed on a mesh) and
`read_params` (numpy params of the latest checkpoint).
"""
import json
import os
import shutil
import time
from typing import Optional

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"


def write_json(path, obj):
  """Atomic JSON write (tmp + rename): a killed job never leaves half a file."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(path + ".tmp", path)


def check_workdir(workdir):
  """Raises unless `workdir` is a folder or can become one (nothing is created)."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir} exists and is a file, not a directory")
  parent = os.path.dirname(workdir)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise NotADirectoryError(f"workdir {workdir} cannot be created: {parent} is a file")


def prepare_workdir(workdir, min_free_bytes=2**30):
  """The absolute workdir, created, checked writable and with `min_free_bytes` free, before
  any long work starts (so a run never ends in a failed write of its results)."""
  workdir = os.path.abspath(workdir)
  check_workdir(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir} is not writable ({e.strerror}); choose "
                          "another --workdir") from None
  free = shutil.disk_usage(workdir).free
  if free < min_free_bytes:
    raise OSError(f"workdir {workdir} has {free / 2**20:.0f} MiB free; checkpoints and results "
                  f"need at least {min_free_bytes / 2**20:.0f} MiB")
  return workdir


def all_finite(tree) -> jax.Array:
  """Scalar bool: every floating leaf of `tree` is finite (runs where the arrays live).

  The leaves of each dtype are concatenated first and checked as one array: XLA compiles a
  kernel per separate check, and a few hundred of them took 15-30 s to compile (under 1 s
  this way)."""
  by_dtype = {}
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      by_dtype.setdefault(jnp.dtype(x.dtype), []).append(jnp.ravel(x))
  checks = [_all_finite_leaf(jnp.concatenate(xs)) for xs in by_dtype.values()]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def _all_finite_leaf(x):
  """isfinite of an IEEE float from its exponent bits (all ones: inf or NaN), without float
  arithmetic: XLA:CPU on a CPU without F16C (x86 below AVX2) cannot convert float16 at all."""
  if jnp.dtype(x.dtype) not in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64):
    return jnp.all(jnp.isfinite(x))   # complex, float8: their own rules
  info = jnp.finfo(x.dtype)
  bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{info.bits}"))
  exponent = ((1 << info.nexp) - 1) << info.nmant
  return jnp.all((bits & exponent) != exponent)


_all_finite = jax.jit(all_finite)


class CheckpointMismatchError(ValueError):
  """The checkpoint's arrays do not match the model the config builds."""


def _saved_model_config(config_dir) -> str:
  """' It was written with model.variant=...' from a checkpoint's config item, or ''."""
  try:
    with open(os.path.join(config_dir, "metadata")) as f:
      model = json.load(f).get("model", {})
    return (f" It was written with model.variant={model.get('variant')!r}, "
            f"merge={model.get('merge', 'none')!r}, exit_layers={model.get('exit_layers', [])}.")
  except (OSError, ValueError, AttributeError):
    return ""


def _state_handler():
  """The train state's handler: orbax's pytree format, but each array written whole by its
  first replica. orbax's default on CPU and TPU ("replica-parallel") splits every replicated
  array across the replicas and compiles a slice program per array shape and offset: 300
  parameter arrays on 4 devices took 45 s at the first save, for no gain on one host."""
  scalar = ocp.type_handlers.ScalarHandler()
  registry = ocp.type_handlers.create_type_handler_registry(
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (int, scalar), (float, scalar), (np.number, scalar))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract):
  """Restore arguments placing each array as `abstract`'s leaf (a ShapeDtypeStruct with a
  sharding) says."""
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)


class Checkpointer:
  """Periodic + final saves, keep-N, resume from the latest committed step."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               keep_steps=()):
    """keep: the newest N checkpoints survive; keep_steps: these steps survive too (the
    DToP BASE model at `prune_from_step`, which the comparison tables evaluate)."""
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    policy = ocp.checkpoint_managers.preservation_policy
    keep_policy = policy.LatestN(max(int(keep), 1))
    if keep_steps:
      keep_policy = policy.AnyPreservationPolicy(
          [keep_policy, policy.CustomSteps([int(s) for s in keep_steps])])
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state_handler = _state_handler()
    handlers.add("state", ocp.args.PyTreeSave, state_handler)
    handlers.add("state", ocp.args.PyTreeRestore, state_handler)
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(preservation_policy=keep_policy, create=True,
                                             enable_async_checkpointing=async_save),
        handler_registry=handlers)

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def all_steps(self):
    return list(self._mgr.all_steps())

  def save(self, step: int, state, data_iter=None, config=None, *, force=False) -> bool:
    """Saves unless `state` holds a non-finite parameter (then logs and returns False)."""
    if not bool(_all_finite(state["params"])):
      logging.error("step %d: parameters are not finite; checkpoint NOT saved", step)
      return False
    items = dict(state=ocp.args.PyTreeSave(state))
    if data_iter is not None and hasattr(data_iter, "get_state"):
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(json.dumps(config, default=str)))
    saved = self._mgr.save(int(step), args=ocp.args.Composite(**items), force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state, data_iter=None, step: Optional[int] = None):
    """(state, data_iter, step) from `step` (default latest), placed as `abstract_state`'s
    shardings say; the iterator is restored in place when the checkpoint has its state.

    Without `step`, an unreadable latest checkpoint falls back to the previous one (see the
    module docstring). Raises CheckpointMismatchError if the checkpoint's arrays do not
    match `abstract_state`, FileNotFoundError if there is no checkpoint.
    """
    if step is not None:
      self.check_matches(step, abstract_state)
      return self._restore(step, abstract_state, data_iter)
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failed = []
    for s in steps:
      try:
        self.check_matches(s, abstract_state)
        out = self._restore(s, abstract_state, data_iter)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any unreadable file)
        logging.warning("checkpoint %s/%d cannot be restored (%s: %s); trying the previous "
                        "one", self.directory, s, type(e).__name__, str(e)[:500])
        failed.append((s, e))
        continue
      if failed:  # only now: had nothing restored, the fault could be ours, not the files'
        self._quarantine([f for f, _ in failed])
      return out
    raise RuntimeError(f"none of the checkpoints {steps} in {self.directory} could be "
                       f"restored; first error: {failed[0][1]!r}") from failed[0][1]

  def _restore(self, step, abstract_state, data_iter):
    items = dict(state=ocp.args.PyTreeRestore(abstract_state,
                                              restore_args=_restore_args(abstract_state)))
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if data_iter is not None and hasattr(data_iter, "set_state") and has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    elif data_iter is not None:
      logging.warning("checkpoint %d has no input-pipeline state; the data order restarts",
                      step)
    out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    return out["state"], (out["data"] if "data" in items else data_iter), step

  def check_matches(self, step, abstract_state, *, subset=False):
    """Raises CheckpointMismatchError unless checkpoint `step` has exactly the arrays (paths
    and shapes) of `abstract_state` (subset: at least them; the top-level entries it names
    are compared whole); reads metadata only."""
    state_dir = os.path.join(self.directory, str(step), "state")
    meta = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
    if meta is None:
      raise FileNotFoundError(f"no readable array metadata in {state_dir}")
    saved = meta.tree
    flat = lambda tree: {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    if subset:
      saved = {k: v for k, v in saved.items() if k in abstract_state}
    have, want = flat(saved), flat(abstract_state)
    diff = [f"{k}: checkpoint {have[k]} vs model {want[k]}"
            for k in want if k in have and have[k] != want[k]]
    # Parameters first: they say what changed; optimizer-state paths repeat them.
    params_first = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))
    diff = params_first(diff)
    missing, extra = params_first(set(want) - set(have)), params_first(set(have) - set(want))
    if not (diff or missing or extra):
      return
    parts = [f"{len(diff)} arrays differ in shape, e.g. " + "; ".join(diff[:6])] if diff else []
    parts += [f"{len(missing)} model arrays missing from it, e.g. {missing[:4]}"] if missing else []
    parts += [f"{len(extra)} arrays not in the model, e.g. {extra[:4]}"] if extra else []
    written_by = _saved_model_config(os.path.join(self.directory, str(step), "config"))
    raise CheckpointMismatchError(
        f"checkpoint {self.directory}/{step} does not match the model built from the "
        f"config: {'; '.join(parts)}.{written_by} Use the config it was trained with, or "
        "another --workdir (init_from= loads matching weights only).")

  def _quarantine(self, steps):
    """Moves unreadable step directories aside (never deletes them) so that new saves of
    those steps are not skipped and nothing picks them up again."""
    if jax.process_index() == 0:
      dest_root = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
      os.makedirs(dest_root, exist_ok=True)
      for s in steps:
        src, dest = os.path.join(self.directory, str(s)), os.path.join(dest_root,
                                                                       f"{s}.{time.time():.0f}")
        if os.path.isdir(src):   # a concurrent trainer's keep-N may have deleted it meanwhile
          shutil.move(src, dest)
          logging.warning("moved unreadable checkpoint %d to %s", s, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("step_jax_checkpoint_quarantine")
    self._mgr.reload()

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.wait_until_finished()
    self._mgr.close()


def read_config(path) -> ml_collections.ConfigDict:
  """The ConfigDict of a training run's (or an export's) config.json; `path` is the folder
  or the .json file itself. The one reader of that file."""
  if not str(path).endswith(".json"):
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise FileNotFoundError(f"no config.json in {path}: not a step_jax workdir or export "
                              "folder")
    path = os.path.join(path, "config.json")
  with open(path) as f:
    try:
      return _upgraded(ml_collections.ConfigDict(json.load(f)))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column "
                       f"{e.colno}): a truncated or hand-edited config?") from None


def _upgraded(config):
  """A config.json written by an older step_jax, read as the model it was trained as:
  `model.exit_head` was absent before 2026-11-29 (the builder's default then: 'dtop'), and
  'atm' (SegViT's stages shallowest first) is called 'atm_shallow_first' since 2026-12-03."""
  model = config.get("model")
  if model is None:
    return config
  if model.get("exit_head") == "atm":
    model.exit_head = "atm_shallow_first"
  elif "exit_head" not in model and model.get("exit_layers"):
    model.exit_head = "dtop"
  return config


def restore_subtree(workdir, abstract, step=None):
  """(arrays, step): the top-level entries of the saved train state that `abstract` names
  (e.g. {'params', 'model_state'}), from checkpoint `step` (default: the latest), placed as
  `abstract`'s leaves say (ShapeDtypeStructs with shardings). Nothing else is read, so no
  optimizer state is built. Raises FileNotFoundError without a checkpoint and
  CheckpointMismatchError when the saved arrays do not fit `abstract`."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    raise FileNotFoundError(f"no checkpoint under {workdir}/{CHECKPOINT_DIR}")
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
    if step not in ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} under {ckpt.directory}; saved "
                              f"steps: {sorted(ckpt.all_steps())}")
    ckpt.check_matches(step, abstract, subset=True)
  finally:
    ckpt.close()
  state_dir = os.path.join(ckpt.directory, str(step), "state")
  tree = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=_restore_args(abstract), partial_restore=True))
  return {k: tree[k] for k in abstract}, step


def read_params(path: str):
  """Parameters (numpy, no train state built) of the latest checkpoint under a workdir, its
  checkpoints/ directory or one <step> directory."""
  ckdir = path if os.path.basename(os.path.normpath(path)) == CHECKPOINT_DIR else os.path.join(
      path, CHECKPOINT_DIR)
  if not os.path.isdir(ckdir):  # maybe a single step directory, <...>/checkpoints/<step>
    ckdir = path
  steps = [int(d) for d in os.listdir(ckdir) if d.isdigit()]
  state_dir = (os.path.join(ckdir, str(max(steps)), "state") if steps
               else os.path.join(path, "state"))
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f"init_from={path!r}: no step_jax checkpoint found")
  ck = ocp.PyTreeCheckpointer()
  meta = ck.metadata(state_dir).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  tree = ck.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return tree["params"]


def read_policy(path):
  """Policy-net variables {'params', 'batch_stats'} saved by the policy trainer (`path`: its
  workdir or the policy_ckpt folder)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "policy_ckpt")):
    path = os.path.join(path, "policy_ckpt")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no policy checkpoint at {path}; train one with "
                            "python -m step_jax.cli.train_policy")
  return ocp.StandardCheckpointer().restore(path)
