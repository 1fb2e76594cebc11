"""The structure of the paper's tables for any config: dCTS threshold sweep (table 1), exit
placement sweep (figures 5-6) and the method comparison (tables 3-6).

  python experiments/sweep.py \
      --config=configs/step.py:method=step,variant=B/16,dataset=ade20k,res=512 \
      --out=experiments/results/sweep_b16 [--sweeps=tau,exits,methods] [--workdir=DIR ...] \
      [--taus=6999,6899,4999] [--placements=6-8,8] [--images=DIR] [--num_images=8]

Every row is one config derived from `--config` (method, τ, exit layers changed) and measured
with `benchmark.prepare` + `benchmark.measure`: tokens per stage, useful and executed GFLOPs,
ms/image and FPS on this device, and the share of tokens halted before the final stage.

Quality: mIoU (`evaluate.evaluate` on the eval split, `--eval_images` of it) for rows whose
model has exactly the parameter shapes of one of the trained `--workdir`s (pass several: each
row takes the first that fits, preferring a run trained with the row's own method; the table
names it); otherwise "–". mIoU uses the eval settings of `--config` (CamVid cpu: whole
images at 180x240) whatever `--config.data.image_size` the timing uses. Every row also gets the
*agreement*: the share of pixels whose predicted class equals that of the same weights run
without token sharing and without halting (a quality proxy, meaningful without labels; with
random weights it measures only how much the pruning perturbs the output). Random weights:
exit thresholds are calibrated to halt `--exit_share` of the active tokens per exit.

Writes <out>/sweep_<name>.{md,csv}, <out>/pareto_<name>.png (quality vs GFLOPs, FPS vs
GFLOPs, Pareto front joined) and <out>/sweep.jsonl (every row, all fields).
"""
import csv
import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import step as step_config  # noqa: E402
from configs.step import parse_tau  # noqa: E402  (tests call sweep.parse_tau)
from step_jax.analysis import benchmark  # noqa: E402
from step_jax.analysis import profile as profile_lib  # noqa: E402
from step_jax.models import builder
from step_jax.models import segmenter  # noqa: E402
from step_jax.models import vit as vit_lib  # noqa: E402
from step_jax.evaluation import tokens
from step_jax.models import variables as variables_lib
from step_jax.runtime import checkpoint as ckpt_lib

PAPER_TAUS = ("6999", "6899", "4999", "4899", "4799", "4699", "4599", "4499")  # table 1
EXITS = tuple(k for k, (_, exits, _) in step_config.METHODS.items() if exits)


def tau_name(tau):
  return ("".join(str(round(10 * t)) for t in tau) if all(abs(10 * t - round(10 * t)) < 1e-9
                                                         and t < 1 for t in tau)
          else "-".join(f"{t:g}" for t in tau))


def with_method(config, method, tau=None, exits=None):
  """A copy of `config` running `method` (segvit, cts, dtop, cts_dtop, dcts, step) with dCTS
  thresholds `tau` and exit layers `exits` (None: keep the config's)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.method = method
    c.model.merge = step_config.METHODS[method][0]
    if method in EXITS:
      c.model.exit_layers = tuple(exits if exits is not None else c.model.get("exit_layers", ()))
      if not c.model.exit_layers:
        raise ValueError(f"method={method} needs exit layers: pass --placements/--exits")
    else:
      c.model.exit_layers = ()
    if tau is not None:
      c.model.thresholds = tuple(tau)
    if c.model.merge == "cts":  # K=103 is CTS's at 512² (40 % of the 2x2 windows); scale
      p = vit_lib.decode_variant(c.model.variant)["patch_size"]  # it down on small grids
      windows = (c.data.image_size[0] // (2 * p)) * (c.data.image_size[1] // (2 * p))
      if c.model.get("cts_shared", 103) > windows:
        c.model.cts_shared = max(1, round(windows * 103 / 256))
  return c


def label(config):
  m = config.model
  name = step_config.METHODS[config.method][2]
  if m.exit_layers:
    name += "@[" + ",".join(map(str, m.exit_layers)) + "]"
  if m.merge == "dcts":
    name += f" τ-{tau_name(m.thresholds)}"
  if m.merge == "cts":
    k = m.cts_shared
    name += f" K={k:.0%}" if 0 < k < 1 else f" K={k:g}"   # a share of the 2x2 windows, or K
  return name


def shapes(tree):
  return jax.tree.map(np.shape, {k: tree[k] for k in ("params", "batch_stats") if k in tree})


def load_trained(workdirs):
  """[(workdir, variables, method)] of trained training runs (their own config.json)."""
  out = []
  for w in workdirs:
    config = ckpt_lib.read_config(w)
    out.append((w, variables_lib.load(config, w), config.get("method", "")))
  return out


def pick_trained(config, trained):
  """(workdir, variables) of the run whose parameter shapes are those of config's model:
  the first trained with config's method, else the first that fits (CTS and dCTS runs, or
  CTS&DToP and STEP runs, have the same shapes: a row prefers its own method's weights)."""
  hw = tuple(config.data.image_size)
  model = builder.build(config.model, config.num_classes, hw, config.ignore_index)
  want = shapes(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *hw, 3))))
  fits = [t for t in trained if shapes(t[1]) == want]
  fits.sort(key=lambda t: t[2] != config.get("method", ""))  # stable: own method first
  return fits[0][:2] if fits else (None, None)


