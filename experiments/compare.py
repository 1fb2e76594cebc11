"""One table of trained runs, measured in one run: mIoU, tokens, GFLOPs (useful / executed /
of which the policy net), ms/image and ratios to the first row.

  python experiments/compare.py --res=1024 --out=experiments/results/compare_camvid_ti \
      --row="SegViT=workdirs/camvid_ti_segvit_s0" \
      --row="DToP-BASE=workdirs/camvid_ti_dtop_s0@1500:noexit" \
      --row="+DToP@[8]=workdirs/camvid_ti_dtop_s0" ...

A row is LABEL=WORKDIR[@STEP][:noexit|:without_exits|:nomerge|:tau=T]: the latest checkpoint
of a training workdir (or the one at STEP, e.g. the DToP BASE model at `prune_from_step`), run with
its own config; `:noexit` runs it with nothing halting (exit threshold 1; the exit heads still
run), as DToP reports its BASE model; `:without_exits` runs it with no exit layers at all
(exit_head='segvit': the same weights as SegViT, or dCTS with token sharing); `:nomerge` runs
an ALGM model as its base method (SegViT, or dCTS for dcts_algm; with exits, those exits):
what ALGM with nothing merging computes, without its matching, with its weights; `:tau=T`
runs it at halting confidence T instead of the trained run's. With ALGM's merges the tokens
cell is the count entering the encoder, then after each merge, and halted is the share of the
merged tokens the exits halt.

mIoU: the eval split with the run's own evaluation settings (CamVid cpu: the 101 val images,
whole, at the training scale). Tokens, GFLOPs and time: `--num_images` eval images resized
to `--res`² (the policy net, merge and exits decide the tokens per image), batch 1, fp32, on
this device; ratios are to the first row, from the same run.
Writes <out>/compare.{md,jsonl}.
"""
import json
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sweep  # noqa: E402
from step_jax.analysis import profile as profile_lib  # noqa: E402
from step_jax.evaluation import tokens
from step_jax.models import segmenter
from step_jax.models import variables as variables_lib
from step_jax.runtime import checkpoint as ckpt_lib


SPEC = "LABEL=WORKDIR[@STEP][:noexit|:without_exits|:nomerge|:tau=T]"


def parse_row(spec):
  """SPEC → (label, workdir, step or None, exit threshold or None for the run's own, the
  suffix: '', 'noexit', 'without_exits', 'nomerge' or 'tau')."""
  label, eq, rest = spec.partition("=")
  if not eq or not label or not rest:
    raise ValueError(f"--row={spec!r}: use {SPEC}")
  rest, _, flag = rest.partition(":")
  threshold = None
  if flag in ("noexit", "without_exits"):
    threshold = 1.0
  elif flag.startswith("tau="):
    try:
      threshold = float(flag[4:])
    except ValueError:
      threshold = -1.0
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f"--row={spec!r}: tau must be a number in [0, 1], got {flag[4:]!r}")
    flag = "tau"
  elif flag not in ("", "nomerge"):
    raise ValueError(f"--row={spec!r}: the suffix is ':noexit', ':without_exits', ':nomerge' "
                     f"or ':tau=T', got {flag!r}")
  workdir, _, step = rest.partition("@")
  if step and not step.isdigit():
    raise ValueError(f"--row={spec!r}: @STEP must be a step number, got {step!r}")
  return label, workdir, int(step) if step else None, threshold, flag


def measure(spec, res, images, **kw):
  """One row: sweep.measure_row on the run's own config at res², its trained weights."""
  label, workdir, step, threshold, flag = parse_row(spec)
  config = ckpt_lib.read_config(workdir)
  variables, got_step = variables_lib.restore(config, workdir, step)
  if threshold is not None:
    config.model.exit_threshold = threshold
  merges = merges_of(config.model)
  if flag == "nomerge":
    if not merges:
      raise ValueError(f"--row={spec!r}: ':nomerge' is for ALGM models (merge 'algm' or "
                       f"'dcts_algm'), this run's merge is {config.model.get('merge')!r}")
    # Nothing merging is the base method exactly (tests/test_algm_model.py and
    # test_algm_compose.py); run it as that method's own program, without ALGM's matching:
    # its cost, with these weights.
    config.model.merge = {"algm": "none", "dcts_algm": "dcts"}[config.model.merge]
    merges = 0
  if flag == "without_exits":
    if config.model.get("exit_layers") and config.model.get("exit_head") != "segvit":
      raise ValueError(f"--row={spec!r}: ':without_exits' needs exit_head='segvit' (its exits "
                       "add no parameters); use ':noexit'")
    config.model.exit_layers = ()
  config.data.image_size = (res, res)
  r = sweep.measure_row(config, images, trained=[(workdir, variables, config.method)],
                        exit_share=-1.0, quality=False, **kw)   # (agreement: not a column)
  m = config.model
  stage = r["mean_tokens_per_stage"]   # entering, after each merge, after each exit
  r.update(merged_tokens=stage[1:1 + merges],
           halted_share=1 - stage[-1] / stage[merges] if merges else r["halted_share"])
  r.update(label=label, spec=spec, step=got_step, seed=config.seed,
           exit_head=m.get("exit_head", "dtop") if m.get("exit_layers", ()) else "",
           exits_on=threshold != 1.0, exit_threshold=m.get("exit_threshold"))
  return r


