#!/bin/bash
# Tables 3-6 on this machine with trained weights: one Mu/16 model per method trained on
# CamVid (configs/camvid.py size=cpu, 2000 steps each), timed on CamVid val images resized to
# 512² and 1024², mIoU on the val split at the training scale (whole 180x240 images).
#
#   for m in segvit dtop step; do python -m step_jax.cli.train \
#       --config=configs/camvid.py:method=$m,size=cpu --workdir=workdirs/camvid_${m}_cpu; done
#   for m in cts cts_dtop dcts; do python -m step_jax.cli.train \
#       --config=configs/camvid.py:method=$m,size=cpu --workdir=workdirs/camvid_${m}_cpu \
#       --config.model.policy.init_from=workdirs/camvid_step_cpu/policy; done
#   bash experiments/methods_camvid_cpu.sh [WORKDIRS=workdirs] [RESOLUTIONS="512 1024"]
set -euo pipefail
W=${1:-workdirs}
for res in ${2:-512 1024}; do
  python experiments/sweep.py --config=configs/camvid.py:method=step,size=cpu \
    --config.data.image_size="($res,$res)" --sweeps=methods \
    --workdir="$W/camvid_segvit_cpu" --workdir="$W/camvid_cts_cpu" \
    --workdir="$W/camvid_dtop_cpu" --workdir="$W/camvid_cts_dtop_cpu" \
    --workdir="$W/camvid_dcts_cpu" --workdir="$W/camvid_step_cpu" \
    --dtop_exits=2 --step_exits=2 --method_taus=6899,4999 \
    --num_images=4 --reps=5 --warmup=1 --out="experiments/results/methods_camvid_cpu_$res"
done
