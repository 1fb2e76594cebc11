"""Optimiser: AdamW with warmup + poly/cosine decay, head lr multiplier, no decay on
norms/biases/embeddings, global-norm clipping (SegViT/DToP/STEP recipes)."""
import jax
import optax

# Parameter names that never get weight decay (mmseg `paramwise_cfg` / big_vision habit).
_NO_DECAY = ("bias", "scale", "pos_embedding", "queries")
# The segmenter's subtrees that never train: the policy net is trained beforehand.
FROZEN = ("policy",)


def learning_rate_fn(cfg, base_lr=None):
  lr = cfg.lr if base_lr is None else base_lr
  warm = int(cfg.warmup_steps)
  init = min(cfg.get("warmup_init", 1e-6), lr)
  decay_steps = max(int(cfg.total_steps) - warm, 1)
  schedule = cfg.get("schedule", "poly")
  if schedule == "poly":
    decay = optax.polynomial_schedule(lr, 0.0, cfg.get("poly_power", 1.0), decay_steps)
  elif schedule == "cosine":
    decay = optax.cosine_decay_schedule(lr, decay_steps)
  elif schedule == "constant":
    decay = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optim.schedule={schedule!r}: use 'poly', 'cosine' or 'constant'")
  if warm <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(init, lr, warm), decay], [warm])


def _decay_mask(params):
  """True where weight decay applies: kernels, not biases/norm scales/embedding tables."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in _NO_DECAY, params)


def without_gradient(params, frozen=FROZEN):
  """`params` with the `frozen` subtrees behind stop_gradient. They get no update anyway
  (make_optimizer); not differentiating them saves tracing their JVP (seconds for the policy
  net's EfficientNet) and gives the same values."""
  return dict(params, **{k: jax.lax.stop_gradient(params[k]) for k in frozen if k in params})


def make_optimizer(cfg, frozen=FROZEN):
  """cfg: config.optim. Everything but the 'backbone' subtree trains at lr × head_lr_mult
  (default 1); the top-level subtrees named in `frozen` (the segmenter's: the 'policy' net,
  trained beforehand; the policy trainer's: its 'backbone' when it stays ImageNet's) get no
  update, no weight decay and no optimizer moments."""
  def adamw(lr):
    return optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999),
                       weight_decay=cfg.weight_decay, mask=_decay_mask)
  # A frozen subtree is its own group (the optimizer-state layout checkpoints rely on).
  group = lambda k: k if k in frozen or k == "backbone" else "head"
  labels = lambda params: {k: group(k) for k in params}
  tx = optax.multi_transform(
      {"backbone": adamw(learning_rate_fn(cfg)),
       "head": adamw(learning_rate_fn(cfg, cfg.lr * cfg.get("head_lr_mult", 1.0))),
       **{name: optax.set_to_zero() for name in frozen}}, labels)
  if cfg.get("clip_norm"):
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx
