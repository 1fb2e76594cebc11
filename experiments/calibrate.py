"""Budget calibration (beyond the paper): the best STEP configuration within a compute budget.

  python experiments/calibrate.py \
      --config=configs/step.py:method=step,variant=B/16,dataset=cityscapes,res=1024 \
      --budget_gflops=200 --out=experiments/results/calib_b16 [--workdir=DIR] \
      [--tau_values=0.4,0.6,0.8,0.9] [--exit_taus=0.8,0.9,0.95] [--placements=8,6-8]
  ... --budget_ms=150     (latency on this device instead of GFLOPs)

Grid: dCTS thresholds τ (2, 4, 8, 16) from `--tau_values`, non-decreasing with the window size
(a big superpatch must be at least as sure as a small one, as in the paper's τ-6899/4999),
× exit thresholds (one τ for every exit) × exit placements. The thresholds are traced inputs
of one compiled program per placement, so the whole grid costs one compilation per placement.

Quality on the validation images: mIoU against the labels when a trained workdir is given and
the split has labels (`--images` folders have none); otherwise the *agreement*: the share of
pixels predicted as by the same weights without token sharing and without halting. That proxy
is what the report uses without a trained model, and it says so. Random exit heads have no
meaningful confidence, so their thresholds are set per placement by `--exit_shares` instead
(each exit halts that share of its active tokens at the config's τ, as benchmark.prepare).

Cost: useful GFLOPs (fvcore, `--gflops=useful`) or executed GFLOPs (bucket capacities) per
image from flops.token_macs; with `--budget_ms` the latency of the candidates on the
executed-GFLOPs Pareto front (at most `--max_timed`) is measured with benchmark.measure, and
the front and the choice are made on those timings.

Writes <out>/calibrate.json (every grid point, the Pareto front, the choice) and calibrate.md.
"""
import itertools
import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sweep  # noqa: E402  (experiments/sweep.py)
from step_jax.analysis import benchmark  # noqa: E402
from step_jax.models import flops  # noqa: E402
from step_jax.evaluation import metrics  # noqa: E402
from step_jax.models import early_exit  # noqa: E402
from step_jax.models import builder
from step_jax.models import segmenter  # noqa: E402
from step_jax.evaluation import tokens
from step_jax.models import variables as variables_lib


def tau_grid(values):
  """All (τ2, τ4, τ8, τ16) from `values` with τ2 ≤ τ4 ≤ τ8 ≤ τ16."""
  return [t for t in itertools.combinations_with_replacement(sorted(values), 4)]


def search_fn(model):
  """jit (variables, image [1, H, W, 3], τ [4], exit τ [E]) → predicted classes, token counts
  per stage and capacities, and each exit's confidence per cell (for calibration)."""
  e = len(model.exit_layers)

  def f(v, x, tau, exit_tau):
    m = model.clone(thresholds=tuple(tau[i] for i in range(4)),
                    exit_threshold=tuple(exit_tau[i] for i in range(e)) if e else 1.0)
    out, info = m.apply(v, x)
    n = x.shape[1] * x.shape[2] // model.backbone.patch_size ** 2
    res = dict(pred=jnp.argmax(segmenter.predict_scores(out, x.shape[1:3]), -1),
               tokens=info.get("num_tokens", jnp.full((1,), n)),
               capacity=info.get("capacity", jnp.asarray(n)))
    if e:
      conf = [early_exit.token_confidence(a["pred_logits"], a["pred_masks"].reshape(
          a["pred_masks"].shape[:2] + (-1,)))[0] for a in out["aux"]]   # [1, cells] each
      res.update(active=info["active_tokens"], stage_capacity=info["stage_capacity"][None],
                 halt_stage=info["halt_stage"].reshape(1, -1), conf=jnp.stack(conf, 1))
    return res
  return jax.jit(f)


def run_grid_point(fn, variables, images, tau, exit_tau):
  """Per image results of one grid point, stacked over images."""
  outs = [jax.device_get(fn(variables, im[None], jnp.asarray(tau, jnp.float32),
                            jnp.asarray(exit_tau, jnp.float32))) for im in images]
  return {k: np.concatenate([np.atleast_1d(o[k]) if np.ndim(o[k]) == 0 else o[k]
                             for o in outs]) for k in outs[0]}


def share_thresholds(fn, variables, images, tau, num_exits, share):
  """Per-exit thresholds halting `share` of the cells still active at each exit (the rule of
  tokens.calibrate_exits, on the already compiled search program)."""
  taus = []
  for s in range(num_exits):
    r = run_grid_point(fn, variables, images, tau, taus + [1.0] * (num_exits - s))
    alive = r["halt_stage"] >= s
    taus.append(float(np.quantile(r["conf"][:, s][alive], 1 - share)))
  return taus


def costs(config, exits, r):
  """Mean useful and executed GFLOPs per image (flops.token_macs, the policy net included)."""
  cfg = config.copy_and_resolve_references()
  cfg.model.exit_layers = tuple(exits)
  useful, executed = [], []
  for i in range(len(r["tokens"])):
    tok, cap = float(r["tokens"][i]), float(r["capacity"][i])
    act = [float(a) for a in r["active"][i]] if exits else None
    caps = [cap] + [float(c) for c in r["stage_capacity"][i][1:]] if exits else None
    useful.append(flops.token_macs(cfg, tok, act)["total"])
    executed.append(flops.token_macs(cfg, cap, caps)["total"])
  return float(np.mean(useful)), float(np.mean(executed))


def load_labelled(config, n, every=1):
  """n eval-split images (every k-th) and labels resized to the crop (bilinear / nearest)."""
  from step_jax.data import get_source  # pylint: disable=g-import-not-at-top
  h, w = config.data.image_size
  split = config.data.get("split", "") or config.data.eval_split
  src = get_source(config.data, split, config.num_classes, config.ignore_index)
  ims, labs = [], []
  for i in range(0, min(n * every, len(src)), every):
    ims.append(np.asarray(Image.fromarray(src[i]["image"]).resize((w, h), Image.BILINEAR)))
    labs.append(np.asarray(Image.fromarray(np.asarray(src[i]["label"], np.uint8)).resize(
        (w, h), Image.NEAREST)))
  return np.stack(ims), np.stack(labs).astype(np.int32)


def search(config, variables, images, *, labels=None, tau_values=(0.4, 0.6, 0.8, 0.9),
           placements=None, exit_taus=(0.9,), exit_shares=None, trained=False):
  """Every grid point: dict(tau, exits, exit_threshold, exit_share, gflops, gflops_executed,
  tokens, halted_share, quality). Quality: mIoU with labels, else agreement."""
  m = config.model
  placements = [tuple(p) for p in (placements or [tuple(m.get("exit_layers", ()))])]
  if any(placements) and not all(placements):
    raise ValueError(f"placements {placements}: mix no exits with exits (the final heads "
                     "differ); calibrate them as two configs")
  missing = [f"exit_heads_{k}" for k in range(max(map(len, placements)))
              if f"exit_heads_{k}" not in variables["params"]]
  if missing:
    raise ValueError(f"placements {placements} need {missing} in the variables: draw or train "
                     "them for the placement with the most exits")
  taus = tau_grid(tau_values) if m.get("merge", "none") == "dcts" else [tuple(m.thresholds)]
  images = np.asarray(images)
  ref_pred = None
  if labels is None:  # the same weights without sharing or halting (any placement: the
    deepest = max(placements, key=len)  # final head then sees every token)
    ref = sweep.reference(build(point_config(config, dict(
        tau=m.thresholds, exits=deepest, exit_threshold=[1.0] * len(deepest)))))
    ref_pred = sweep.predictions(ref, variables, images)
  points = []
  for exits in placements:
    cfg = point_config(config, dict(tau=m.thresholds, exits=exits,
                                    exit_threshold=[1.0] * len(exits)))
    fn = search_fn(build(cfg))
    if not exits:
      options = [(None, [])]
    elif exit_shares:  # random heads: thresholds from halted shares at the config's τ
      options = [(s, share_thresholds(fn, variables, images, tuple(m.thresholds), len(exits), s))
                 for s in exit_shares]
    else:
      options = [(None, [t] * len(exits)) for t in exit_taus]
    for tau in taus:
      for share, exit_tau in options:
        r = run_grid_point(fn, variables, images, tau, exit_tau)
        if labels is not None:
          conf = metrics.confusion_matrix(r["pred"], labels, cfg.num_classes, cfg.ignore_index)
          quality = metrics.summarize(np.asarray(conf))["miou"]
        else:
          quality = float(np.mean(r["pred"] == ref_pred))
        useful, executed = costs(cfg, exits, r)
        active = r["active"] if exits else r["tokens"][:, None]
        points.append(dict(tau=list(tau), exits=list(exits), exit_threshold=exit_tau,
                           exit_share=share, gflops=useful, gflops_executed=executed,
                           tokens=float(np.mean(r["tokens"])),
                           halted_share=float(1 - active[:, -1].sum() / active[:, 0].sum()),
                           quality=quality))
  return points


