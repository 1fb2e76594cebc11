"""Every row of the STEP paper's tables: SegViT, +CTS, +DToP, +CTS&DToP, +dCTS, +STEP@[…].

  method     token sharing              early exit
  segvit     –                          –
  cts        top-K 2x2 (K=103)          –
  dtop       –                          DToP heads at `exits`
  cts_dtop   top-K 2x2                  DToP heads at `exits`
  dcts       dCTS, thresholds `tau`     –
  step       dCTS, thresholds `tau`     DToP heads at `exits`
  oracle     windows pure in labels     optional (`exits`), for analysis
  algm       ALGM local+global merges   –                (ALGM_DEFAULTS; not in the paper)
  dcts_algm  dCTS, then ALGM's global   –                (not in either paper)
  algm_dtop  ALGM local+global merges   exits at `exits` (not in either paper; `exit_head`
                                        'segvit' only, exits after the global merge)

Examples:
  python -m step_jax.cli.train --config=configs/step.py:method=step,variant=L/16,dataset=cityscapes,res=1024,tau=6899,exits=16 --workdir=$WD
  python -m step_jax.cli.flops --config=configs/step.py:method=dcts,variant=B/16,dataset=ade20k,res=512,tau=4999
  python -m step_jax.cli.train --config=configs/step.py:method=step,variant=Mu/16,dataset=synthetic,smoke --workdir=/tmp/step

Arguments: method; variant (Mu/16 Ti/16 S/16 B/16 L/16); dataset; res (0 = dataset crop);
tau: dCTS thresholds for 2,4,8,16 windows as digits ('6899' = .6 .8 .9 .9, '4999') or
'-'-separated decimals ('0.6-0.8-0.9-0.9'); exits: '-'-separated 1-based layers ('6-8', '16');
exit_tau: halting confidence (paper: .9 ADE20K/Cityscapes, .95 COCO-Stuff); exit_head:
'segvit' (default: SegViT's head unchanged, its deepest stage rating the tokens at each exit;
SegViT exactly when nothing halts, so a trained SegViT loads as is), 'atm_shallow_first'
(SegViT's stages run shallowest first, those at the exits serving as exits), 'dtop' (DToP's
single-stage binary heads, the paper) or 'dtop_multiclass' ((C+1)-way class heads); smoke.

CTS/dCTS/STEP need a trained policy net: `--config.model.policy.init_from=<workdir of
python -m step_jax.cli.train_policy>`, or `--config.model.policy.auto_train_steps=N` to train
one first inside this run's workdir (the smoke config does, 60 steps). With exits, training
follows DToP: `prune_from_step` steps without pruning (BASE), then pruning fine-tuning from
those weights with a fresh optimizer and schedule (`prune_optim`); for the separate-runs
recipe set prune_from_step=0 and init_from=<the BASE run's workdir>.
"""
from configs import common
from step_jax.data import datasets
from step_jax.models import segmenter

# What `method=` means, the one home of it: method → (token sharing `model.merge`, early
# exits, the row label of the paper's tables). The oracle has exits only when `exits` is given.
METHODS = {
    "segvit": ("none", False, "SegViT"),
    "cts": ("cts", False, "+CTS"),
    "dtop": ("none", True, "+DToP"),
    "cts_dtop": ("cts", True, "+CTS&DToP"),
    "dcts": ("dcts", False, "+dCTS"),
    "step": ("dcts", True, "+STEP"),
    "oracle": ("oracle", None, "oracle"),
    "algm": ("algm", False, "+ALGM"),
    # Compositions (models/algm_encoder.py): ALGM's global merge over dCTS supertokens, and
    # early exits rating ALGM's merged tokens.
    "dcts_algm": ("dcts_algm", False, "+dCTS&ALGM"),
    "algm_dtop": ("algm", True, "+ALGM&DToP"),
}
# ALGM (Norouzi et al., CVPR 2024; the reference's training notes): variant → ((local, global)
# merge blocks, 1-based; local merge threshold). Mu/16 (4 blocks, ours, not in the paper):
# the local merge in block 1, the global one in block 2, so that two blocks run merged.
ALGM_DEFAULTS = {"Mu/16": ((1, 2), 0.90), "Ti/16": ((1, 5), 0.90), "S/16": ((1, 5), 0.88),
                 "B/16": ((1, 5), 0.94), "L/16": ((1, 7), 0.95)}
