"""Starts a `segvit`-design exit model's pruning phase from a SegViT run's checkpoint.

With exit_head='segvit' and `loss.base_exit_weight=0` the BASE phase of a run from scratch
is SegViT's own training (same loss and gradient: tests/test_train_step.py), so a SegViT run
of the same config, seed and data order holds that BASE: its checkpoint at `prune_from_step`
(parameters, optimizer moments and step, input-pipeline position) becomes the exit run's
checkpoint there, and `python -m step_jax.cli.train` with the same workdir resumes into the
pruning phase on the same schedule. The exit model's extra arrays (the policy net of a
dCTS model, its BatchNorm statistics, their optimizer entries) come from its own
initialisation, as they would from scratch.

  python experiments/fork_base.py --segvit=workdirs/camvid_ti_segvit_s0 \
      --config=configs/camvid.py:method=step,size=cpu,variant=Ti/16 \
      --config.model.policy.init_from=POLICY --workdir=workdirs/NEW
  python -m step_jax.cli.train --config=(the same) --workdir=workdirs/NEW
"""
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from step_jax.models import variables as variables_lib  # noqa: E402
from step_jax.runtime import checkpoint as ckpt_lib  # noqa: E402
from step_jax.runtime import sharding  # noqa: E402
from step_jax.training import optim  # noqa: E402
from step_jax.training import train  # noqa: E402


def fork(config, segvit_workdir, workdir, step=None):
  """Writes `workdir`'s checkpoint at `step` (default and at most config.prune_from_step: a
  step of its BASE) from the SegViT run's."""
  step = int(config.prune_from_step) if step is None else int(step)
  if not 0 < step <= int(config.prune_from_step):
    raise ValueError(f"step {step}: a BASE step, in (0, prune_from_step="
                     f"{config.prune_from_step}]")
  if config.model.get("exit_head") != "segvit" or float(config.loss.base_exit_weight) != 0:
    raise ValueError("only a segvit-design exit model with loss.base_exit_weight=0 trains "
                     "as SegViT before pruning")
  seg_config = ckpt_lib.read_config(segvit_workdir)
  if seg_config.model.get("exit_layers") or seg_config.model.get("merge", "none") != "none":
    raise ValueError(f"{segvit_workdir} is not a SegViT run")
  for key in ("seed", "batch_size"):
    if seg_config[key] != config[key]:
      raise ValueError(f"{key}: {seg_config[key]} in {segvit_workdir}, {config[key]} here")
  mesh = sharding.make_mesh(config)
  seg_model = variables_lib.create_model(seg_config)
  seg_abstract, seg_sh = train.abstract_train_state(seg_config, seg_model, mesh)
  train_iter = train.make_train_iter(config, mesh)
  seg_state, train_iter, _ = ckpt_lib.Checkpointer(segvit_workdir, async_save=False).restore(
      sharding.with_shardings(seg_abstract, seg_sh), train_iter, step=step)

  model = variables_lib.create_model(config)
  os.makedirs(workdir, exist_ok=True)
  tx = optim.make_optimizer(train.optimizer_phases(config)[0][1])
  pv = train.policy_variables(config, model, workdir)
  state = train.init_state(jax.random.fold_in(jax.random.key(config.seed), 0), pv,
                           model=model, tx=tx, config=config)
  seg_leaves = {jax.tree_util.keystr(p): x for p, x in
                jax.tree_util.tree_flatten_with_path(seg_state)[0]}
  taken, own = 0, []

  def graft(path, x):
    nonlocal taken
    key = jax.tree_util.keystr(path)
    if key.startswith("['guard']") or key not in seg_leaves:
      own.append(key)
      return x
    if seg_leaves[key].shape != x.shape:
      raise ValueError(f"{key}: {seg_leaves[key].shape} in the SegViT run, {x.shape} here")
    taken += 1
    return seg_leaves[key]
  state = jax.tree_util.tree_map_with_path(graft, state)
  ckpt = ckpt_lib.Checkpointer(workdir, async_save=False)
  ckpt.save(step, state, train_iter, config.to_dict(), force=True)
  ckpt.close()
  return taken, own


def main(argv):
  del argv
  taken, own = fork(flags.FLAGS.config, flags.FLAGS.segvit, flags.FLAGS.workdir,
                    flags.FLAGS.step)
  print(f"{taken} arrays from {flags.FLAGS.segvit}; {len(own)} of the exit model's own "
        f"(policy net, guard): {sorted({k.split(']')[0] + ']' for k in own})}")


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "The exit model's config.")
  flags.DEFINE_string("segvit", None, "SegViT workdir with a checkpoint at --step.")
  flags.DEFINE_string("workdir", None, "The new run's workdir.")
  flags.DEFINE_integer("step", None, "The SegViT checkpoint's step (default: prune_from_step).")
  flags.mark_flags_as_required(["config", "segvit", "workdir"])
  app.run(main)
