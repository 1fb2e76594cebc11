"""Shared config pieces: `path:arg` parsing, datasets, backbone/head presets, optimiser.

Configs are code: every launch is `--config=configs/<file>.py:<k=v,...>` plus optional
`--config.a.b=value` overrides (ml_collections).
"""
import os

import ml_collections

from step_jax.data import datasets
from step_jax.models import segmenter


def parse_arg(arg, **defaults):
  """'variant=B/16,res=512,smoke' → ConfigDict with typed values (types from `defaults`)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; allowed: {sorted(defaults)}")
    if not eq:  # a bare flag means True
      value = "True"
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be true or false")
      value = value.lower() in ("true", "1")
    try:
      out[key] = kind(value) if kind is not bool else value
    except ValueError:
      raise ValueError(f"config argument {key}={value!r} must be {kind.__name__}") from None
  return out


# SegViT/DToP backbone and head presets (docs/design.md §5).
# variant: (out_layers, head_dim, head_heads, drop_path)
BACKBONES = {
    "Mu/16": ((2, 3, 4), 64, 4, 0.0),
    "Ti/16": ((6, 8, 12), 192, 6, 0.1),
    "S/16": ((6, 8, 12), 256, 8, 0.1),
    "B/16": ((6, 8, 12), 384, 12, 0.1),
    "L/16": ((8, 16, 24), 512, 16, 0.3),
}


def aug_config(name, res):
  """Training augmentation (step_jax/data/pipeline.py): mmseg's RandomResize(scale, ratio)
  → RandomCrop(image_size, cat_max_ratio) → RandomFlip → PhotoMetricDistortion → Pad."""
  scale = datasets.get(name).scale(res)
  if scale is None:  # crops + flips only (the synthetic scenes are generated at the crop size)
    return ml_collections.ConfigDict(dict(scale=(0, 0), min_ratio=1.0, max_ratio=1.0,
                                          cat_max_ratio=1.0, flip=True, photometric=False))
  return ml_collections.ConfigDict(dict(scale=scale, min_ratio=0.5, max_ratio=2.0,
                                        cat_max_ratio=0.75, flip=True, photometric=True))


# Data root: --config.data.data_dir wins; else $STEP_JAX_DATA/<dataset folder>; else (a
# development checkout) the shared data next to the repository.
DATA_ENV = "STEP_JAX_DATA"
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_data_dir(folder):
  """The default data folder of a local dataset ('camvid_segnet'), or '' when none exists
  (the data source then says how to set it)."""
  for root in (os.environ.get(DATA_ENV, ""), os.path.join(_REPO, "..", "shared", "data")):
    path = os.path.normpath(os.path.join(root, folder)) if root else ""
    if path and os.path.isdir(path):
      return path
  return ""


def dataset_config(name, res, data_dir=""):
  d = datasets.get(name)
  res = res or d.crop
  if not data_dir and d.folder:
    data_dir = default_data_dir(d.folder)
  data = ml_collections.ConfigDict(dict(
      name=name, image_size=(res, res), data_dir=data_dir, train_split="train",
      eval_split="val",
      split="",   # evaluate.py: evaluate this split instead of eval_split (e.g. "test")
      num_train=512, num_eval=64,   # synthetic only
      seed=0, aug=aug_config(name, res), num_workers=0, num_threads=4, prefetch=4,
      bad_records="fail"))   # bad training records: 'fail' (raise) | 'skip' (skip + count)
  return data, d.num_classes, d.ignore_index


def model_config(variant, res):
  if variant not in BACKBONES:
    raise ValueError(f"unknown variant {variant!r}; choose from {sorted(BACKBONES)}")
  out_layers, head_dim, head_heads, drop_path = BACKBONES[variant]
  patch = int(variant.split("/")[1])
  if res <= 0 or res % patch:
    raise ValueError(f"res={res} must be a positive multiple of the patch size {patch} of "
                     f"{variant}")
  return ml_collections.ConfigDict(dict(
      variant=variant, out_layers=out_layers, head_dim=head_dim, head_heads=head_heads,
      head_layers=segmenter.HEAD_LAYERS, head_dropout=0.1, drop_path=drop_path,
      dtype="float32", remat=False,
      # ViT self-attention: 'auto' = jax.nn.dot_product_attention on a GPU (cuDNN's fused
      # kernel in bf16), on a CPU the fused C++ kernel 'cpu_fused' from 128 tokens in
      # inference and from 512 in training (or 'chunked', blocks in plain JAX, from 512
      # where it does not build), the written-out einsum below (models/attention.resolve_impl).
      attention_impl="auto",
      # Inference: the blocks as one lax.scan (one compiled block per capacity bucket).
      scan_blocks=False,
      # Inference: capacity buckets chosen on device in the one program ('device'), or on
      # the host between programs compiled on first use ('host', evaluation/dispatch.py;
      # affordable with a fine ladder, e.g. buckets = capacity.geometric_buckets(1.05)), or
      # 'host_split': the same, each image in its own capacity after the first exit. For the
      # benchmark; evaluation and step-segment read config.eval.dispatch.
      bucket_dispatch="device",
      posemb_grid=(res // patch, res // patch), pixel_mean=(127.5,) * 3, pixel_std=(127.5,) * 3))


def optim_config(total_steps, lr=6e-5):
  """AdamW + linear warmup + poly decay, head lr ×10, clipping (SegViT/DToP/STEP §4.1)."""
  return ml_collections.ConfigDict(dict(
      lr=lr, weight_decay=0.01, b1=0.9, b2=0.999, head_lr_mult=10.0, schedule="poly",
      poly_power=1.0, warmup_steps=min(1500, max(total_steps // 20, 1)), warmup_init=1e-6,
      clip_norm=35.0, total_steps=total_steps))


def loss_config():
  # The exits' own losses before pruning starts (base_exit_weight; configs/step.py
  # set_dtop_recipe sets it per exit head) and while it runs (exit_weight); 1 = every
  # prediction weighs the same.
  return ml_collections.ConfigDict(dict(
      ce_weight=1.0, focal_weight=20.0, dice_weight=1.0, no_object_weight=0.1,
      base_exit_weight=1.0, exit_weight=1.0))


def add_runtime_defaults(config):
  """Checkpointing, sharding, NaN guard and evaluation-protocol keys (train.py, evaluate.py).

  Call after config.data is set; configs override what they need afterwards.
  """
  config.checkpoint_every = 1000      # steps between checkpoints (0: final only)
  config.keep_checkpoints = 3         # newest N kept
  config.checkpoint_async = True      # orbax writes in the background
  config.nan_policy = "stop"          # non-finite loss/grad: 'stop' (raise) | 'skip' (drop update)
  config.multihost = False            # jax.distributed.initialize() (also via JAX_COORDINATOR_ADDRESS)
  config.init_from = ""               # weights when no checkpoint: workdir | .npz | timm/mmseg .pth
  config.profile = False              # clu Profile hook (a few steps of trace in the workdir)
  config.sharding = ml_collections.ConfigDict(dict(
      fsdp=False,                     # shard big params/opt state over 'data' (else replicate)
      fsdp_min_size=2 ** 18,          # arrays smaller than this stay replicated
      num_devices=0))                 # 0: all devices
  config.eval = ml_collections.ConfigDict(dict(
      mode="whole",                   # 'whole' | 'slide' (mmseg slide_inference)
      stride=(0, 0),                  # slide stride (0: 2/3 of the window = data.image_size)
      resize_short=0,                 # test-time resize: short side to this (0: off) ...
      max_long=0,                     # ... long side at most this (0: no cap)
      label_multiple=32,              # label padding multiple (fewer compiled shapes)
      batch_size=0,                   # images per eval batch (0: config.eval_batch_size)
      # Where the capacity buckets are chosen (evaluation/evaluator.py, step-segment):
      # 'device' in the one jitted program (lax.switch over the ladder, every bucket
      # compiled), 'host' / 'host_split' between programs compiled on first use; 'auto'
      # picks per model: host_split with exits, host for token sharing, else device. Why,
      # with the measurements: evaluation/dispatch.py (AUTO_RATIO, resolve).
      dispatch="auto",
      bucket_ratio=0.0,               # host: r > 1 bounds each program's padding over a pool
                                      # (capacities planned on its counts); 0 the model's
                                      # ladder (under auto: 1.05)
      group_batches=0))               # host: sort by tokens and plan capacities in pools of N
                                      # batches (held decoded; 0: evaluator.POOL_IMAGES images)
  protocol = datasets.get(config.data.name).eval
  if protocol:  # the dataset's protocol, the same for every method
    res = int(config.data.image_size[0])
    config.eval.update(mode=protocol["mode"], resize_short=protocol["resize_short"] * res,
                       max_long=protocol["max_long"] * res)
  return config