# DToP/STEP exit placements: ViT-B @[6,8] (DToP) and @[8] (STEP); ViT-L @[8,16] and @[16]/@[18].
# ViT-Ti/16 (12 blocks like B/16) @[6,8]: with SegViT's head as exits an exit at 8 alone halted
# too few tokens to save beyond dCTS at 1024² (0.92x its GFLOPs at tau .9, 0.88x at .8), @[6,8]
# at .8 halts 37.6 % (issue 30, CamVid; docs/results.md).
DEFAULT_EXITS = {"Mu/16": "2", "Ti/16": "6-8", "S/16": "8", "B/16": "6-8", "L/16": "8-16"}
# DToP's exit heads: 6 attention heads for ViT-B, 8 for ViT-L.
DTOP_HEADS = {"Mu/16": 4, "Ti/16": 6, "S/16": 8, "B/16": 6, "L/16": 8}


def parse_tau(tau: str):
  form = "give 4 digits ('6899') or 4 '-'-separated decimals in [0, 1] ('0.6-0.8-0.9-0.9')"
  if "-" in tau:
    try:
      values = tuple(float(t) for t in tau.split("-"))
    except ValueError:
      raise ValueError(f"config argument tau={tau!r}: {form}") from None
  elif tau.isdigit() and len(tau) == 4:
    values = tuple(int(d) / 10 for d in tau)
  else:
    raise ValueError(f"config argument tau={tau!r}: {form}")
  if len(values) != 4 or any(not 0 <= v <= 1 for v in values):
    raise ValueError(f"tau={tau!r} must give 4 thresholds in [0, 1] (windows 2, 4, 8, 16)")
  return values


def resolve_exit_tau(exit_tau, dataset):
  """The config argument exit_tau: -1 (its default) takes the dataset registry's halting
  confidence (measured for the default exit head where it differs from the papers'), any
  other value must lie in [0, 1]."""
  if exit_tau == -1.0:
    return datasets.get(dataset).exit_tau
  if not 0 <= exit_tau <= 1:
    raise ValueError(f"config argument exit_tau={exit_tau:g} must lie in [0, 1] (the "
                     "halting confidence, e.g. exit_tau=0.9)")
  return exit_tau


