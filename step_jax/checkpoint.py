"""Checkpoints: orbax CheckpointManager for the train state + grain iterator + config.

Layout: `<workdir>/checkpoints/<step>/{state, data, config}` (orbax items) and
`<workdir>/config.json`. `state` is the whole train state (params, optimizer state, step,
NaN-guard counters); `data` is the input iterator's state (`grain.checkpoint`), one JSON file
per process, so a resumed run sees exactly the batches an uninterrupted one would.

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

`load_init_from` brings in weights from elsewhere: another step_jax workdir (e.g. the BASE
model for DToP-style pruning fine-tuning), a `.npz` of our parameter names, or a timm/mmseg
PyTorch checkpoint (converted with `step_jax.convert`).
"""
import json
import os
import shutil
import time
from typing import Any, Optional

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from step_jax import convert

CHECKPOINT_DIR = "checkpoints"


def write_json(path, obj):
  """Atomic JSON write (tmp + rename): a killed job never leaves half a file."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=1, default=str)
  os.replace(path + ".tmp", path)


def prepare_workdir(workdir, min_free_bytes=2**30):
  """The absolute workdir, created, checked writable and with `min_free_bytes` free, before
  any long work starts (so a run never ends in a failed write of its results)."""
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f"workdir {workdir} exists and is a file, not a directory")
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
  """Scalar bool: every floating leaf of `tree` is finite (runs where the arrays live)."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


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
    self._mgr = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(preservation_policy=keep_policy, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    return self._mgr.latest_step()

  def all_steps(self):
    return list(self._mgr.all_steps())

  def save(self, step: int, state, data_iter=None, config=None, *, force=False) -> bool:
    """Saves unless `state` holds a non-finite parameter (then logs and returns False)."""
    if not bool(_all_finite(state["params"])):
      logging.error("step %d: parameters are not finite; checkpoint NOT saved", step)
      return False
    items = dict(state=ocp.args.StandardSave(state))
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
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if data_iter is not None and hasattr(data_iter, "set_state") and has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    elif data_iter is not None:
      logging.warning("checkpoint %d has no input-pipeline state; the data order restarts",
                      step)
    out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    return out["state"], (out["data"] if "data" in items else data_iter), step

  def check_matches(self, step, abstract_state):
    """Raises CheckpointMismatchError unless checkpoint `step` has exactly the arrays (paths
    and shapes) of `abstract_state`; reads metadata only."""
    state_dir = os.path.join(self.directory, str(step), "state")
    meta = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata
    if meta is None:
      raise FileNotFoundError(f"no readable array metadata in {state_dir}")
    saved = meta.tree
    flat = lambda tree: {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape)
                         for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
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
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("step_jax_checkpoint_quarantine")
    self._mgr.reload()

  def wait(self):
    self._mgr.wait_until_finished()

  def close(self):
    self._mgr.wait_until_finished()
    self._mgr.close()


################################################################################
# Weights from elsewhere (config.init_from).                                   #
################################################################################
def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      out.update(_flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def _unflatten(flat):
  tree = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _params_from_workdir(path: str):
  """Parameters (numpy) of the latest checkpoint under a workdir or checkpoints dir."""
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


def _torch_state_dict(path: str):
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  import torch  # pylint: disable=g-import-not-at-top  (optional: only for .pth inputs)
  sd = torch.load(path, map_location="cpu", weights_only=True)
  for key in ("state_dict", "model", "module"):
    if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
      sd = sd[key]
  return {k: v.float().numpy() if hasattr(v, "float") else np.asarray(v) for k, v in sd.items()}


def _params_from_state_dict(sd, model_cfg):
  """timm/mmseg ViT (+ optional SegViT head under decode_head.) → our params subtree."""
  if any("/" in k for k in sd):  # an npz of our own flattened names
    return _unflatten(sd)
  grid = tuple(model_cfg.posemb_grid) if model_cfg.get("posemb_grid") else None
  if any(k.startswith("backbone.") for k in sd):  # a whole mmseg SegViT/DToP segmentor
    return convert.segmentor_to_params(sd, posemb_grid=grid)
  return {"backbone": convert.timm_vit_to_params(sd, posemb_grid=grid)}


def load_pretrained(path: str, model_cfg) -> dict:
  """Numpy params (possibly a subtree of the model's) from `path`; see module docstring."""
  if os.path.isdir(path):
    return _params_from_workdir(path)
  if path.endswith(".npz"):
    with np.load(path) as z:
      return _params_from_state_dict(dict(z), model_cfg)
  return _params_from_state_dict(_torch_state_dict(path), model_cfg)


def merge_params(target, loaded, *, source="init_from"):
  """`target` (sharded jax arrays) with every leaf of `loaded` that exists in it replaced.

  Shapes must agree (a mismatch raises, naming the parameter); parameters that only one
  side has are listed in the log. Each replaced leaf keeps the target's sharding.
  """
  paths_t = {jax.tree_util.keystr(p, simple=True, separator="/"): x
             for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
  flat_l = _flatten(loaded)
  bad = [f"{k}: checkpoint {flat_l[k].shape} vs model {paths_t[k].shape}"
         for k in flat_l if k in paths_t and tuple(flat_l[k].shape) != tuple(paths_t[k].shape)]
  if bad:
    raise ValueError(f"{source}: shape mismatch for " + "; ".join(bad[:10]))
  used = [k for k in flat_l if k in paths_t]
  unused = sorted(set(flat_l) - set(paths_t))
  missing = sorted(set(paths_t) - set(flat_l))
  logging.info("%s: loaded %d arrays; %d not in the model %s; %d model arrays kept from init "
               "%s", source, len(used), len(unused), unused[:5], len(missing), missing[:5])
  if not used:
    raise ValueError(f"{source}: no parameter names in common with the model "
                     f"(checkpoint has e.g. {sorted(flat_l)[:5]})")

  def pick(path, x):
    key = jax.tree_util.keystr(path, simple=True, separator="/")
    if key not in flat_l:
      return x
    value = flat_l[key].astype(x.dtype)
    return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: value[idx])
  return jax.tree_util.tree_map_with_path(pick, target), dict(loaded=len(used),
                                                              unused=unused, missing=missing)
