"""SegViT baseline: plain ViT + ATM head (Zhang et al., NeurIPS'22).

Launch (the embedded synthetic scenes need no download):
  python -m step_jax.main --config=configs/segvit.py:variant=Mu/16,dataset=synthetic,smoke \
      --workdir=/tmp/segvit_smoke
Paper settings (data must be prepared first):
  python -m step_jax.main --config=configs/segvit.py:variant=B/16,dataset=ade20k,res=512 \
      --workdir=$WD
  python -m step_jax.flops --config=configs/segvit.py:variant=L/16,dataset=cityscapes,res=1024

Arguments: variant (Mu/16 Ti/16 S/16 B/16 L/16), dataset (synthetic ade20k coco_stuff10k
cityscapes camvid), res (crop side; 0 = dataset default), smoke (tiny CPU run).
"""
from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="B/16", dataset="ade20k", res=0, smoke=False)
  config = common.ml_collections.ConfigDict()
  config.seed = 0
  config.method = "segvit"

  # Data.
  config.data, config.num_classes, config.ignore_index = common.dataset_config(
      arg.dataset, arg.res)
  res = config.data.image_size[0]
  steps = common.DATASETS[arg.dataset].get("steps", 4000)

  # Model and loss.
  config.model = common.model_config(arg.variant, res)
  config.loss = common.loss_config()

  # Optimisation (STEP §4.1: AdamW 6e-5, wd .01; batch 16 as SegViT/DToP).
  config.batch_size = 16
  config.optim = common.optim_config(steps)

  # Logging and evaluation.
  config.log_every = 50
  config.eval_every = 2000
  config.eval_batch_size = 8
  common.add_runtime_defaults(config)  # checkpoints, sharding, NaN policy, config.eval
  if arg.dataset in ("ade20k", "coco_stuff10k"):  # SegViT/DToP test protocol
    config.eval.update(mode="slide", resize_short=res, max_long=4 * res)

  if arg.smoke:  # A tiny run on a laptop CPU: a few minutes, shows learning.
    config.model.update(variant="Mu/16", out_layers=(2, 3, 4), head_dim=64, head_heads=4,
                        drop_path=0.0)
    config.data.update(image_size=(128, 128), num_train=256, num_eval=32)
    config.model.posemb_grid = (8, 8)
    config.batch_size = 8
    config.optim = common.optim_config(600, lr=1e-3)
    config.optim.head_lr_mult = 1.0
    config.log_every = 25
    config.eval_every = 200
  return config
