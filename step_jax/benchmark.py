"""Wall-clock and FLOPs of one configuration on the current device, as one JSON line.

  python -m step_jax.benchmark --config=configs/step.py:method=step,variant=B/16,res=1024 \
      --batch=1 --dtype=fp32 [--workdir=DIR] [--images=DIR_OR_SPLIT] [--exit_share=0.4]
  python -m step_jax.benchmark --workdir=DIR    # a trained run at its own config

Timing: `--warmup` untimed calls, then `--reps` timed calls of the jitted forward (policy net,
merge, encoder, exits, heads and the upsampled prediction), each ended by
`block_until_ready`; median and spread are reported with the compile time.

Tokens and GFLOPs: every valid token of every stage is counted (useful GFLOPs) and so is every
slot the compiled program executes, padding and bucket capacity included (executed GFLOPs).

Weights: a trained checkpoint when `--workdir` holds one; otherwise random weights, with the
policy from `config.model.policy.init_from` when set. Halting needs trained exit heads; with
random heads `--exit_share` calibrates each exit threshold on the benchmark images so that
this share of the still-active tokens halts (the paper reports ~40 %), which fixes the token
counts that the wall-clock is compared against. The JSON says which weights were used.
"""
import json
import os
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from step_jax import cli
from step_jax import flops
from step_jax.models import attention
from step_jax.models import early_exit
from step_jax.models import segmenter

def random_variables(model, image_hw, seed=0):
  """Variables of `model` drawn with numpy from eval_shape (no compiled init): kernels
  lecun-normal, embeddings N(0, .02), norms 1, biases 0."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_hw, 3)))
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = getattr(path[-1], "key", "")
    if name == "kernel":
      return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
    if name in ("pos_embedding", "queries"):
      return (rng.normal(size=s.shape) * (0.02 if name == "pos_embedding" else 1)).astype(s.dtype)
    return np.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, s.dtype)

  return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


def load_images(config, folder, n, split=None):
  """n images resized to the config's crop, uint8 [n, H, W, 3]: from `folder`, else from
  `split` (default: the split being evaluated, config.data.split, else data.eval_split)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w = config.data.image_size
  if folder:
    names = sorted(f for f in os.listdir(folder) if f.lower().endswith((".png", ".jpg", ".jpeg")))
    if not names:
      raise FileNotFoundError(f"no PNG/JPEG images in --images={folder}")
    ims = [Image.open(os.path.join(folder, f)).convert("RGB") for f in names[:n]]
  else:
    from step_jax.data import get_source  # pylint: disable=g-import-not-at-top
    split = split or config.data.get("split", "") or config.data.eval_split
    src = get_source(config.data, split, config.num_classes, config.ignore_index)
    ims = [Image.fromarray(src[i]["image"]) for i in range(min(n, len(src)))]
  return np.stack([np.asarray(im.resize((w, h), Image.BILINEAR)) for im in ims])


def calibrate_exits(model, variables, images, share, *, labels=None):
  """Per-exit thresholds such that `share` of the active tokens are halting candidates at
  each exit (the top-k-per-class rule then keeps a few of them: <= k·C tokens); `labels`
  only for the oracle merge."""
  kw = {} if labels is None else dict(labels=jnp.asarray(labels))
  taus = []
  for s in range(len(model.exit_layers)):
    trial = model.clone(exit_threshold=tuple(taus) + (1.0,) * (len(model.exit_layers) - s))
    out, info = jax.jit(lambda v, x, trial=trial: trial.apply(v, x, **kw))(
        variables, jnp.asarray(images, jnp.float32))
    aux = out["aux"][s]
    conf, _ = early_exit.token_confidence(
        aux["pred_logits"], aux["pred_masks"].reshape(aux["pred_masks"].shape[:2] + (-1,)))
    # Cells still active at exit s (with supertokens a token counts once per covered cell).
    alive = np.asarray(info["halt_stage"]).reshape(conf.shape) >= s
    taus.append(float(np.quantile(np.asarray(conf)[alive], 1 - share)))
  return tuple(taus)


