"""Wall-clock and FLOPs of one configuration on the current device, as one JSON line.

  python -m step_jax.cli.benchmark --config=configs/step.py:method=step,variant=B/16,res=1024 \
      --batch=1 --dtype=fp32 [--workdir=DIR] [--images=DIR_OR_SPLIT] [--exit_share=0.4]
  python -m step_jax.cli.benchmark --workdir=DIR    # a trained run at its own config

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

`measure_evaluation` times the evaluator itself (evaluation/evaluator.py) under each bucket
dispatch, per image and compile seconds, for choosing config.eval.dispatch:

  python experiments/eval_dispatch.py --config=configs/step.py:method=step,variant=B/16,dataset=camvid,res=1024 \
      --config.model.policy.init_from=POLICY --exit_share=0.4 --square --batch=1 --batch=8
"""

import platform
import statistics
import time

import jax
import numpy as np
from PIL import Image

from step_jax.data import get_source
from step_jax.evaluation import dispatch as dispatch_lib
from step_jax.evaluation import evaluator
from step_jax.evaluation import tokens
from step_jax.models import attention
from step_jax.models import flops
from step_jax.models import builder
from step_jax.models import segmenter
from step_jax.models import variables as variables_lib
from step_jax.models import vit as vit_lib
from step_jax.runtime import checkpoint
from step_jax.runtime import sharding

def prepare(config, dtype="fp32", variables=None, images=None, exit_share=-1.0):
  """(config, model, variables, weights description) ready to run; see the module doc."""
  config = config.copy_and_resolve_references()
  config.model.dtype = "bfloat16" if dtype == "bf16" else "float32"
  hw = tuple(config.data.image_size)
  model = builder.build(config.model, config.num_classes, hw, config.ignore_index)
  weights = "given"
  if variables is None:
    variables, weights = variables_lib.random_variables(model, hw), "random"
    init_from = config.model.get("policy", {}).get("init_from", "")
    if init_from and model.policy is not None:
      variables = variables_lib.with_trained_policy(variables, init_from)
      weights = "random ViT/heads, trained policy"
  if exit_share > 0 and model.exit_layers:
    model = model.clone(exit_threshold=tokens.calibrate_exits(model, variables, np.asarray(images),
                                                       exit_share))
  return config, model, variables, weights