def build(config):
  return builder.build(config.model, config.num_classes, tuple(config.data.image_size),
                         config.ignore_index)


def point_config(config, p):
  """The config of grid point `p` (thresholds, exit layers and exit thresholds set)."""
  c = config.copy_and_resolve_references()
  with c.ignore_type():
    c.model.thresholds = tuple(p["tau"])
    c.model.exit_layers = tuple(p["exits"])
    if p["exits"]:
      c.model.exit_threshold = tuple(p["exit_threshold"])
  return c


def choose(points, cost_key, budget):
  """(Pareto front indices, index of the best quality within budget or None). Ties in
  quality go to the cheaper point, so the choice is always on the front."""
  ok = [i for i, p in enumerate(points) if p.get(cost_key) is not None]
  front = [ok[i] for i in sweep.pareto_front([points[j][cost_key] for j in ok],
                                             [points[j]["quality"] for j in ok])]
  within = [i for i in ok if points[i][cost_key] <= budget]
  best = min(within, key=lambda i: (-points[i]["quality"], points[i][cost_key])) \
      if within else None
  return sorted(front, key=lambda i: points[i][cost_key]), best


def time_candidates(config, variables, images, points, front, max_timed, reps=3, warmup=1):
  """ms/image (benchmark.measure) for up to `max_timed` front points spread along it."""
  picks = sorted({front[int(round(k))] for k in np.linspace(0, len(front) - 1,
                                                             min(max_timed, len(front)))})
  for i in picks:
    r = benchmark.measure(point_config(config, points[i]), variables, images, reps=reps,
                          warmup=warmup)
    points[i]["ms"] = r["ms_per_image_median"]


def describe(p):
  s = f"τ {tuple(p['tau'])}"
  if p["exits"]:
    s += f", exits @{p['exits']}, exit τ {[round(t, 4) for t in p['exit_threshold']]}"
    if p["exit_share"] is not None:
      s += f" (share {p['exit_share']})"
  return s


def report(result):
  """Markdown for calibrate.json's content."""
  cost, q = result["cost"], result["quality_name"]
  pts = result["points"]
  lines = [f"Budget calibration of `{result['config']}` on {result['device']}: "
           f"{len(pts)} grid points on {result['images']} images, {result['weights']} "
           f"weights. Quality: {result['quality_note']}", "",
           f"Budget: {cost} ≤ {result['budget']}.", ""]
  if result["best"] is None:
    lines.append("**No grid point is within the budget**; the cheapest point on the front is "
                 f"{describe(pts[result['front'][0]])}.")
  else:
    b = pts[result["best"]]
    lines.append(f"**Best within budget**: {describe(b)}: {q} {b['quality']:.4f}, "
                 f"{b['gflops']:.4f} GFLOPs ({b['gflops_executed']:.4f} executed)"
                 + (f", {b['ms']:.2f} ms/image" if b.get("ms") is not None else "") + ".")
  lines += ["", f"Pareto front ({cost} vs {q}):", "",
            f"| configuration | {q} | GFLOPs | GFLOPs executed | ms/image | tokens | halted |",
            "|---|---|---|---|---|---|---|"]
  for i in result["front"]:
    p = pts[i]
    ms = f"{p['ms']:.2f}" if p.get("ms") is not None else "–"
    mark = " **(chosen)**" if i == result["best"] else ""
    same = sum(o[cost] == p[cost] and o["quality"] == p["quality"] for o in pts) - 1
    mark += f" (+{same} grid points with the same result)" if same else ""
    lines.append(f"| {describe(p)}{mark} | {p['quality']:.4f} | {p['gflops']:.4f} | "
                 f"{p['gflops_executed']:.4f} | {ms} | {p['tokens']:.1f} | "
                 f"{100 * p['halted_share']:.1f} % |")
  return "\n".join(lines)


