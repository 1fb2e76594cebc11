#!/usr/bin/env bash
# Issue 6's accelerator grid: SegViT vs dCTS vs STEP for ViT-B/16 and ViT-L/16 at 512², 768²
# and 1024², bf16 and fp32, batch 1 and a throughput batch, one JSON line per run appended
# to $OUT_JSONL, then the table with the paper's A100 ratios (experiments/bench_table.py).
# Token counts: dCTS from a trained policy net ($POLICY); exits: random heads calibrated to
# halt 40 % of the active tokens per exit (the paper's share): no trained ViT-B/L exists yet.
#
#   POLICY=workdirs/policy_camvid_cpu2 bash experiments/bench_gpu.sh
#   VARIANTS="L/16" RESS="1024" DTYPES="bf16" BATCHES="1 4" bash experiments/bench_gpu.sh
#
# The full grid is 72 runs (~1 min each on an H100, compile included); with 30 minutes of
# device time start with VARIANTS=L/16 RESS=1024, the paper's headline setting.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
POLICY=${POLICY:-workdirs/policy_camvid_cpu2}
IMAGES=${IMAGES:-../shared/data/camvid_segnet/CamVid/val}   # any folder of PNG/JPEG
OUT_JSONL=${OUT_JSONL:-experiments/results/bench_gpu.jsonl}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
images=(); [ -d "$IMAGES" ] && images=(--images="$IMAGES")
for variant in ${VARIANTS:-B/16 L/16}; do
  for res in ${RESS:-512 768 1024}; do
    for dtype in ${DTYPES:-bf16 fp32}; do
      for batch in ${BATCHES:-1 8}; do
        for method in ${METHODS:-segvit dcts step}; do
          extra=(); [ "$method" = step ] && extra=(--exit_share=0.4)
          "$PY" -m step_jax.cli.benchmark \
            --config="configs/step.py:method=$method,variant=$variant,dataset=cityscapes,res=$res" \
            --config.model.policy.init_from="$POLICY" "${images[@]}" --num_images=4 \
            --dtype="$dtype" --batch="$batch" --reps="${REPS:-10}" --warmup=2 "${extra[@]}" \
            2>/dev/null | tail -1 | tee -a "$OUT_JSONL"
        done
      done
    done
  done
done
# The written-out einsum attention against the default (cuDNN's fused kernel in bf16) at the
# grid's last variant and size: what the fused kernel buys (issue 17). ATTN_REF=0 skips it.
if [ "${ATTN_REF:-1}" = 1 ]; then
  for method in segvit step; do
    extra=(); [ "$method" = step ] && extra=(--exit_share=0.4)
    "$PY" -m step_jax.cli.benchmark \
      --config="configs/step.py:method=$method,variant=$variant,dataset=cityscapes,res=$res" \
      --config.model.policy.init_from="$POLICY" "${images[@]}" --num_images=4 --dtype=bf16 \
      --batch=1 --reps="${REPS:-10}" --warmup=2 --config.model.attention_impl=einsum \
      "${extra[@]}" 2>/dev/null | tail -1 | tee -a "$OUT_JSONL"
  done
fi
"$PY" experiments/bench_table.py "$OUT_JSONL"