def measure(config, variables=None, images=None, *, batch=1, dtype="fp32", reps=5, warmup=2,
            exit_share=-1.0, weights="given", dispatch=None, group=False):
  """Times the forward and counts tokens/GFLOPs; returns the JSON-able dict.

  The images run `batch` at a time (`group`: batches of similar token counts); call k of the
  `warmup` + `reps` calls takes batch k of them, cyclically. dispatch: 'device' (the one
  jitted program; its buckets chosen by lax.switch), 'host' (dispatch.HostBuckets:
  capacities chosen on the host, each compiled on first use) or 'host_split' (the same, each
  image alone after the first exit, in its own capacity); on the host every batch runs once
  untimed first, so that timed calls never compile, and stands for the warmup; default
  config.model.bucket_dispatch.
  """
  config, model, variables, prepared = prepare(config, dtype, variables, images, exit_share)
  weights = weights if prepared == "given" else prepared
  dispatch = dispatch or config.model.get("bucket_dispatch", "device")
  host = dispatch_lib.host_buckets(model, dispatch)
  hw = tuple(config.data.image_size)
  images = np.asarray(images)
  batches = tokens.batches_of(model, variables, images, batch, group, host)
  scores = jax.jit(lambda out: segmenter.predict_scores(out, hw))

  def fwd(v, x):
    out, info = model.apply(v, x)
    return segmenter.predict_scores(out, x.shape[1:3]), info

  t0 = time.perf_counter()
  if host:
    call = lambda v, x: scores(host(v, x)[0])
    for idx in batches:   # compiles every program these batches need
      jax.block_until_ready(call(variables, images[idx]))
    compile_s, programs = sum(host.compile_s.values()), len(host.compile_s)
  else:
    call = jax.jit(fwd).lower(variables, images[batches[0]]).compile()
    compile_s, programs = time.perf_counter() - t0, 1
    for k in range(warmup):
      jax.block_until_ready(call(variables, images[batches[k % len(batches)]]))
  times, timed = [], 0
  # Both dispatches time the same batches (their token counts, hence their cost, differ).
  for k in range(reps):
    x = images[batches[(warmup + k) % len(batches)]]
    t = time.perf_counter()
    jax.block_until_ready(call(variables, x))
    times.append(time.perf_counter() - t)
    timed += len(x)
  # The token statistics run the same batches: on device through the program just timed.
  forward = host or (lambda v, x: (None, call(v, x)[1]))
  stats = tokens.token_stats(config, model, variables, images, batch=batch, group=group,
                             forward=forward)
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
      device=f"{dev.platform}:{getattr(dev, 'device_kind', '')} "
             f"({platform.processor() or platform.machine()})",
      dtype=dtype, batch=batch, weights=weights,
      images_per_s=batch / statistics.median(times),
      ms_per_image_median=statistics.median(ms), ms_per_image_min=min(ms),
      ms_per_image_max=max(ms), ms_per_image_mean=1000 * sum(times) / timed,
      compile_s=compile_s, programs_compiled=programs,
      bucket_dispatch=dispatch, peak_bytes=mem,
      exit_threshold=np.atleast_1d(model.exit_threshold).round(4).tolist()
      if model.exit_layers else None,
      exit_mode=model.exit_mode if model.exit_layers else None,
      exit_head=model.exit_head if model.exit_layers else None,
      attention_impl=attention.resolve_impl(  # the path of the full token grid
          model.backbone.attention_impl, model.backbone.dtype,
          model.backbone.width // model.backbone.num_heads,
          (hw[0] // model.backbone.patch_size) * (hw[1] // model.backbone.patch_size)),
      **stats)


def run_config(config, workdir=None, *, images="", num_images=8, **kw):
  """The benchmark's JSON dict for `config` (None: the workdir's own config.json), with the
  trained weights of `workdir` or random ones; kw go to `measure`."""
  variables, weights = None, "random"
  if workdir:
    config = config or checkpoint.read_config(workdir)
    variables, weights = variables_lib.load(config, workdir), f"trained ({workdir})"
  if config is None:
    raise ValueError("benchmark needs --config, or --workdir of a trained run")
  return measure(config, variables, tokens.load_images(config, images, num_images), weights=weights,
                 **kw)


def flops_report(config, workdir=None, *, images="", num_images=16, exit_share=-1.0):
  """GFLOPs and tokens of `config`: the formula for a static model; for supertokens or exits
  (the tokens depend on the image) the mean over `num_images` images, with the weights of
  `workdir` or random ones (`exit_share`: calibrated exits; see the module doc)."""
  h, w = tuple(config.data.image_size)
  v = vit_lib.decode_variant(config.model.variant)
  dynamic = config.model.get("merge", "none") != "none" or config.model.get("exit_layers", ())
  if not dynamic:
    m = flops.model_macs(config)
    return dict(gflops=round(m["total"], 4), backbone=round(m["backbone"], 4),
                heads=round(m["heads"], 4),
                tokens=(h // v["patch_size"]) * (w // v["patch_size"]), image_size=[h, w])
  variables, weights = None, None
  if workdir:
    variables, weights = variables_lib.load(config, workdir), "trained"
  ims = tokens.load_images(config, images, num_images)
  config, model, variables, prepared = prepare(config, "fp32", variables, ims, exit_share)
  st = tokens.token_stats(config, model, variables, ims)
  return dict(
      gflops=round(st["gflops_useful"], 4), gflops_executed=round(st["gflops_executed"], 4),
      policy=round(st["gflops_policy"], 4), backbone=round(st["gflops_backbone"], 4),
      heads=round(st["gflops_heads"], 4), tokens=st["mean_tokens_per_stage"][0],
      tokens_per_stage=st["mean_tokens_per_stage"], tokens_full=st["tokens_full"],
      images=st["images"], image_size=[h, w], weights=weights or prepared)


class _Subset:
  """The first `n` examples of `source` (0: all), resized to `hw` when given: images
  bilinear, labels nearest (the fixed size the benchmarks quote GFLOPs at)."""

  def __init__(self, source, n=0, hw=None):
    self.source, self.n, self.hw = source, min(n or len(source), len(source)), hw

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    ex = self.source[i]
    if self.hw is None:
      return ex
    h, w = self.hw
    label = Image.fromarray(np.asarray(ex["label"])).resize((w, h), Image.NEAREST)
    return dict(image=evaluator.resize_image(np.asarray(ex["image"]), (h, w)),
                label=np.asarray(label))

  def images(self):
    """The images as one uint8 array [n, H, W, 3] (all of one size: `hw` given)."""
    return np.stack([self[i]["image"] for i in range(self.n)])


def measure_evaluation(config, variables=None, *, dispatches=("device", "host"),
                       bucket_ratio=1.05, batch=0, num_images=0, square=False, dtype="fp32",
                       exit_share=-1.0, weights="given"):
  """Evaluation seconds per image and compile seconds of each bucket dispatch; a list of
  JSON-able dicts, one per dispatch.

  The config's evaluation (split, protocol, config.eval.batch_size or `batch`) of its first
  `num_images` images (0: all), resized to config.data.image_size with `square`, the same
  weights for every dispatch (`prepare`: random ViT and heads with the config's policy, exits
  calibrated to `exit_share`, unless `variables`). 'device' runs the model's own ladder
  (config.model.buckets), the host dispatches `bucket_ratio`'s. Each dispatch gets a fresh
  Evaluator, nothing compiled yet (run without a persistent compilation cache, or the compile
  seconds are its reads), and evaluates twice: compile_s = first pass - second pass (the
  second compiles nothing; reading and resizing the images cancel), s_per_image = second pass
  / images. miou_delta: against the first dispatch's mIoU. With `square`, also the useful and
  executed GFLOPs of the capacities each dispatch runs at this batch size (tokens.token_stats:
  the host dispatches' batches sorted by token count as the evaluator's pools are), from one
  more, untimed pass.
  """
  calib = tokens.load_images(config, "", 8) if exit_share > 0 else None
  config, model, variables, prepared = prepare(config, dtype, variables, calib, exit_share)
  weights = weights if prepared == "given" else prepared
  split = config.data.get("split", "") or config.data.eval_split
  source = _Subset(get_source(config.data, split, config.num_classes, config.ignore_index),
                   num_images, tuple(config.data.image_size) if square else None)
  mesh = sharding.make_mesh(config)
  params = jax.device_put(variables, sharding.replicated(mesh))
  rows = []
  for d in dispatches:
    cfg = config.copy_and_resolve_references()
    cfg.eval.update(dispatch=d, bucket_ratio=0.0 if d == "device" else bucket_ratio)
    if batch:
      cfg.eval.batch_size = batch
    ev = evaluator.Evaluator(cfg, model, mesh, split=split, source=source)
    t = time.perf_counter()
    ev(params)
    first = time.perf_counter() - t
    t = time.perf_counter()
    out = ev(params)
    second = time.perf_counter() - t
    gflops = {}
    if square and (model.shares_tokens or model.exit_layers):
      st = tokens.token_stats(config, ev.model, variables, source.images(), batch=ev.batch_size,
                              group=d != "device", forward=ev.host)
      gflops = {k: st[k] for k in ("gflops_useful", "gflops_executed", "executed_over_useful",
                                   "mean_tokens_per_stage", "mean_capacity_per_stage")}
    rows.append(dict(
        dispatch=d, bucket_ratio=cfg.eval.bucket_ratio, batch=ev.batch_size,
        images=len(source), image_size=list(config.data.image_size) if square else "native",
        mode=out["mode"], s_per_image=second / len(source), compile_s=max(first - second, 0.0),
        first_pass_s=first, second_pass_s=second, compiled_shapes=out["compiled_shapes"],
        model_programs=out.get("model_programs"), model_compile_s=out.get("model_compile_s"),
        miou=out["miou"], miou_delta=out["miou"] - (rows[0]["miou"] if rows else out["miou"]),
        method=config.get("method", "segvit"), variant=config.model.variant, dtype=dtype,
        weights=weights, device=f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        compilation_cache=jax.config.jax_compilation_cache_dir or None, **gflops))
  return rows
