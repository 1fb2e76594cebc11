"""CamVid (SegNet 11-class version, 480x360): real street scenes, trained from scratch.

Launch (data: the folder that holds CamVid/: --config.data.data_dir, else
$STEP_JAX_DATA/camvid_segnet, else ../shared/data/camvid_segnet next to the repository):
  # ~15 min on 2 CPU cores (2000 steps): 33.8% val mIoU, 75.6% pixel accuracy
  python -m step_jax.cli.train --config=configs/camvid.py:method=segvit,size=cpu --workdir=$WD
  # one GPU, trains properly (ViT-S/16, 352x480 crops, 40k steps)
  python -m step_jax.cli.train --config=configs/camvid.py:method=segvit,size=gpu --workdir=$WD \
      --config.data.data_dir=/path/to/camvid_segnet
  # evaluate the latest checkpoint on another split (the held-out test split, say)
  python -m step_jax.cli.evaluate --config=configs/camvid.py:method=segvit,size=gpu \
      --workdir=$WD --config.data.split=test --config.data.data_dir=/path/with/CamVid/test

  # STEP: the policy net is trained first inside the workdir (150 steps on a CPU), then
  # 1750 steps without pruning and 250 with it, on one schedule (recipe=dtop: 1500 + 500
  # with a fresh optimizer, DToP's two steps; the gpu default)
  python -m step_jax.cli.train --config=configs/camvid.py:method=step,size=cpu --workdir=$WD
  # STEP from a trained SegViT (its weights as they are; the policy net trained first, or
  # --config.model.policy.init_from=POLICY), 500 steps of pruning fine-tuning at lr 1e-4
  python -m step_jax.cli.train --config=configs/camvid.py:method=step,size=cpu,init_from=$SEGVIT_WD \
      --workdir=$WD

Arguments: method (segvit, cts, dcts, dtop, cts_dtop, step, algm, dcts_algm, algm_dtop: see
configs/step.py), size (cpu | gpu), variant (override the size's ViT, e.g. Ti/16), tau (dCTS
thresholds, '6899' or '4999'), exits ('-'-separated layers; default per variant), exit_tau (halting confidence;
default: the dataset registry's, .8), exit_head (segvit, the default | atm_shallow_first | dtop
| dtop_multiclass: see configs/step.py), init_from (a trained model to fine-tune with
pruning: set_finetune_recipe), recipe (models with exits from scratch: dtop, BASE then
pruning fine-tuning with a fresh optimizer, the gpu default; one_schedule, pruning on for the
last eighth of one schedule, the cpu default).

Evaluation: the val split, whole images. `size=cpu` trains at half resolution, so it also
tests at half resolution (short side 180) and resizes the scores back to the 480x360
labels; `size=gpu` tests at full resolution (480x360, padded to 480x368 inside the model).
"""
from configs import common
from configs import step as step_config
from step_jax.models import segmenter

_METHODS = tuple(m for m in step_config.METHODS if m != "oracle")  # the oracle needs labels


