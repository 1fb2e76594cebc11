#!/bin/bash
# SegViT / dCTS / STEP at ViT-B/16 1024² on the CPU, against SegViT with the fused CPU
# attention ('auto' = 'cpu_fused' from 512 tokens) and with 'chunked'. Rows append to
# bench.jsonl; `python experiments/bench_table.py bench.jsonl` makes the table.
set -euo pipefail
cd "$(dirname "$0")/../../.."
P=${POLICY:-workdirs/policy_camvid}   # configs/policy.py:dataset=camvid,size=cpu
CAMVID=${CAMVID:-../shared/data/camvid_segnet/CamVid/val}
OUT=experiments/results/bench_cpu_1024_fused/bench.jsonl
bench() {
  .venv/bin/python -m step_jax.cli.benchmark \
      --config=configs/step.py:$1,variant=B/16,dataset=camvid,res=1024 \
      --config.model.policy.init_from=$P --images=$CAMVID --num_images=4 --reps=3 \
      --warmup=1 "${@:2}" | tail -1 >> $OUT
}
bench method=segvit
bench method=dcts
bench method=step,exits=6-8 --exit_share=0.4
bench method=segvit --config.model.attention_impl=chunked
