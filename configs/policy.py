"""dCTS policy net (EfficientNet-Lite0 + per-window-size heads) on window-purity targets.

  python -m step_jax.cli.train_policy --config=configs/policy.py:dataset=camvid,size=cpu \
      --workdir=workdirs/policy_camvid --config.data.data_dir=../shared/data
  python -m step_jax.cli.train_policy --config=configs/policy.py:dataset=synthetic,size=smoke \
      --workdir=/tmp/policy

CTS recipe (tue-mps/cts-segmenter, docs/design.md §5): AdamW lr 5e-5, weight decay 1e-3,
constant lr, flips, batch 8, 50k iterations. size=cpu shortens it for a 2-core machine with a larger lr.
"""
from configs import common
from step_jax.models import segmenter



def get_config(arg=None):
  arg = common.parse_arg(arg, dataset="camvid", size="gpu", res=0)
  config = common.ml_collections.ConfigDict()
  config.seed = 0
  config.data, config.num_classes, config.ignore_index = common.dataset_config(
      arg.dataset, arg.res)
  if arg.dataset == "camvid":
    config.data.image_size = (352, 480)         # 360x480 images, crops on the 16-px grid
    config.data.eval_crop = (352, 480)
  else:
    config.data.eval_crop = tuple(config.data.image_size)
  config.data.aug = common.ml_collections.ConfigDict(dict(
      scale=(0, 0), min_ratio=1.0, max_ratio=1.0, cat_max_ratio=1.0, flip=True,
      photometric=False))
  config.policy = common.ml_collections.ConfigDict(dict(
      source="pypi", hidden=128, train_backbone=True, pretrained=True, border_ignore=False,
      patch_size=16,   # the segmenter's: windows of k x k patches
      thresholds=segmenter.TAU_6899, tau_configs=dict(segmenter.TAU_PRESETS)))
  config.batch_size = 8
  config.optim = common.ml_collections.ConfigDict(dict(
      lr=5e-5, weight_decay=1e-3, warmup_steps=0, total_steps=50_000))
  config.log_every = 100
  config.checkpoint_every = 1000   # atomic, resumable (train state + input iterator)
  if arg.size == "cpu":
    # Frozen ImageNet backbone: XLA's CPU depthwise-conv backward makes full fine-tuning take
    # ~10 s a step on 2 cores; the heads alone train in minutes.
    config.policy.train_backbone = False
    config.optim.update(lr=1e-3, warmup_steps=10, total_steps=150)
    config.log_every = 25
    config.checkpoint_every = 50
  elif arg.size == "smoke":
    config.data.update(image_size=(128, 128), num_train=32, num_eval=8)
    config.data.eval_crop = (128, 128)
    config.batch_size = 4
    config.optim.update(lr=1e-3, warmup_steps=0, total_steps=4)
    config.log_every = 2
    config.checkpoint_every = 2
  elif arg.size != "gpu":
    raise ValueError(f"size={arg.size!r}: use cpu, gpu or smoke")
  return config
