#!/usr/bin/env bash
# Issue 16 at ViT-B/16 1024²: SegViT, dCTS and STEP@[8] (random ViT and heads, the CamVid
# policy net; DToP's exit head, calibrated to halt 40 %: random ATM stages saturate most
# tokens to one confidence, so no threshold halts a share of them) under the on-device 1/8 ladder (before) and the
# host-dispatched ratio-1.05 ladder with grouped batches (after), at batch 1 and 8, on 8 CamVid
# val images and 8 synthetic scenes. One JSON line per (method, design, batch).
# Usage: bash experiments/bucket_b16.sh [POLICY_WORKDIR] [OUT_DIR]   (~1 h on a 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
POLICY=${1:-workdirs/camvid_ti_step_atm_s0/policy}
OUT=${2:-workdirs/bucket_b16}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
run() {  # dataset method-args [flags...]
  local data=$1 args=$2; shift 2
  "$PY" experiments/bucket_compile.py \
    --config="configs/step.py:${args},variant=B/16,dataset=${data},res=1024" \
    --config.model.policy.init_from="$POLICY" --out="$OUT/$data.jsonl" "$@"
}
both=(--designs="eighths, device" --designs="geometric 1.05, host")
for data in camvid synthetic; do
  # SegViT has no buckets: its cost per image is the same for every image and batch size.
  run "$data" method=segvit --designs="eighths, device" --num_images=2 --batch=1
  run "$data" method=dcts "${both[@]}" --num_images=8 --batch=1 --batch=8
  run "$data" method=step,exits=8,exit_head=dtop "${both[@]}" --num_images=8 --batch=1 --batch=8
done
