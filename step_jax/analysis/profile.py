"""Per-layer profile (paper figures 9-10): wall time and GFLOPs of every piece of the forward.

  python -m step_jax.cli.profile --config=configs/step.py:method=step,variant=B/16,res=1024,exits=8 \
      --out=DIR [--images=DIR] [--workdir=DIR] [--batch=1] [--reps=5]

Pieces: policy net + merge, (super)token embedding, every ViT block, every exit head (ATM head
plus the halting rule), the final head, the upsampling of mask logits to pixels; and the whole
jitted forward, so that "other" (full − Σ pieces: bucket switches, compaction, canvas, fusion
lost by splitting) is visible too.

Each piece is jitted on its own and fed what the model really feeds it: the model first runs on
every image to record its token count and capacity bucket per stage (after merging, after each
exit); a piece is compiled once per bucket it meets, warmed up, and timed `--reps` times with
`block_until_ready` (median), round-robin over all programs so that a shared machine's load
changes hit every piece alike; an image is charged the time of its own bucket. GFLOPs come
from step_jax.models.flops (useful: valid tokens; executed: bucket capacity), so the pieces sum to
`flops.token_macs`; XLA's own count of each compiled piece (÷2, elementwise ops included) is
given beside it as a cross-check.

Weights: `--workdir` (a training run) or random ones, with exit thresholds
calibrated to halt `--exit_share` of the active tokens per exit (as analysis.benchmark does).
Writes <out>/profile.{md,csv,json,png}, and on the CPU <out>/ops.{md,json}: the full forward op
by op (step_jax.analysis.ops).
"""
import csv
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from step_jax.analysis import benchmark
from step_jax.analysis import ops
from step_jax.evaluation import tokens as tokens_lib
from step_jax.models import algm
from step_jax.models import algm_encoder
from step_jax.models import early_exit
from step_jax.models import flops
from step_jax.models import segmenter
from step_jax.models import supertokens
from step_jax.models import variables as variables_lib
from step_jax.models import vit as vit_lib


def load(config, images, workdir=None, exit_share=0.4, dtype="fp32"):
  """(config, model, variables, weights) as `benchmark.prepare`: a trained workdir's weights,
  or random ones with exit thresholds calibrated to halt `exit_share` per exit."""
  variables = None
  if workdir:
    variables = variables_lib.load(config, workdir)
  config, model, variables, weights = benchmark.prepare(
      config, dtype, variables, images, exit_share if variables is None else -1.0)
  return config, model, variables, (f"trained ({workdir})" if workdir else weights)