def get_config(arg=None):
  arg = common.parse_arg(arg, method="segvit", size="cpu", variant="", tau="6899", exits="",
                         exit_tau=-1.0, exit_head=segmenter.DEFAULT_EXIT_HEAD, init_from="",
                         recipe="")
  if arg.method not in _METHODS:
    raise ValueError(f"unknown method {arg.method!r}; choose from {_METHODS}")
  exit_tau = step_config.resolve_exit_tau(arg.exit_tau, "camvid")
  if arg.size not in ("cpu", "gpu"):
    raise ValueError(f"size={arg.size!r}: use cpu or gpu")
  cpu = arg.size == "cpu"
  config = common.ml_collections.ConfigDict()
  config.seed = 0
  config.method = arg.method

  # Data: crops of randomly rescaled frames (mmseg RandomResize → RandomCrop → flip →
  # photometric distortion). cpu: frames at about half size (≈240x180), 176x240 crops.
  crop = (176, 240) if cpu else (352, 480)
  config.data, config.num_classes, config.ignore_index = common.dataset_config(
      "camvid", 0)
  config.data.image_size = crop
  config.data.aug = common.ml_collections.ConfigDict(dict(
      scale=(480, 360),                      # (long, short) edges the ratios apply to
      min_ratio=0.4 if cpu else 0.5, max_ratio=0.65 if cpu else 2.0,
      # The 0.9M-parameter cpu model fits better without colour jitter (val mIoU 33.8 vs
      # 24.2 after 2000/1500 steps).
      cat_max_ratio=0.75, flip=True, photometric=not cpu))
  config.data.num_threads = 2 if cpu else 8
  config.data.num_workers = 0

  # Model: no pretrained weights can be fetched here, so small ViTs from scratch.
  variant = arg.variant or ("Mu/16" if cpu else "S/16")
  config.model = common.model_config(variant, crop[0])
  config.model.posemb_grid = (crop[0] // 16, crop[1] // 16)
  config.model.drop_path = 0.0 if cpu else 0.1
  use_exits = step_config.set_method(config.model, arg.method, variant, tau=arg.tau,
                                     exits=arg.exits, exit_tau=exit_tau,
                                     exit_head=arg.exit_head)
  # CTS shares 103 of the 256 2x2 windows of a 512² crop: the same share at any size here
  # (14 windows of a 176x240 crop, 17 of a 192x240 test image).
  config.model.cts_shared = 0.4
  # The policy net is trained here first, on the same crops (cpu: frozen ImageNet backbone).
  config.model.policy.update(auto_train_steps=150 if cpu else 20_000, train_backbone=not cpu,
                             lr=1e-3 if cpu else 5e-5)
  config.loss = common.loss_config()

  # Optimisation: from scratch, so a larger lr than the fine-tuning recipes and no head
  # multiplier (the backbone is not pretrained).
  config.batch_size = 8 if cpu else 16
  steps = 2000 if cpu else 40_000
  # With exits (DToP's recipe at the same total budget as every other method): 3/4 of the
  # steps BASE (pruning off), then 1/4 pruning fine-tuning from the BASE weights with a fresh
  # optimizer: a short warmup (DToP: 1500 of 40k steps), then poly 0.9.
  config.train_bucketing = False  # train on one static shape (see train.train_model)
  config.optim = common.optim_config(steps, lr=1e-3 if cpu else 4e-4)
  config.optim.update(head_lr_mult=1.0, weight_decay=0.05,
                      warmup_steps=100 if cpu else 1500)
  step_config.set_dtop_recipe(config, use_exits, steps * 3 // 4,
                              warmup_steps=50 if cpu else 500)
  if cpu:  # From scratch, re-warming to the peak lr undid part of BASE (Ti/16 STEP, ATM exits:
    # 36.6 % val at the end of BASE, 34.7 % after fine-tuning at 1e-3, 37.0 % at 1e-4).
    config.prune_optim.lr = config.optim.get_ref("lr") * 0.1
  # cpu: pruning on for the last eighth of the one schedule, the optimizer kept. At 2000
  # steps from scratch the schedule's end is where SegViT gains most (s0: 35.1 % val at step
  # 1500, 38.5 % at 2000); a fresh optimizer at 1e-4 over the last quarter gained 0.2 (35.4 ->
  # 35.6 %, STEP@[8] segvit exits). Pruning the last quarter cost seed 0 1.4 points against
  # SegViT (s1: +0.5), the last eighth 0.8 and 0.9 with 21 % of the tokens halted at 176x240
  # (docs/results.md, issue 30).
  recipe = arg.recipe or ("one_schedule" if cpu else "dtop")
  if recipe not in ("dtop", "one_schedule"):
    raise ValueError(f"config argument recipe={recipe!r}: use dtop or one_schedule")
  if arg.init_from and arg.recipe:
    raise ValueError(f"config arguments init_from and recipe={arg.recipe!r}: a fine-tuning from "
                     "a trained model has its own recipe (the pruning steps alone)")

  # Logging, checkpoints, evaluation.
  config.log_every = 25 if cpu else 100
  config.eval_every = 500 if cpu else 2000
  config.eval_batch_size = 8
  common.add_runtime_defaults(config)
  config.checkpoint_every = 500 if cpu else 2000
  if cpu:  # test at the training scale; scores are resized back to the 360x480 labels
    config.eval.resize_short = 180
  if arg.init_from:  # STEP from a trained SegViT: the pruning fine-tuning alone (cpu: 500 steps)
    step_config.set_finetune_recipe(config, use_exits, arg.init_from)
  elif recipe == "one_schedule":
    config.prune_optim = None
    if use_exits:
      config.prune_from_step = steps * 7 // 8
  return config