def reference(model):
  """The same model without token sharing and with nothing halting (confidence ≤ 1)."""
  return model.clone(merge="none", exit_threshold=1.0) if model.exit_layers else \
      model.clone(merge="none")


def predictions(model, variables, images):
  """Predicted classes [N, H, W], one image per call (each picks its own buckets)."""
  fwd = jax.jit(lambda v, x: jnp.argmax(segmenter.predict_scores(model.apply(v, x)[0],
                                                                 x.shape[1:3]), -1))
  return np.concatenate([np.asarray(fwd(variables, im[None])) for im in np.asarray(images)])


def agreement(model, variables, images, ref_pred=None):
  """Share of pixels predicted as by `reference(model)` with the same weights."""
  if ref_pred is None:
    ref_pred = predictions(reference(model), variables, images)
  return float(np.mean(predictions(model, variables, images) == ref_pred))


class _Subset:
  """The first n examples of a data source (evaluate.evaluate takes any source)."""

  def __init__(self, source, n):
    self.source, self.n = source, min(n, len(source)) if n > 0 else len(source)
    self.class_names = getattr(source, "class_names", None)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return self.source[i]


def measure_row(config, images, *, trained=(), exit_share=0.4, reps=3, warmup=1, batch=1,
                eval_images=0, quality=True):
  """One table row: benchmark.measure's dict plus label, halted share, FPS, agreement and
  (for a trained fit) mIoU."""
  workdir, variables = pick_trained(config, trained)
  cfg, model, variables, weights = benchmark.prepare(
      config, "fp32", variables, images, exit_share if variables is None else -1.0)
  if model.exit_layers:  # measure the calibrated thresholds, not the config's
    with cfg.ignore_type():
      cfg.model.exit_threshold = tuple(float(t) for t in np.broadcast_to(
          model.exit_threshold, (len(model.exit_layers),)))   # a scalar: one per exit
  r = benchmark.measure(cfg, variables, images, batch=batch, reps=reps, warmup=warmup,
                        weights=f"trained ({workdir})" if workdir else weights)
  stage = r["mean_tokens_per_stage"]
  r.update(label=label(cfg), tau=tau_name(cfg.model.thresholds) if model.merge == "dcts" else "",
           exits="-".join(map(str, model.exit_layers)), fps=1000 / r["ms_per_image_median"],
           tokens=stage[0], halted_share=1 - stage[-1] / stage[0], miou=None, agreement=None)
  if quality and (model.merge != "none" or model.exit_layers):
    r["agreement"] = agreement(model, variables, images)
  elif quality:
    r["agreement"] = 1.0
  if workdir:
    from step_jax.evaluation import evaluator as evaluate
    from step_jax.data import get_source  # pylint: disable=g-import-not-at-top
    split = cfg.data.get("split", "") or cfg.data.eval_split
    source = _Subset(get_source(cfg.data, split, cfg.num_classes, cfg.ignore_index),
                     eval_images)
    r["miou"] = evaluate.evaluate(cfg, variables, model=model, split=split,
                                  source=source)["miou"]
  return r