def calibrate(config, variables, images, *, budget_gflops=None, budget_ms=None, labels=None,
              gflops="useful", max_timed=8, weights="random", **grid):
  """The whole tool without files: returns the JSON-able result."""
  if (budget_gflops is None) == (budget_ms is None):
    raise ValueError("give exactly one of budget_gflops and budget_ms")
  points = search(config, variables, images, labels=labels, **grid)
  gkey = "gflops" if gflops == "useful" else "gflops_executed"
  if budget_ms is not None:  # time the executed-GFLOPs front, then decide on the timings
    front, _ = choose(points, "gflops_executed", float("inf"))
    time_candidates(config, variables, images, points, front, max_timed)
    cost_key, budget = "ms", budget_ms
  else:
    cost_key, budget = gkey, budget_gflops
  front, best = choose(points, cost_key, budget)
  dev = jax.devices()[0]
  miou = labels is not None
  return dict(
      budget=budget, cost=cost_key, points=points, front=front, best=best,
      quality_name="mIoU" if miou else "agreement",
      quality_note=("mIoU against the labels of the calibration images (resized to the crop)."
                    if miou else "agreement with the unpruned model's prediction (same "
                    "weights, no token sharing, no halting): a proxy, not mIoU."
                    + (" Random weights: it measures only how much pruning perturbs the "
                       "output." if weights == "random" else "")),
      images=len(images), weights=weights, device=f"{dev.platform}:{dev.device_kind}",
      config=config.get("name", ""))


def main(argv):
  del argv
  f = flags.FLAGS
  config = f.config
  floats = lambda s: [float(v) for v in s.split(",") if v]
  placements = [tuple(int(e) for e in p.split("-")) for p in f.placements.split(",") if p]
  labels = None
  if f.workdir:
    variables, weights = variables_lib.load(config, f.workdir), f"trained ({f.workdir})"
    if f.images:
      images = tokens.load_images(config, f.images, f.num_images * f.every)[::f.every]
    else:
      images, labels = load_labelled(config, f.num_images, f.every)
    placements = [tuple(config.model.exit_layers)]  # trained heads sit where they were trained
  else:
    images = tokens.load_images(config, f.images, f.num_images * f.every)[::f.every]
    deepest = max(placements or [tuple(config.model.get("exit_layers", ()))], key=len)
    cfg = point_config(config, dict(tau=config.model.thresholds, exits=deepest,
                                    exit_threshold=[1.0] * len(deepest)))
    _, _, variables, weights = benchmark.prepare(cfg, "fp32", None, images)
  result = calibrate(
      config, variables, images, budget_gflops=f.budget_gflops, budget_ms=f.budget_ms,
      labels=labels, gflops=f.gflops, max_timed=f.max_timed, weights=weights,
      tau_values=floats(f.tau_values), placements=placements or None,
      exit_taus=floats(f.exit_taus), exit_shares=None if f.workdir else floats(f.exit_shares))
  result["config"] = config_flags.get_config_filename(f["config"])
  os.makedirs(f.out, exist_ok=True)
  with open(os.path.join(f.out, "calibrate.json"), "w") as fh:
    json.dump(result, fh, indent=1)
  with open(os.path.join(f.out, "calibrate.md"), "w") as fh:
    fh.write(report(result) + "\n")
  print(report(result))


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Config (path:arg) to calibrate.")
  flags.DEFINE_float("budget_gflops", None, "GFLOPs per image budget.")
  flags.DEFINE_float("budget_ms", None, "Latency budget, ms per image on this device.")
  flags.DEFINE_enum("gflops", "useful", ["useful", "executed"], "GFLOPs that the budget counts.")
  flags.DEFINE_string("workdir", None, "Trained training run (default: random weights).")
  flags.DEFINE_string("images", "", "Folder of images (no labels: agreement); default: the "
                      "config's eval split.")
  flags.DEFINE_integer("num_images", 8, "Validation images.")
  flags.DEFINE_integer("every", 1, "Take every k-th image (video datasets: varied scenes).")
  flags.DEFINE_string("tau_values", "0.4,0.6,0.8,0.9", "Candidate dCTS thresholds.")
  flags.DEFINE_string("exit_taus", "0.8,0.9,0.95", "Candidate exit thresholds (trained heads).")
  flags.DEFINE_string("exit_shares", "0.2,0.4,0.6", "Random heads: candidate halted shares.")
  flags.DEFINE_string("placements", "", "Exit placements, e.g. '8,6-8' (random weights only; "
                      "default: the config's).")
  flags.DEFINE_integer("max_timed", 8, "--budget_ms: front points timed at most.")
  flags.DEFINE_string("out", None, "Output folder.")
  flags.mark_flags_as_required(["config", "out"])
  app.run(main)