def token_stats(config, model, variables, images):
  """Tokens per stage and GFLOPs (useful: valid tokens; executed: compiled slots), averaged
  over `images` run one at a time (each image picks its own buckets)."""
  hw = tuple(config.data.image_size)
  n_full = (hw[0] // model.backbone.patch_size) * (hw[1] // model.backbone.patch_size)
  single = jax.jit(lambda v, x: model.apply(v, x)[1])
  useful, executed, stage_tokens = [], [], []
  for im in np.asarray(images):
    info = single(variables, im[None])
    n_tok = float(np.asarray(info.get("num_tokens", [n_full]))[0])
    cap = float(info.get("capacity", n_full))
    if model.exit_layers:
      active = [float(a) for a in np.asarray(info["active_tokens"])[0]]
      caps = [cap] * len(active) if model.exit_mode == "mask" else \
          [cap] + [float(c) for c in np.asarray(info["stage_capacity"])[1:]]
    else:
      active = caps = None
    stage_tokens.append(active or [n_tok])
    useful.append(flops.token_macs(config, n_tok, active))
    executed.append(flops.token_macs(config, cap, caps))
  mean = lambda rows, k: float(np.mean([r[k] for r in rows]))
  return dict(tokens_full=n_full,
              mean_tokens_per_stage=np.mean(stage_tokens, 0).round(1).tolist(),
              gflops_useful=mean(useful, "total"), gflops_executed=mean(executed, "total"),
              gflops_policy=mean(useful, "policy"), gflops_backbone=mean(useful, "backbone"),
              gflops_heads=mean(useful, "heads"), images=len(images))


def eval_gflops(config, model, variables, num_images=16, split=None):
  """GFLOPs for the eval json: the formula for static models; for supertoken/early-exit
  models the mean over the first `num_images` images of `split` (default: the evaluated
  split, see load_images; at the crop size) of the useful and the executed (bucket capacity)
  GFLOPs, with the tokens per stage."""
  if model.merge == "none" and not model.exit_layers:
    return dict(gflops=flops.model_macs(config)["total"])
  h, w = config.data.image_size
  p = model.backbone.patch_size
  full = flops.token_macs(config, (h // p) * (w // p))["total"]   # every token, every layer
  if model.merge == "oracle":  # needs labels; token_stats runs images only
    return dict(gflops_full=full)
  split = split or config.data.get("split", "") or config.data.eval_split
  st = token_stats(config, model, variables, load_images(config, "", num_images, split))
  return dict(gflops=st["gflops_useful"], gflops_executed=st["gflops_executed"],
              gflops_full=full, tokens_per_stage=st["mean_tokens_per_stage"],
              tokens_full=st["tokens_full"], gflops_images=st["images"], gflops_split=split)


def prepare(config, dtype="fp32", variables=None, images=None, exit_share=-1.0):
  """(config, model, variables, weights description) ready to run; see the module doc."""
  config = config.copy_and_resolve_references()
  config.model.dtype = "bfloat16" if dtype == "bf16" else "float32"
  hw = tuple(config.data.image_size)
  model = segmenter.build(config.model, config.num_classes, hw, config.ignore_index)
  weights = "given"
  if variables is None:
    variables, weights = random_variables(model, hw), "random"
    init_from = config.model.get("policy", {}).get("init_from", "")
    if init_from and model.policy is not None:
      from step_jax import train_policy  # pylint: disable=g-import-not-at-top
      pol = train_policy.load_variables(init_from)
      variables = {col: dict(variables[col], policy=pol[col]) for col in variables}
      weights = "random ViT/heads, trained policy"
  if exit_share > 0 and model.exit_layers:
    model = model.clone(exit_threshold=calibrate_exits(model, variables, np.asarray(images),
                                                       exit_share))
  return config, model, variables, weights


def measure(config, variables=None, images=None, *, batch=1, dtype="fp32", reps=5, warmup=2,
            exit_share=-1.0, weights="given"):
  """Times the jitted forward and counts tokens/GFLOPs; returns the JSON-able dict."""
  config, model, variables, prepared = prepare(config, dtype, variables, images, exit_share)
  weights = weights if prepared == "given" else prepared
  hw = tuple(config.data.image_size)
  images = np.asarray(images)
  reps_batch = np.concatenate([images] * (-(-batch // len(images))))[:batch]

  def fwd(v, x):
    out, info = model.apply(v, x)
    return segmenter.predict_scores(out, x.shape[1:3]), info

  t0 = time.perf_counter()
  compiled = jax.jit(fwd).lower(variables, reps_batch).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(compiled(variables, reps_batch))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(variables, reps_batch))
    times.append(time.perf_counter() - t)
  stats = token_stats(config, model, variables, images)
  ms = [1000 * t / batch for t in times]
  mem = None
  try:
    mem = jax.devices()[0].memory_stats().get("peak_bytes_in_use")
  except Exception:  # pylint: disable=broad-except
    pass  # the CPU backend reports no memory statistics
  dev = jax.devices()[0]
  return dict(
      config=config.get("name", ""), method=config.get("method", "segvit"),
      variant=config.model.variant, image_size=list(hw),
      device=f"{dev.platform}:{getattr(dev, 'device_kind', '')} ({platform.processor() or platform.machine()})",
      dtype=dtype, batch=batch, weights=weights,
      images_per_s=batch / statistics.median(times),
      ms_per_image_median=statistics.median(ms), ms_per_image_min=min(ms),
      ms_per_image_max=max(ms), compile_s=compile_s, peak_bytes=mem,
      exit_threshold=np.atleast_1d(model.exit_threshold).round(4).tolist()
      if model.exit_layers else None,
      exit_mode=model.exit_mode if model.exit_layers else None,
      exit_head=model.exit_head if model.exit_layers else None,
      attention_impl=attention.resolve_impl(model.backbone.attention_impl, model.backbone.dtype,
                                            model.backbone.width // model.backbone.num_heads),
      **stats)


def run():
  """`python -m step_jax.benchmark` (flags are defined here so importing stays free)."""
  config_flags.DEFINE_config_file("config", None, "Config (path:arg, or a .json); default: "
                                  "the --workdir's config.json (--config.a.b=value overrides "
                                  "apply to either).")
  flags.DEFINE_string("workdir", None, "Trained run to load (optional).")
  flags.DEFINE_integer("batch", 1, "Images per call.")
  flags.DEFINE_enum("dtype", "fp32", ["fp32", "bf16"], "Compute dtype.")
  flags.DEFINE_integer("reps", 5, "Timed repetitions.")
  flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
  flags.DEFINE_string("images", "", "Folder of images (PNG/JPEG) to benchmark on; "
                      "default: the config's eval split.")
  flags.DEFINE_integer("num_images", 8, "How many images to use.")
  flags.DEFINE_float("exit_share", -1.0, "Calibrate exit thresholds to halt this "
                     "share of active tokens per exit (random exit heads).")
  cli.list_flags_in_help(__name__)
  taken = cli.take_config_args()
  app.run(lambda argv: main(argv, taken))


def run_config(config, workdir=None, *, images="", num_images=8, **kw):
  """The benchmark's JSON dict for `config` (None: the workdir's own config.json), with the
  trained weights of `workdir` or random ones; kw go to `measure`."""
  variables, weights = None, "random"
  if workdir:
    from step_jax import train  # pylint: disable=g-import-not-at-top
    config = config or train.workdir_config(workdir)
    variables, weights = train.restore_variables(config, workdir), f"trained ({workdir})"
  if config is None:
    raise ValueError("benchmark needs --config, or --workdir of a trained run")
  return measure(config, variables, load_images(config, images, num_images), weights=weights,
                 **kw)


def main(argv, taken=("", [])):
  del argv
  f = flags.FLAGS
  config = cli.config_from(f.config, f.workdir, taken)
  result = run_config(config, f.workdir, images=f.images, num_images=f.num_images,
                      batch=f.batch, dtype=f.dtype, reps=f.reps, warmup=f.warmup,
                      exit_share=f.exit_share)
  result["config"] = (config_flags.get_config_filename(f["config"]) if f.config
                      else taken[0] or os.path.join(f.workdir, "config.json"))
  print(json.dumps(result))


if __name__ == "__main__":
  run()