def placements_for(depth):
  """Default exit placements: single heads across the depth and a few two-head splits."""
  singles = [(k,) for k in range(max(1, depth // 4), depth, max(1, depth // 12))]
  pairs = [(depth // 3, 2 * depth // 3), (depth // 4, depth // 2), (depth // 2, 3 * depth // 4),
           (depth // 2, 2 * depth // 3)]
  out = []
  for p in singles + pairs:
    if p not in out and all(0 < e < depth for e in p) and list(p) == sorted(set(p)):
      out.append(p)
  return out


def sweep_configs(config, name, taus, placements, dtop_exits, step_exits, method_taus):
  """[configs] of one sweep: 'tau' (CTS, then dCTS per τ in `taus`; with the config's exits
  when it has some: CTS&DToP and STEP), 'exits' (no exit, then
  each placement) or 'methods' (SegViT … +dCTS τ[0], +STEP@e τ for e in `step_exits`, τ in
  `method_taus`, as tables 3-6)."""
  dcts_like = config.model.get("merge", "none") in ("dcts", "cts")
  if name == "tau":  # a config with exits keeps them (a trained STEP run fits its rows)
    exits = config.get("method", "") in EXITS and bool(config.model.get("exit_layers", ()))
    cts, dcts = ("cts_dtop", "step") if exits else ("cts", "dcts")
    return [with_method(config, cts)] + [with_method(config, dcts, tau) for tau in taus]
  if name == "exits":
    base, method = ("dcts", "step") if dcts_like else ("segvit", "dtop")
    return [with_method(config, base)] + [with_method(config, method, exits=p)
                                          for p in placements]
  if name == "methods":
    rows = [with_method(config, "segvit"), with_method(config, "cts"),
            with_method(config, "dtop", exits=dtop_exits),
            with_method(config, "cts_dtop", exits=dtop_exits)]
    rows += [with_method(config, "dcts", method_taus[0])]
    rows += [with_method(config, "step", tau, exits=e) for e in step_exits for tau in method_taus]
    return rows
  raise ValueError(f"unknown sweep {name!r}: use tau, exits or methods")


def pareto_front(cost, quality):
  """Indices of the points no other point beats (cost ≤, quality ≥, one strictly); of
  points with equal cost and quality only the first is kept."""
  cost, quality = np.asarray(cost, float), np.asarray(quality, float)
  earlier = np.arange(len(cost))
  return [i for i in range(len(cost))
          if not np.any((cost <= cost[i]) & (quality >= quality[i])
                        & ((cost < cost[i]) | (quality > quality[i]) | (earlier < i)))]


COLUMNS = ("label", "method", "tau", "exits", "tokens", "halted_share", "gflops_useful",
           "gflops_executed", "gflops_policy", "ms_per_image_median", "fps", "miou", "agreement", "weights")


def write(rows, out, name, header):
  """sweep_<name>.md/.csv and pareto_<name>.png; returns the Markdown."""
  cell = profile_lib.fmt_cell
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"sweep_{name}.csv"), "w", newline="") as f:
    wr = csv.writer(f)
    wr.writerow(COLUMNS)
    wr.writerows([[r.get(k) for k in COLUMNS] for r in rows])
  lines = [f"Sweep `{name}` of `{header['config']}` on {rows[0]['device']}, "
           f"{header['images']} images (batch {rows[0]['batch']}, {rows[0]['dtype']}); "
           "mIoU only where a trained workdir fits the row; agreement = pixels predicted as "
           "without token sharing or halting (same weights).", ""]
  if name == "tau":  # table 1 layout: one column per threshold set
    heads = ["CTS" if r["method"] in ("cts", "cts_dtop") else f"τ-{r['tau']}" for r in rows]
    lines += ["| metric | " + " | ".join(heads) + " |", "|---|" + "---|" * len(rows)]
    for key, title, spec in (("miou", "mIoU", ".3f"), ("agreement", "agreement", ".3f"),
                             ("tokens", "tokens", ".1f"), ("gflops_useful", "GFLOPs", ".3f"),
                             ("gflops_executed", "GFLOPs executed", ".3f"),
                             ("fps", "FPS", ".1f")):
      lines.append(f"| {title} | " + " | ".join(cell(r.get(key), spec) for r in rows) + " |")
  else:
    # Ratios to the first row (SegViT in `methods`, no exit in `exits`), measured in this run.
    base = rows[0]
    lines += ["| method | exits | mIoU | agreement | GFLOPs | GFLOPs executed | of which policy "
              f"| fewer GFLOPs (vs {base['label']}) | speed-up | FPS | ms/image | tokens | halted "
              "| weights |", "|" + "---|" * 14]
    for r in rows:
      lines.append(f"| {r['label']} | {r['exits'] or '–'} | {cell(r['miou'], '.3f')} | "
                   f"{cell(r['agreement'], '.3f')} | {r['gflops_useful']:.3f} | "
                   f"{r['gflops_executed']:.3f} | {r.get('gflops_policy') or 0:.3f} | "
                   f"{base['gflops_useful'] / r['gflops_useful']:.2f}× | "
                   f"{base['ms_per_image_median'] / r['ms_per_image_median']:.2f}× | "
                   f"{r['fps']:.1f} | {r['ms_per_image_median']:.1f} | {r['tokens']:.1f} | "
                   f"{100 * r['halted_share']:.1f} % | {r['weights']} |")
  with open(os.path.join(out, f"sweep_{name}.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  plot(rows, os.path.join(out, f"pareto_{name}.png"), f"{name}: {header['config']}")
  return "\n".join(lines)


def plot(rows, path, title):
  """Quality vs GFLOPs and FPS vs GFLOPs with each Pareto front joined."""
  plt = profile_lib.pyplot_or_none(path)
  if plt is None:
    return
  use_miou = all(r["miou"] is not None for r in rows)
  qkey = "miou" if use_miou else "agreement"
  g = [r["gflops_useful"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for ax, key, ylabel in ((axes[0], qkey, "mIoU" if use_miou else "agreement (proxy)"),
                          (axes[1], "fps", "FPS (this device)")):
    y = [r[key] if r[key] is not None else np.nan for r in rows]
    ax.scatter(g, y)
    for r, gi, yi in zip(rows, g, y):
      ax.annotate(r["label"], (gi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ok = [i for i in range(len(rows)) if not np.isnan(y[i])]
    front = sorted((ok[i] for i in pareto_front([g[j] for j in ok], [y[j] for j in ok])),
                   key=lambda i: g[i])
    ax.plot([g[i] for i in front], [y[i] for i in front], "r--", lw=1, label="Pareto front")
    ax.set_xlabel("GFLOPs (useful)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_sweeps(config, images, names, *, taus=PAPER_TAUS, method_taus=("6899", "4999"),
               placements=None, dtop_exits=None, step_exits=None, trained=(), out=None,
               header=None, **kw):
  """{sweep name: [row dicts]}; writes the files when `out` is given."""
  depth = vit_lib.decode_variant(config.model.variant)["depth"]
  as_tau = lambda ts: [parse_tau(t) if isinstance(t, str) else tuple(t) for t in ts]
  taus, method_taus = as_tau(taus), as_tau(method_taus)
  placements = placements or placements_for(depth)
  dtop_exits = tuple(dtop_exits or config.model.get("exit_layers", ()) or
                     (depth // 2, 2 * depth // 3))
  step_exits = step_exits or [dtop_exits, (2 * depth // 3,)]
  step_exits = [tuple(e) for i, e in enumerate(step_exits) if tuple(e) not in
                [tuple(x) for x in step_exits[:i]]]
  results = {}
  for name in names:
    rows = []
    for c in sweep_configs(config, name, taus, placements, dtop_exits, step_exits,
                           method_taus):
      r = measure_row(c, images, trained=trained, **kw)
      print(json.dumps({k: r[k] for k in COLUMNS}), flush=True)
      rows.append(r)
    results[name] = rows
    if out:
      print(write(rows, out, name, header))
      with open(os.path.join(out, "sweep.jsonl"), "a") as f:
        for r in rows:
          f.write(json.dumps(dict(r, sweep=name)) + "\n")
  return results


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  images = tokens.load_images(config, f.images, f.num_images)
  split = lambda s: [tuple(int(e) for e in p.split("-")) for p in s.split(",") if p]
  trained = load_trained(f.workdir or [])
  header = dict(config=config_flags.get_config_filename(f["config"]), images=len(images))
  run_sweeps(config, images, f.sweeps.split(","), taus=f.taus.split(","),
             method_taus=f.method_taus.split(","),
             placements=split(f.placements), dtop_exits=(split(f.dtop_exits) or [None])[0],
             step_exits=split(f.step_exits) or None, trained=trained,
             out=f.out, header=header, exit_share=f.exit_share, reps=f.reps, warmup=f.warmup,
             batch=f.batch, eval_images=f.eval_images)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Base config (path:arg).")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.DEFINE_string("sweeps", "tau,exits,methods", "Which sweeps: tau, exits, methods.")
  flags.DEFINE_multi_string("workdir", [], "Trained training runs (repeatable); a row "
                            "uses the first whose parameter shapes fit its model.")
  flags.DEFINE_string("taus", ",".join(PAPER_TAUS), "dCTS thresholds of the tau sweep.")
  flags.DEFINE_string("method_taus", "6899,4999", "Methods table: the first is the +dCTS "
                      "row's τ, all are the +STEP rows' τ.")
  flags.DEFINE_string("placements", "", "Exit placements for the exits sweep, e.g. "
                      "'8,6-8,8-10' (default: spread over the depth).")
  flags.DEFINE_string("dtop_exits", "", "DToP rows' exits, e.g. '6-8' (default: the config's).")
  flags.DEFINE_string("step_exits", "", "STEP rows' exit sets, e.g. '6-8,8' (default: the "
                      "DToP exits and one head at 2/3 of the depth).")
  flags.DEFINE_string("images", "", "Folder of images; default: the config's eval split.")
  flags.DEFINE_integer("num_images", 8, "Images for tokens, GFLOPs, timing and agreement.")
  flags.DEFINE_integer("eval_images", 0, "Eval-split images for mIoU (0: all).")
  flags.DEFINE_float("exit_share", 0.4, "Random exit heads: calibrate thresholds to halt "
                     "this share of active tokens per exit.")
  flags.DEFINE_integer("reps", 3, "Timed calls per row.")
  flags.DEFINE_integer("warmup", 1, "Untimed calls per row.")
  flags.DEFINE_integer("batch", 1, "Images per timed call.")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
