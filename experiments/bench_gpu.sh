#!/usr/bin/env bash
# The accelerator grid in one call (issues 6 and 27): SegViT vs dCTS vs STEP, the attention
# paths and the timm/PyTorch peer, most important cells first, each result appended to
# $OUT_JSONL as it lands, stopping before BUDGET_S seconds (default 450) are spent; then the
# table with the paper's A100 ratios (experiments/bench_table.py).
#
#   bash experiments/gpu_pack.sh     # here: wheels, the CamVid policy, 4 images into .gpu/
#   # on the GPU machine (device tool): command "bash experiments/bench_gpu.sh",
#   # carry [".gpu"], timeout_s 540; results come back under $OUT
#
# On the GPU machine (Python 3.12, jax, flax, optax, orbax, torch, timm; no registry) the
# wheels of .gpu/whl are installed into /tmp/step_site first, the policy of .gpu/policy is
# used (without one, one is trained on synthetic scenes: ~2 min), and token counts come
# from .gpu/images (else from 4 synthetic street scenes at 720x960). Exits: random heads
# calibrated to halt 40 % of the active tokens per exit (the paper's share): no trained
# ViT-B/L exists yet.
#
# CELLS: space-separated, each VARIANT@RES:DTYPE:BATCH:METHOD[:ATTENTION] for a
# step_jax.cli.benchmark run, or peer:VARIANT@RES:DTYPE for experiments/peer_bench.py. A
# CPU dry run (tests/test_analysis.py, slow):
#   CELLS="Mu/16@64:fp32:1:segvit Mu/16@64:fp32:1:step peer:Mu/16@64:fp32" \
#       POLICY_CONFIG=configs/policy.py:dataset=synthetic,size=smoke PY=.venv/bin/python \
#       OUT=/tmp/dry bash experiments/bench_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}     # the device's 8-minute share, with room to copy results back
MIN_CELL_S=${MIN_CELL_S:-40}  # no cell starts with less than this left
PY=${PY:-python3}
RESULTS=${OUT:-experiments/results}   # on the device, $OUT is the folder that comes back
mkdir -p "$RESULTS"
OUT_JSONL=${OUT_JSONL:-$RESULTS/bench_gpu.jsonl}
PEER_JSONL=${PEER_JSONL:-$RESULTS/peer_bench_gpu.jsonl}
LOG=${LOG:-$RESULTS/bench_gpu.log}
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax_cache}
say() { echo "[bench_gpu $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

if [ -d .gpu/whl ] && ! "$PY" -c "import grain, clu, ml_collections" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/step_site .gpu/whl/*.whl >>"$LOG" 2>&1 || { say "wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/step_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}   # step_jax and configs, not installed
"$PY" -c "import jax, flax, step_jax; print('jax', jax.__version__, 'flax', flax.__version__,
jax.devices())" 2>>"$LOG" | tee -a "$LOG" || { say "step_jax does not import"; exit 1; }

POLICY=${POLICY:-.gpu/policy}
if [ ! -d "$POLICY/policy_ckpt" ]; then
  POLICY=/tmp/step_policy
  say "no trained policy: training one ($POLICY)"
  "$PY" -m step_jax.cli.train_policy \
      --config="${POLICY_CONFIG:-configs/policy.py:dataset=synthetic,size=cpu}" \
      --workdir="$POLICY" >>"$LOG" 2>&1 || { say "policy training failed"; exit 1; }
fi
IMAGES=${IMAGES:-.gpu/images}
if [ -z "$(ls "$IMAGES" 2>/dev/null)" ]; then   # no frames carried: 4 synthetic street scenes
  IMAGES=/tmp/step_images
  "$PY" -c "import os, sys; from PIL import Image; from step_jax.data import synthetic
os.makedirs(sys.argv[1], exist_ok=True)
src = synthetic.SyntheticScenes(4, (720, 960))
[Image.fromarray(src[i]['image']).save(f'{sys.argv[1]}/{i}.png') for i in range(4)]" \
      "$IMAGES" 2>>"$LOG" || { say "no images"; exit 1; }
fi
images=(--images="$IMAGES")

# Most important first: the paper's setting (L/16, 1024², bf16, batch 1), then B/16, the
# attention paths (cuDNN, the default in bf16, against chunked and the written-out einsum),
# the PyTorch peer, fp32, a throughput batch, and smaller images.
DEFAULT_CELLS="L/16@1024:bf16:1:segvit L/16@1024:bf16:1:dcts L/16@1024:bf16:1:step
B/16@1024:bf16:1:segvit B/16@1024:bf16:1:dcts B/16@1024:bf16:1:step
L/16@1024:bf16:1:segvit:chunked L/16@1024:bf16:1:segvit:einsum
peer:B/16@1024:bf16 peer:L/16@1024:bf16
L/16@1024:fp32:1:segvit L/16@1024:fp32:1:dcts L/16@1024:fp32:1:step
L/16@1024:bf16:8:segvit L/16@1024:bf16:8:dcts L/16@1024:bf16:8:step
B/16@512:bf16:1:segvit B/16@512:bf16:1:dcts B/16@512:bf16:1:step"
for cell in ${CELLS:-$DEFAULT_CELLS}; do
  left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt "$MIN_CELL_S" ]; then say "budget spent: $cell and later cells skipped"; break; fi
  say "$cell ($left s left)"
  if [ "${cell%%:*}" = peer ]; then
    IFS=: read -r _ vr dtype <<<"$cell"
    timeout "$left" "$PY" experiments/peer_bench.py --cells="$vr" --dtype="$dtype" --reps=3 \
        --out="$PEER_JSONL" 2>>"$LOG" | tail -1
    continue
  fi
  IFS=: read -r vr dtype batch method attn <<<"$cell"
  extra=(); [ "$method" = step ] && extra+=(--exit_share=0.4)
  [ -n "${attn:-}" ] && extra+=(--config.model.attention_impl="$attn")
  timeout "$left" "$PY" -m step_jax.cli.benchmark \
      --config="configs/step.py:method=$method,variant=${vr%@*},dataset=cityscapes,res=${vr#*@}" \
      --config.model.policy.init_from="$POLICY" "${images[@]}" --num_images=4 \
      --dtype="$dtype" --batch="$batch" --reps="${REPS:-10}" --warmup=2 "${extra[@]}" \
      2>>"$LOG" | tail -1 | grep '^{' | tee -a "$OUT_JSONL"
done
[ -s "$OUT_JSONL" ] && "$PY" experiments/bench_table.py "$OUT_JSONL" | tee "$RESULTS/bench_gpu_table.md"
say "done"