def merges_of(model_config):
  """How many token counts ALGM's merges add inside the encoder (algm: local and global;
  dcts_algm: global; otherwise none)."""
  return len(segmenter.encoder_merge_layers(model_config.get("merge", "none"),
                                            model_config.get("algm_layers", ())))


def tokens_cell(row):
  """'4096' or, with merges inside the encoder, '4096 → 1930 → 1204'."""
  return " → ".join(f"{t:.0f}" for t in [row["tokens"]] + list(row.get("merged_tokens", [])))


def exit_cell(row):
  """'atm, τ .85', 'dtop (off)' or '–'."""
  if not row["exit_head"]:
    return "–"
  if not row["exits_on"]:
    return f"{row['exit_head']} (off)"
  taus = "/".join(f"{t:g}" for t in np.atleast_1d(row["exit_threshold"]))
  return f"{row['exit_head']}, τ {taus}"


def table(rows, res, images):
  cell = profile_lib.fmt_cell
  base = rows[0]
  lines = [f"Trained runs on {base['device']}: tokens, GFLOPs and time at {res}² on {images} "
           f"eval images resized (batch {base['batch']}, {base['dtype']}); mIoU on the eval "
           "split with each run's own settings; ratios to the first row, measured in this run.",
           "", "| row | step | mIoU | tokens | halted | GFLOPs | executed | of which policy | "
           f"fewer GFLOPs (vs {base['label']}) | ms/image | speed-up | exit head | weights |",
           "|" + "---|" * 13]
  for r in rows:
    lines.append(
        f"| {r['label']} | {r['step']} | {cell(r['miou'] and 100 * r['miou'], '.1f')} | "
        f"{tokens_cell(r)} | {100 * r['halted_share']:.1f} % | {r['gflops_useful']:.2f} | "
        f"{r['gflops_executed']:.2f} | {r.get('gflops_policy') or 0:.2f} | "
        f"{base['gflops_useful'] / r['gflops_useful']:.2f}× | "
        f"{r['ms_per_image_median']:.0f} | "
        f"{base['ms_per_image_median'] / r['ms_per_image_median']:.2f}× | "
        f"{exit_cell(r)} | {r['spec']} |")
  return "\n".join(lines)


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.row:
    raise app.UsageError(f"give at least one --row={SPEC}")
  config = ckpt_lib.read_config(parse_row(f.row[0])[1])
  config.data.image_size = (f.res, f.res)
  images = tokens.load_images(config, f.images, f.num_images)
  rows = []
  for spec in f.row:
    r = measure(spec, f.res, images, reps=f.reps, warmup=f.warmup, eval_images=f.eval_images)
    print(json.dumps({k: r.get(k) for k in ("label", "step", "miou", "tokens", "halted_share",
                                            "gflops_useful", "gflops_executed",
                                            "ms_per_image_median")}), flush=True)
    rows.append(r)
  md = table(rows, f.res, len(images))
  print(md)
  if f.out:
    os.makedirs(f.out, exist_ok=True)
    with open(os.path.join(f.out, "compare.md"), "w") as fh:
      fh.write(md + "\n")
    with open(os.path.join(f.out, "compare.jsonl"), "w") as fh:
      for r in rows:
        fh.write(json.dumps({k: v for k, v in r.items() if not isinstance(v, np.ndarray)},
                            default=float) + "\n")


if __name__ == "__main__":
  flags.DEFINE_multi_string("row", [], f"{SPEC}, repeatable; the first row is the "
                            "reference of the ratios.")
  flags.DEFINE_integer("res", 1024, "Square size the eval images are resized to for tokens, "
                       "GFLOPs and time.")
  flags.DEFINE_string("images", "", "Folder of images; default: the first run's eval split.")
  flags.DEFINE_integer("num_images", 4, "Images for tokens, GFLOPs and time.")
  flags.DEFINE_integer("eval_images", 0, "Eval-split images for mIoU (0: all).")
  flags.DEFINE_integer("reps", 3, "Timed calls per row and image.")
  flags.DEFINE_integer("warmup", 1, "Untimed calls per row.")
  flags.DEFINE_string("out", "", "Output folder (compare.md, compare.jsonl).")
  app.run(main)
