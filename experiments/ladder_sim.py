"""Issue 29: the host dispatch's ladders replayed on recorded token counts, without a model.

Input: a JSON with `rows` (per image: `count` supertokens, `active` tokens per encoder
stage, as HostBuckets' info gives them at batch 1) and `summary` (compile seconds and
programs per program name, dispatch.HostBuckets.compile_summary). For each ladder design it
counts the programs a host_split run would compile over these images (batch 1, or batches
of --batch grouped by token count; or capacities planned over pools of --pool images as
dispatch.HostBuckets(plan_ratio=1.05).run plans them) and their cost at the recorded seconds
per program, and executed/useful GFLOPs (flops.token_macs of the capacities and of the
counts).

  python experiments/ladder_sim.py \
      --counts=experiments/results/host_compile_cpu/b16_step_counts.json \
      --config=method=step,variant=B/16,dataset=camvid,res=1024 --device_compile_s=70.3
"""
import json
import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import step as step_config  # noqa: E402
from step_jax.evaluation import dispatch  # noqa: E402
from step_jax.models import capacity  # noqa: E402
from step_jax.models import flops  # noqa: E402
from step_jax.models import supertokens  # noqa: E402
from step_jax.models import vit as vit_lib  # noqa: E402

SEGMENTS = ("segment 1", "segment 2", "segment 3", "finish")
# name: (supertoken ladder, exit ladder) as fractions of the grid.
DESIGNS = {
    "1.05 / 1.05 from 10 % (before)": (capacity.geometric_buckets(1.05),
                                       capacity.geometric_buckets(1.05)),
    "1.05 / 1.1025 from 10 %": (capacity.geometric_buckets(1.05),
                                capacity.geometric_buckets(1.05 ** 2)),
    "1.05 / 1.05 from 2 %": (capacity.geometric_buckets(1.05),
                             capacity.geometric_buckets(1.05, 0.02)),
    "1.05 / exit_ladder(1.05) (now)": (capacity.geometric_buckets(1.05),
                                       capacity.exit_ladder(1.05)),
    "1.05 / 1.2, steps of 1/32": (capacity.geometric_buckets(1.05),
                                  (1 / 32, 2 / 32, 3 / 32) + capacity.geometric_buckets(1.2)),
}


def simulate(config, rows, seconds, first, exits, batch):
  n = (config.data.image_size[0] // 16) * (config.data.image_size[1] // 16)
  l1 = supertokens.bucket_capacities(n, first)
  le = supertokens.bucket_capacities(n, exits, multiple=8)
  programs = {k: set() for k in SEGMENTS}
  useful = executed = 0.0
  for group in dispatch.group_by_tokens([r["count"] for r in rows], batch):
    c1 = dispatch.pick_capacity(max(rows[i]["count"] for i in group), l1)
    programs["segment 1"].add(c1)
    programs["finish"].add(c1)
    for i in group:
      caps = [c1]
      for s, active in enumerate(rows[i]["active"][1:], start=2):
        caps.append(dispatch.pick_capacity(active, le))
        programs[f"segment {s}"].add(caps[-1])
      useful += flops.token_macs(config, rows[i]["count"], rows[i]["active"])["total"]
      executed += flops.token_macs(config, c1, caps)["total"]
  compile_s = seconds["merge"] + sum(seconds[k] * len(v) for k, v in programs.items())
  return dict(programs={k: len(v) for k, v in programs.items()}, compile_s=round(compile_s, 1),
              executed_over_useful=round(executed / useful, 4))


def simulate_planned(config, rows, seconds, ratio, batch, pool):
  """The same for capacities planned over pools of `pool` images (reading order, each sorted
  by count), as HostBuckets(plan_ratio=ratio).run plans them: the first segment's (and the
  finish's) over the pool's batches, each later segment's over its images."""
  n = (config.data.image_size[0] // 16) * (config.data.image_size[1] // 16)
  v = vit_lib.decode_variant(config.model.variant)
  cost = lambda c: c * (c + 2 * v["width"] + v["mlp_dim"])   # HostBuckets._cost
  compiled = {k: set() for k in SEGMENTS[:-1]}
  useful = executed = 0.0
  for p0 in range(0, len(rows), pool):
    order = sorted(range(p0, min(p0 + pool, len(rows))), key=lambda i: rows[i]["count"])
    groups = [order[i:i + batch] for i in range(0, len(order), batch)]
    needs = [max(rows[i]["count"] for i in g) for g in groups]
    caps = dispatch.plan_capacities(needs, [batch] * len(groups), cost, ratio,
                                    compiled["segment 1"], 16, n)
    compiled["segment 1"] |= set(caps)
    stage_caps = {i: [dispatch.pick_capacity(c, caps)] for g, c in zip(groups, needs) for i in g}
    for s in range(2, len(rows[0]["active"]) + 1):
      active = [rows[i]["active"][s - 1] for i in order]
      caps = dispatch.plan_capacities(active, [1] * len(order), cost, ratio,
                                      compiled[f"segment {s}"], 8, n)
      compiled[f"segment {s}"] |= set(caps)
      for i, a in zip(order, active):
        stage_caps[i].append(dispatch.pick_capacity(a, caps))
    for i in order:
      useful += flops.token_macs(config, rows[i]["count"], rows[i]["active"])["total"]
      executed += flops.token_macs(config, stage_caps[i][0], stage_caps[i])["total"]
  programs = {k: len(v) for k, v in compiled.items()}
  programs["finish"] = programs["segment 1"]
  compile_s = seconds["merge"] + sum(seconds[k] * v for k, v in programs.items())
  return dict(programs=programs, compile_s=round(compile_s, 1),
              executed_over_useful=round(executed / useful, 4))


def main(argv):
  del argv
  f = flags.FLAGS
  config = step_config.get_config(f.config)
  data = json.load(open(f.counts))
  summary = data["summary"]
  seconds = {k: v["seconds"] / v["programs"] for k, v in summary.items()}
  for batch in f.batch:
    for name, (first, exits) in DESIGNS.items():
      row = simulate(config, data["rows"], seconds, first, exits, batch)
      if f.device_compile_s:
        row["compile_vs_device"] = round(row["compile_s"] / f.device_compile_s, 2)
      print(json.dumps(dict(design=name, batch=batch, **row)))
    for pool in f.pool:
      row = simulate_planned(config, data["rows"], seconds, 1.05, batch, pool)
      if f.device_compile_s:
        row["compile_vs_device"] = round(row["compile_s"] / f.device_compile_s, 2)
      print(json.dumps(dict(design=f"planned 1.05, pools of {pool}", batch=batch, **row)))


if __name__ == "__main__":
  flags.DEFINE_string("counts", None, "JSON of per-image counts and compile seconds.")
  flags.DEFINE_string("config", "method=step,variant=B/16,dataset=camvid,res=1024",
                      "configs/step.py argument of the model the counts come from.")
  flags.DEFINE_multi_integer("batch", [1, 8], "Batch sizes, repeatable.")
  flags.DEFINE_float("device_compile_s", 0.0, "The one program's compile seconds.")
  flags.DEFINE_multi_integer("pool", [16, 128], "Images per pool of the planned design.")
  flags.mark_flags_as_required(["counts"])
  app.run(main)
