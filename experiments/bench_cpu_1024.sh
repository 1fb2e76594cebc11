#!/usr/bin/env bash
# SegViT vs dCTS vs DToP vs STEP at 1024² with ViT-B/16 on this machine's CPU, one run.
# Token counts: dCTS from the CamVid-trained policy net (experiments/results/policy_camvid_cpu);
# exits: random heads, thresholds calibrated to halt 40 % of active tokens per exit (the
# paper's share), since no trained ViT-B exists here. Images: CamVid val resized to 1024².
# Usage: bash experiments/bench_cpu_1024.sh [POLICY_WORKDIR] > experiments/results/bench_cpu_1024.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY=${1:-workdirs/policy_camvid_cpu2}
CAMVID=${CAMVID:-../shared/data/camvid_segnet/CamVid/val}
PY=${PY:-.venv/bin/python}
common="variant=B/16,dataset=camvid,res=${RES:-1024}"
run() {  # config args [extra flags...]
  local args=$1; shift
  "$PY" -m step_jax.cli.benchmark --config="configs/step.py:${args},${common}" \
    --config.model.policy.init_from="$POLICY" --images="$CAMVID" --num_images=4 \
    --reps=3 --warmup=1 "$@" 2>/dev/null | tail -1
}
run method=segvit
run method=dcts
run method=dtop,exits=6-8 --exit_share=0.4 --config.model.exit_mode=mask
run method=dtop,exits=6-8 --exit_share=0.4 --config.model.exit_mode=compact
run method=step,exits=8 --exit_share=0.4 --config.model.exit_mode=mask
run method=step,exits=8 --exit_share=0.4 --config.model.exit_mode=compact
run method=step,exits=6-8 --exit_share=0.4 --config.model.exit_mode=compact