def stage_plan(model, variables, images):
  """Per image, as the model runs it: dict(tokens, active [per stage], caps [per stage],
  info) where caps are the capacity buckets (padding included) and active the valid tokens."""
  single = jax.jit(lambda v, x: model.apply(v, x)[1])
  p = model.backbone.patch_size
  plans = []
  for im in np.asarray(images):
    info = jax.device_get(single(variables, im[None]))
    n_full = (im.shape[0] // p) * (im.shape[1] // p)
    tokens = int(np.asarray(info.get("num_tokens", [n_full]))[0])
    cap0 = int(info.get("capacity", n_full))
    if model.exit_layers:
      active = [int(a) for a in info["active_tokens"][0]]
      caps = [cap0] + [int(c) for c in info["stage_capacity"][1:]]
    else:
      active, caps = [tokens], [cap0]
    plan = dict(tokens=tokens, active=active, caps=caps, info=info)
    if model.merges_in_encoder:   # ALGM: the tokens after each merge and their capacities;
      # slots: the tokens entering the encoder (algm: the grid) in their capacity, which the
      # head reads; with exits (algm_dtop) stage s's active merged tokens in stage s's capacity.
      plan.update(merged=[int(t) for t in info["algm_tokens"][0]],
                  merged_caps=[int(c) for c in info["algm_capacity"]],
                  slots=n_full if model.merge == "algm" else cap0)
      if model.exit_layers:
        plan["caps"] = [int(c) for c in info["stage_capacity"]]
    plans.append(plan)
  return plans


def _mask(cap, n_valid, batch):
  return jnp.broadcast_to(jnp.arange(cap) < n_valid, (batch, cap))


def pieces(config, model, plan, image, batch):
  """One dict per piece of one image's plan: name, layer, fn(module, *args) (run as
  `model.apply(variables, *args, method=fn)`), args, tokens (valid), cap (bucket; 0 = none),
  useful and executed MACs."""
  m = config.model
  v = vit_lib.decode_variant(m.variant)
  p, d = v["patch_size"], v["width"]
  h, w = image.shape[:2]
  c = int(config.num_classes)
  x = jnp.asarray(np.broadcast_to(image, (batch,) + image.shape), jnp.float32)
  out = []
  add = lambda name, layer, fn, args, tokens, cap, useful, executed: out.append(dict(
      name=name, layer=layer, fn=fn, args=args, tokens=tokens, cap=cap, useful=useful,
      executed=executed))
  # The embedding runs on the capacity entering the encoder (ALGM with exits: caps are the
  # stages after the merges; slots the grid or supertoken capacity).
  tokens, cap0 = plan["tokens"], plan.get("slots", plan["caps"][0])
  # Plain SegViT runs without a key mask; every other model masks padding/halted tokens.
  masked = model.merge != "none" or bool(model.exit_layers)
  if model.merge in segmenter.POLICY_MERGES:
    pm = flops.policy_macs(h, w, m.policy.get("hidden", 128), p)
    add("policy+merge", "", lambda mod, x: mod.merge_levels(x), (x,), None, 0, pm, pm)
  if not model.shares_tokens:   # every patch (also ALGM's input)
    embed = lambda mod, x: mod.backbone.embed(mod.normalize(x))
    add("embed", "", embed, (x,), tokens, 0, flops.patch_embed_macs(tokens, d, p),
        flops.patch_embed_macs(cap0, d, p))
  else:
    level = jnp.asarray(np.broadcast_to(plan["info"]["level"][0], (batch, h // p, w // p)))

    def embed(mod, x, level, cap=cap0):  # as Segmenter.run_supertokens, up to the tokens
      layout = supertokens.token_layout(level)
      return mod.embed_supertokens(mod.normalize(x), layout, (h // p, w // p), cap)[0]
    add("embed", "", embed, (x, level), tokens, cap0, flops.patch_embed_macs(tokens, d, p),
        flops.patch_embed_macs(cap0, d, p))
  n_cls = 2 if model.exit_layers and model.exit_head == "dtop" else c + 1
  if model.merges_in_encoder:
    _merged_blocks(config, model, plan, (h // p, w // p), batch, add)
  else:
    _blocks(config, model, plan, batch, add, masked, n_cls)
  # Mask logits on the patch grid → pixel class scores (the count is fvcore's 4 per output).
  logits = jnp.zeros((batch, c, n_cls))
  masks = jnp.zeros((batch, c, h // p, w // p))
  up = flops.BILINEAR_MACS_PER_OUTPUT * c * h * w
  add("upsample", "", lambda mod, lg, mk: segmenter.predict_scores(
      dict(pred_logits=lg, pred_masks=mk), (h, w)), (logits, masks), None, 0, up, up)
  return out


def _blocks(config, model, plan, batch, add, masked, n_cls):
  """pieces' blocks, exits and heads of a model without merges inside the encoder."""
  m = config.model
  v = vit_lib.decode_variant(m.variant)
  d, depth, mlp = v["width"], v["depth"], v["mlp_dim"]
  c, layers = int(config.num_classes), m.get("head_layers", segmenter.HEAD_LAYERS)
  tokens, cap0 = plan["tokens"], plan["caps"][0]
  bounds = (0,) + tuple(model.exit_layers) + (depth,)
  head_macs = lambda n: flops.atm_head_macs([n], c, m.head_dim, d, layers, n_cls)
  taus = model.exit_thresholds()
  atm_exits = bool(model.exit_layers) and model.exit_head == "atm_shallow_first"
  for s, (n, cap) in enumerate(zip(plan["active"], plan["caps"])):
    xs = jnp.ones((batch, cap, d), model.backbone.dtype)
    args = (xs, _mask(cap, n, batch) if masked else None)
    for k in range(bounds[s], bounds[s + 1]):
      fn = lambda mod, x, mk, k=k: mod.backbone.run_blocks(x, mk, k, k + 1)[-1]
      add(f"block {k + 1}", str(k + 1), fn, args, n, cap, flops.vit_block_macs(n, d, mlp),
          flops.vit_block_macs(cap, d, mlp))
      if atm_exits and k + 1 in model.out_layers:  # SegViT's stage at this block (+ halting)
        i = list(model.out_layers).index(k + 1)
        tau = taus[s] if k + 1 in model.exit_layers else None

        def stage_fn(mod, x, mk, i=i, tau=tau):
          _, cls, masks = mod.head_stage(i, mod.head.initial_queries(x.shape[0]), x, mk, False)
          return (cls, masks) if tau is None else early_exit.halting(
              cls, masks, mk, tau, mod.keep_top_k)
        add(f"head stage {i + 1}" + (" (exit)" if tau is not None else ""), str(k + 1),
            stage_fn, args, n, cap, head_macs(n), head_macs(cap))
    if atm_exits:
      continue   # its stages were profiled with their blocks
    if s < len(model.exit_layers):
      _exit(model, add, s, args, n, cap, head_macs)
    elif model.exit_layers and model.exit_head != "segvit":
      final = lambda mod, x, mk, s=s: mod.head_stage(s, None, x, mk, False)
      add("final head", str(depth), final, args, n, cap, head_macs(n), head_macs(cap))
    else:  # SegViT's head; with 'segvit' exits on every token (halted ones' kept features)
      nst = len(model.out_layers)
      hm = lambda n: flops.atm_head_macs([n] * nst, c, m.head_dim, d, layers, c + 1)
      if model.exit_layers:
        n, cap = tokens, cap0
        args = (jnp.ones((batch, cap, d), model.backbone.dtype), _mask(cap, n, batch))
      add("final head", ",".join(map(str, model.out_layers)),
          lambda mod, x, mk: mod.head([x] * nst, mk), args, n, cap, hm(n), hm(cap))


def _exit(model, add, s, args, n, cap, head_macs):
  """Exit s's piece: its head (DToP's head s, or SegViT's stage 0) and the halting rule."""
  def exit_fn(mod, x, mk, s=s, tau=model.exit_thresholds()[s]):
    _, cls, masks = mod.head_stage(s, None, x, mk, False)
    return early_exit.halting(cls, masks, mk, tau, mod.keep_top_k)
  name = f"exit {s + 1}" + (" (head stage 1)" if model.exit_head == "segvit" else "")
  add(name, str(model.exit_layers[s]), exit_fn, args, n, cap, head_macs(n), head_macs(cap))


def _merged_blocks(config, model, plan, grid, batch, add):
  """pieces' blocks and head with ALGM's merges inside the encoder (merge 'algm': local then
  global; 'dcts_algm': global over the supertokens). A merge's block is two pieces around
  the merge piece (its plan and the size-weighted means into the next capacity): the
  attention on the tokens before it, the MLP on the merged tokens (models/algm_encoder.py).
  The head reads the tokens unmerged (algm: the full grid, unmasked; dcts_algm: the
  supertoken slots); the unmerging gathers are left to 'other'."""
  m = config.model
  v = vit_lib.decode_variant(m.variant)
  d, depth, mlp = v["width"], v["depth"], v["mlp_dim"]
  c, layers = int(config.num_classes), m.get("head_layers", segmenter.HEAD_LAYERS)
  local = model.merge == "algm"
  merges = zip(segmenter.encoder_merge_layers(model.merge, model.algm_layers), plan["merged"],
               plan["merged_caps"])
  n, cap, masked = plan["tokens"], plan["slots"], not local   # the grid: no key mask
  inputs = lambda n, cap: (jnp.ones((batch, cap, d), model.backbone.dtype),
                           _mask(cap, n, batch) if masked else None)
  block = lambda mod, x, mk, k: mod.backbone.run_blocks(x, mk, k, k + 1)[-1]
  first = 0
  for layer, n_next, cap_next in merges:
    for k in range(first, layer - 1):
      add(f"block {k + 1}", str(k + 1), functools.partial(block, k=k), inputs(n, cap), n, cap,
          flops.vit_block_macs(n, d, mlp), flops.vit_block_macs(cap, d, mlp))
    add(f"block {layer} attention", str(layer),
        lambda mod, x, mk, i=layer - 1: mod.backbone.attend(i, x, mk), inputs(n, cap), n, cap,
        flops.attention_half_macs(n, d), flops.attention_half_macs(cap, d))
    kind = "local" if local and layer == model.algm_layers[0] else "global"

    def merge(mod, x, mk, layer=layer, kind=kind, cap_next=cap_next):
      size = jnp.ones(x.shape[:2]) if mk is None else mk.astype(jnp.float32)
      if kind == "local":
        p = algm.local_merge_plan(x, grid, mod.algm_threshold, batch_min=mod.algm_batch_min)
      else:
        p = algm_encoder.global_plan(mod, x, size > 0, layer)
      return algm.merge(x, size, p, cap_next)
    match = (lambda n: 0.0) if kind == "local" else (lambda n: flops.global_match_macs(n, d))
    add(f"{kind} merge", str(layer), merge, inputs(n, cap), n, cap, match(n), match(cap))
    n, cap, masked = n_next, cap_next, True
    add(f"block {layer} MLP", str(layer),
        lambda mod, x, mk, i=layer - 1: mod.backbone.feed_forward(i, x), inputs(n, cap), n, cap,
        flops.mlp_half_macs(n, d, mlp), flops.mlp_half_macs(cap, d, mlp))
    first = layer
  # After the last merge: to the end, or (algm_dtop) the exits on the merged tokens, each
  # later stage on the tokens still active, in its exit capacity.
  exits = tuple(model.exit_layers)
  stages = [(n, cap)] + list(zip(plan["active"][1:], plan["caps"][1:]))[:len(exits)]
  bounds = (first,) + exits + (depth,)
  exit_macs = lambda n: flops.atm_head_macs([n], c, m.head_dim, d, layers, c + 1)
  for s, (n, cap) in enumerate(stages):
    for k in range(bounds[s], bounds[s + 1]):
      add(f"block {k + 1}", str(k + 1), functools.partial(block, k=k), inputs(n, cap), n, cap,
          flops.vit_block_macs(n, d, mlp), flops.vit_block_macs(cap, d, mlp))
    if s < len(exits):
      _exit(model, add, s, inputs(n, cap), n, cap, exit_macs)
  n, cap, masked = plan["tokens"], plan["slots"], not local
  nst = len(model.out_layers)
  hm = lambda n: flops.atm_head_macs([n] * nst, c, m.head_dim, d, layers, c + 1)
  add("final head", ",".join(map(str, model.out_layers)),
      lambda mod, x, mk: mod.head([x] * nst, mk), inputs(n, cap), n, cap, hm(n), hm(cap))


def time_programs(programs, reps, warmup):
  """{key: median seconds} of {key: (compiled, args)}, timed round-robin (one call of each
  program per round) so that load changes on a shared machine hit every piece alike."""
  for compiled, args in programs.values():
    for _ in range(warmup):
      jax.block_until_ready(compiled(*args))
  times = {k: [] for k in programs}
  for _ in range(reps):
    for k, (compiled, args) in programs.items():
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def _xla_flops(compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def dispatch_ms(reps=20):
  """Time of a trivial jitted call: the fixed cost every separately timed piece pays (and
  the fused full forward pays once), so small pieces are read against it."""
  f = jax.jit(lambda x: x + 1).lower(jnp.zeros(8)).compile()
  return 1000 * time_programs({0: (f, (jnp.zeros(8),))}, reps, 2)[0]


def full_forward(model, variables, images, batch=1):
  """The whole forward as step_jax.analysis.benchmark times it, compiled for `batch` images
  of `images`' size."""
  def fwd(v, x):
    out, _ = model.apply(v, x)
    return segmenter.predict_scores(out, x.shape[1:3])
  return jax.jit(fwd).lower(variables, np.asarray(images)[:1].repeat(batch, 0)).compile()


def profile(config, model, variables, images, *, batch=1, reps=5, warmup=2, plans=None,
            full=None):
  """Rows (one per piece, then 'full forward' and 'other'), averaged over `images`:
  name, layer, tokens, capacity, gflops (useful), gflops_executed, xla_gflops, ms.
  `plans`: stage_plan's result, `full`: full_forward's, when already computed."""
  plans = plans or stage_plan(model, variables, images)
  images = np.asarray(images)
  full = full if full is not None else full_forward(model, variables, images, batch)
  programs, xla, per_image = {}, {}, []   # one program per (piece, bucket) met
  for i, (plan, im) in enumerate(zip(plans, images)):
    rows = pieces(config, model, plan, im, batch)
    for r in rows:
      key = (r["name"], r["cap"])
      if key not in programs:
        f = jax.jit(lambda v, *a, fn=r["fn"]: model.apply(v, *a, method=fn))
        compiled = f.lower(variables, *r["args"]).compile()
        programs[key] = (compiled, (variables,) + r["args"])
        xla[key] = _xla_flops(compiled) / 2
      r["key"] = key
    programs["full", i] = (full, (variables, np.broadcast_to(im, (batch,) + im.shape)))
    per_image.append(rows)
  secs = time_programs(programs, reps, warmup)

  mean = lambda vals: None if vals[0] is None else float(np.mean(vals))
  table = []
  for i, r in enumerate(per_image[0]):
    col = [rows[i] for rows in per_image]
    table.append(dict(
        name=r["name"], layer=r["layer"], tokens=mean([c["tokens"] for c in col]),
        capacity=mean([c["cap"] for c in col]) if r["cap"] else None,
        gflops=mean([c["useful"] for c in col]) / 1e9,
        gflops_executed=mean([c["executed"] for c in col]) / 1e9,
        xla_gflops=mean([xla[c["key"]] for c in col]) / 1e9,
        ms=mean([1000 * secs[c["key"]] / batch for c in col])))
  total = {k: sum(r[k] for r in table) for k in ("gflops", "gflops_executed", "ms")}
  full_ms = mean([1000 * secs["full", i] / batch for i in range(len(images))])
  table.append(dict(name="full forward", layer="", tokens=None, capacity=None,
                    gflops=total["gflops"], gflops_executed=total["gflops_executed"],
                    xla_gflops=None, ms=full_ms))   # (XLA counts every switch branch)
  table.append(dict(name="other (full − Σ pieces)", layer="", tokens=None, capacity=None,
                    gflops=0.0, gflops_executed=0.0, xla_gflops=None, ms=full_ms - total["ms"]))
  return table


def fmt_cell(v, spec):
  """A Markdown table cell: '–' for missing (None/NaN) values."""
  if v is None or (isinstance(v, float) and np.isnan(v)):
    return "–"
  return format(v, spec)


def write(table, out, header):
  """profile.md / .csv / .json and the bar plot profile.png under `out`."""
  os.makedirs(out, exist_ok=True)
  keys = ("name", "layer", "tokens", "capacity", "gflops", "gflops_executed", "xla_gflops", "ms")
  with open(os.path.join(out, "profile.csv"), "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(keys)
    wr.writerows([[r[k] for k in keys] for r in table])
  with open(os.path.join(out, "profile.json"), "w") as f:
    json.dump(dict(header, rows=table), f, indent=1)
  full = table[-2]["ms"]
  overhead = (f" (each pays a call overhead of about {header['dispatch_ms']:.3f} ms, the full "
              "forward pays it once)" if header.get("dispatch_ms") else "")
  lines = [f"Per-layer profile: `{header['config']}` on {header['device']}, {header['weights']} "
           f"weights, {header['images']} images, batch {header['batch']}, median of "
           f"{header['reps']} timed calls per piece{overhead}.", "",
           "| piece | layer | tokens | capacity | GFLOPs | GFLOPs executed | XLA GFLOPs "
           "| ms | % of full |", "|---|---|---|---|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['name']} | {r['layer']} | {fmt_cell(r['tokens'], '.1f')} | "
                 f"{fmt_cell(r['capacity'], '.0f')} | {r['gflops']:.4f} | "
                 f"{r['gflops_executed']:.4f} | {fmt_cell(r['xla_gflops'], '.4f')} | "
                 f"{r['ms']:.3f} | {100 * r['ms'] / full:.1f} |")
  with open(os.path.join(out, "profile.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(table[:-2], os.path.join(out, "profile.png"), header["config"])
  return "\n".join(lines)


def pyplot_or_none(path):
  """matplotlib.pyplot (headless), or None with a message that `path` is not written."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print(f"matplotlib is not installed: {path} not written (pip install -r requirements-dev.txt)")
    return None
  return plt


def plot(rows, path, title):
  """Two bar panels per piece, as figures 9-10: GFLOPs (useful, executed) and milliseconds."""
  plt = pyplot_or_none(path)
  if plt is None:
    return
  names = [r["name"] for r in rows]
  x = np.arange(len(rows))
  fig, (a, b) = plt.subplots(2, 1, figsize=(max(6, 0.45 * len(rows)), 6), sharex=True)
  a.bar(x - 0.2, [r["gflops"] for r in rows], 0.4, label="useful")
  a.bar(x + 0.2, [r["gflops_executed"] for r in rows], 0.4, label="executed")
  a.set_ylabel("GFLOPs")
  a.legend()
  a.set_title(title, fontsize=8)
  colours = ["tab:red" if n.startswith("exit") else "tab:green" for n in names]
  b.bar(x, [r["ms"] for r in rows], color=colours)
  b.set_ylabel("ms / image")
  b.set_xticks(x, names, rotation=90, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_profile(config, out, workdir=None, *, images="", num_images=4, exit_share=0.4,
                dtype="fp32", batch=1, reps=5, warmup=2, config_name=""):
  """Profiles `config` (trained weights of `workdir`, or random ones), writes
  <out>/profile.{md,csv,json,png} and (CPU) <out>/ops.{md,json}; returns the markdown tables."""
  ims = tokens_lib.load_images(config, images, num_images)
  config, model, variables, weights = load(config, ims, workdir, exit_share, dtype)
  full = full_forward(model, variables, ims, batch)
  table = profile(config, model, variables, ims, batch=batch, reps=reps, warmup=warmup,
                  full=full)
  dev = jax.devices()[0]
  header = dict(config=config_name,
                device=f"{dev.platform}:{getattr(dev, 'device_kind', '')} "
                       f"({platform.processor() or platform.machine()})",
                weights=weights, images=len(ims), batch=batch, reps=reps,
                dispatch_ms=dispatch_ms(), dtype=dtype,
                exit_threshold=np.atleast_1d(model.exit_threshold).tolist()
                if model.exit_layers else None)
  text = write(table, out, header)
  if jax.default_backend() != "cpu":   # a GPU trace names kernels, not ops: use xprof there
    return text + "\n\nops.md: written on the CPU backend only."
  # Op by op (the first image's full forward): which XLA op the time goes to.
  rows, wall = ops.op_times(full, (variables, np.asarray(ims)[:1].repeat(batch, 0)),
                            reps=reps, warmup=warmup)
  op_text = ops.markdown(rows, wall, f"Ops of the full forward of image 1, `{config_name}`")
  with open(os.path.join(out, "ops.md"), "w") as f:
    f.write(op_text + "\n")
  with open(os.path.join(out, "ops.json"), "w") as f:
    json.dump(dict(header, wall_ms=wall, rows=rows), f, indent=1)
  return text + "\n\n" + op_text