def set_method(m, method, variant, *, tau="6899", exits="", exit_tau=0.9,
               exit_head=segmenter.DEFAULT_EXIT_HEAD):
  """Sets the token-sharing and early-exit fields of model config `m` for `method` (one of
  METHODS); returns whether the method has early exits."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose from {tuple(METHODS)}")
  merge, has_exits, _ = METHODS[method]
  # Token sharing.
  m.merge = merge
  m.thresholds = parse_tau(tau)
  m.cts_shared = 103.0  # CTS: 103 shared 2x2 windows at any size (a value < 1: a share)
  m.superpatch_resize = "area"
  m.buckets = segmenter.BUCKETS
  # ALGM: per-image token counts (algm_batch_min=True: the reference's batch minimum);
  # algm_global_min: a floor under the global merge's adaptive threshold (-1: none).
  m.algm_layers, m.algm_threshold = ALGM_DEFAULTS[variant]
  m.algm_global_min = -1.0
  m.algm_batch_min = False
  # The policy net is trained first (python -m step_jax.cli.train_policy) and frozen here:
  # init_from = that workdir; or auto_train_steps > 0 trains one inside this run's workdir.
  m.policy = common.ml_collections.ConfigDict(dict(source="pypi", hidden=128, init_from="",
                                                   auto_train_steps=0, train_backbone=True,
                                                   lr=5e-5))
  # Early exit.
  use_exits = bool(exits) if has_exits is None else has_exits
  exits = exits or DEFAULT_EXITS[variant]
  m.exit_layers = tuple(int(e) for e in exits.split("-")) if use_exits else ()
  m.exit_threshold = exit_tau
  m.exit_mode = "compact"
  m.keep_top_k = 5
  m.exit_buckets = segmenter.BUCKETS
  m.exit_head_heads = DTOP_HEADS[variant]
  # segmenter.EXIT_HEADS: 'segvit' (SegViT's head, its stage 0 deciding at the exits),
  # 'atm_shallow_first', 'dtop' (the paper: DToP's heads) or 'dtop_multiclass'.
  m.exit_head = exit_head
  return use_exits


def set_dtop_recipe(config, use_exits, base_steps, warmup_steps):
  """DToP's two steps in one run: `base_steps` with pruning off (every head trained on every
  token), then the rest of `config.optim.total_steps` is pruning fine-tuning from those BASE
  weights with a fresh optimizer: `warmup_steps` of linear warmup to `config.optim.lr` (the
  peak lr again, as DToP; override `prune_optim.lr` for a gentler fine-tuning), then poly 0.9
  (train.optimizer_phases). prune_optim.lr follows optim.lr until it is set itself."""
  config.prune_from_step = base_steps if use_exits else 0
  # The exits' losses in BASE: DToP trains its own heads on every token from the start; the
  # 'segvit' exits are SegViT's stage 0 reading shallower blocks, and training it there before
  # it decides anything cost the final head (CamVid Ti/16 @[6,8], step 1500: 33.5 % val vs
  # SegViT's 35.1 %), so they weigh 0 until pruning starts: BASE is SegViT's training.
  config.loss.base_exit_weight = 0.0 if use_exits and config.model.exit_head == "segvit" else 1.0
  config.prune_optim = common.ml_collections.ConfigDict(dict(
      lr=config.optim.get_ref("lr") * 1.0, warmup_steps=warmup_steps, schedule="poly",
      poly_power=0.9))


def set_finetune_recipe(config, use_exits, init_from):
  """STEP (or DToP) from a trained model, e.g. a `method=segvit` workdir or a converted
  SegViT checkpoint: its weights (`init_from`; head stages land on the stage that reads the
  same block), pruning on from the first step, and only the pruning fine-tuning of DToP's
  recipe (`prune_optim` over the pruning steps; no BASE phase: the trained model is the
  BASE). With exit_head='segvit' the model starts as that SegViT exactly."""
  if not use_exits:
    raise ValueError(f"config argument init_from={init_from!r} fine-tunes a model with exits "
                     f"(method={config.method!r} has none)")
  resolved = config.copy_and_resolve_references()
  steps = int(resolved.optim.total_steps) - int(resolved.prune_from_step)
  config.optim = resolved.optim
  config.optim.update(resolved.prune_optim.to_dict())
  config.optim.total_steps = steps
  config.prune_from_step = 0
  config.prune_optim = None
  config.init_from = init_from


def get_config(arg=None):
  arg = common.parse_arg(arg, method="step", variant="B/16", dataset="ade20k", res=0,
                         tau="6899", exits="", exit_tau=-1.0,
                         exit_head=segmenter.DEFAULT_EXIT_HEAD, smoke=False, init_from="")
  config = common.ml_collections.ConfigDict()
  config.seed = 0
  config.method = arg.method

  config.data, config.num_classes, config.ignore_index = common.dataset_config(
      arg.dataset, arg.res)
  res = config.data.image_size[0]
  steps = datasets.get(arg.dataset).steps
  config.model = common.model_config(arg.variant, res)
  m = config.model

  use_exits = set_method(m, arg.method, arg.variant, tau=arg.tau, exits=arg.exits,
                         exit_tau=resolve_exit_tau(arg.exit_tau, arg.dataset),
                         exit_head=arg.exit_head)

  config.loss = common.loss_config()
  config.batch_size = 16
  # DToP's two steps in one run: `steps` with pruning off (all heads trained), then a
  # quarter as many of pruning fine-tuning (ADE 160k + 40k, COCO-Stuff 80k + 20k) with a
  # fresh optimizer (DToP: 1500 warmup steps, then poly 0.9).
  config.train_bucketing = False  # train on one static shape (see train.train_model)
  # The STEP paper (§4.1): AdamW, lr 6e-5, weight decay 0.01, cosine schedule.
  config.optim = common.optim_config(steps + (steps // 4 if use_exits else 0))
  config.optim.schedule = "cosine"
  set_dtop_recipe(config, use_exits, steps, warmup_steps=1500)
  config.log_every = 50
  config.eval_every = 2000
  config.eval_batch_size = 8
  common.add_runtime_defaults(config)  # checkpoints, sharding, NaN policy, config.eval

  if arg.smoke:
    m.update(variant="Mu/16", out_layers=(2, 3, 4), head_dim=64, head_heads=4, drop_path=0.0,
             posemb_grid=(8, 8), exit_head_heads=4)
    if use_exits and not arg.exits:  # the user's exits stay (build checks them)
      m.exit_layers = (2,)
    config.data.update(image_size=(128, 128), num_train=256, num_eval=32)
    config.batch_size = 8
    config.optim = common.optim_config(600, lr=1e-3)
    set_dtop_recipe(config, use_exits, 400, warmup_steps=20)
    m.policy.update(train_backbone=False, auto_train_steps=60, lr=1e-3)
    m.buckets = m.exit_buckets = (0.5, 1.0)   # fewer compiled branches on a CPU
    config.optim.head_lr_mult = 1.0
    config.log_every = 25
    config.eval_every = 200
  if arg.init_from:
    set_finetune_recipe(config, use_exits, arg.init_from)
  return config
