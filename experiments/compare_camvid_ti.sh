#!/bin/bash
# Issue 13's comparison where STEP's premise holds on a CPU: ViT-Ti/16 (12 layers, the encoder
# dominates the cost), CamVid at 176x240 crops, 2000 steps for every method (exit models:
# 1500 BASE steps + 500 of pruning fine-tuning with a fresh optimizer, DToP's recipe), exits
# at [8] (STEP@[8] on ViT-B), τ-6899. Every training resumes where it stopped.
#
#   bash experiments/compare_camvid_ti.sh train   # the runs missing under $W (hours on 2 cores)
#   bash experiments/compare_camvid_ti.sh exits   # issue 30's runs: exit_head=segvit (the
#       # defaults since 2026-12-03: exits 6 and 8, tau .8) fine-tuned from each SegViT and
#       # from scratch (2 seeds each; SegViT runs first)
#   bash experiments/compare_camvid_ti.sh algm    # issue 28's runs: ALGM x2 seeds, dcts_algm,
#       # algm_dtop (ALGM's defaults for Ti/16: local merge in block 1 at .90, global in 5)
#   bash experiments/compare_camvid_ti.sh table   # the table, one measuring run (~35 min)
#   bash experiments/compare_camvid_ti.sh table_algm   # issue 28's rows alone (~16 min)
#
# Rows: SegViT (2 seeds), DToP-BASE (the BASE checkpoint at step 1500, nothing halting),
# +DToP@[8], +dCTS, +STEP@[8] with DToP's head, +STEP@[8] with SegViT's stages as exits run
# shallowest first (exit_head=atm_shallow_first, called atm when recorded; its BASE; 2 seeds
# at the trained τ .9 and at τ .85), +STEP@[8] with exit_head=segvit at τ .9 (from scratch
# and fine-tuned from SegViT s0), and the defaults since 2026-12-03, +STEP@[6,8] segvit at τ .8
# (2 seeds fine-tuned from each SegViT, 500 steps; 2 from scratch, the default config: one
# schedule, exit losses off until pruning starts; the first try with them on, s0) with
# the dCTS row from the same weights (no exit layers). The fine-tunings at lr 1e-3
# (camvid_ti_step_*_s0) are recorded in experiments/results, not re-measured here. mIoU on the
# 101 val images at the training scale; tokens,
# GFLOPs (policy included) and ms/image on val images resized to 1024².
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-workdirs}
PY=${PY:-.venv/bin/python}
CFG=configs/camvid.py:size=cpu,variant=Ti/16
OLD=exits=8,exit_tau=0.9,recipe=dtop   # the recorded rows before 2026-12-03: one exit at 8, tau .9
POLICY=$W/camvid_ti_step_atm_s0/policy      # trained by the first STEP run, then shared
POLICY_SEGVIT=$W/camvid_ti_step_segvit_s0/policy   # the same for issue 30's runs

rows=()
add() {  # add LABEL RUN[@STEP][:SUFFIX]: a row of the table modes, where its workdir exists
  [ -d "$W/${2%%[@:]*}" ] && rows+=(--row="$1=$W/$2") || echo "missing: $W/$2" >&2
}

train() {  # train NAME CONFIG-ARGS [FLAGS...]
  local name=$1 args=$2; shift 2
  [ -f "$W/$name/eval_val.json" ] && return 0
  $PY -m step_jax.cli.train --config="$CFG,$args" --workdir="$W/$name" "$@" > "$W/$name.log" 2>&1
}

if [ "${1:-}" = train ]; then
  mkdir -p "$W"
  fork() {  # fork NAME FROM: a pruning fine-tuning from FROM's BASE checkpoint (step 1500)
    [ -d "$W/$1/checkpoints/1500" ] || { mkdir -p "$W/$1/checkpoints"
      cp -r "$W/$2/checkpoints/1500" "$W/$1/checkpoints/"; }
  }
  # The pruning fine-tuning runs at 0.1x the peak lr (the cpu config's default); the s0 STEP
  # runs (and the policy) were first trained re-warming to the peak, DToP's schedule taken
  # literally, and their BASE checkpoints are forked for the 0.1x fine-tuning (_ft1e-4).
  train camvid_ti_segvit_s0 method=segvit
  train camvid_ti_step_atm_s0 method=step,$OLD,exit_head=atm_shallow_first --config.prune_optim.lr=1e-3
  train camvid_ti_segvit_s1 method=segvit --config.seed=1
  fork camvid_ti_step_atm_s0_ft1e-4 camvid_ti_step_atm_s0
  train camvid_ti_step_atm_s0_ft1e-4 method=step,$OLD,exit_head=atm_shallow_first \
      --config.model.policy.init_from=$POLICY
  train camvid_ti_step_atm_s1 method=step,$OLD,exit_head=atm_shallow_first --config.seed=1 \
      --config.model.policy.init_from=$POLICY
  train camvid_ti_dtop_s0 method=dtop,$OLD,exit_head=dtop
  train camvid_ti_step_dtop_s0 method=step,$OLD,exit_head=dtop --config.prune_optim.lr=1e-3 \
      --config.model.policy.init_from=$POLICY
  fork camvid_ti_step_dtop_s0_ft1e-4 camvid_ti_step_dtop_s0
  train camvid_ti_step_dtop_s0_ft1e-4 method=step,$OLD,exit_head=dtop \
      --config.model.policy.init_from=$POLICY
  train camvid_ti_dcts_s0 method=dcts --config.model.policy.init_from=$POLICY
elif [ "${1:-}" = exits ]; then
  mkdir -p "$W"
  train camvid_ti_segvit_s0 method=segvit
  # The first runs (exit at 8, tau .9; recorded): from scratch (DToP's recipe) and fine-tuned.
  train camvid_ti_step_segvit_s0 method=step,$OLD,exit_head=segvit
  train camvid_ti_step_from_segvit_s0 method=step,$OLD,exit_head=segvit,init_from=$W/camvid_ti_segvit_s0 \
      --config.model.policy.init_from=$POLICY_SEGVIT
  train camvid_ti_segvit_s1 method=segvit --config.seed=1
  # The defaults since 2026-12-03 (exits at 6 and 8, tau .8): fine-tuned from each SegViT,
  # and from scratch with pruning on for the last quarter of one schedule.
  for s in 0 1; do
    train camvid_ti_step68_from_segvit_s$s method=step,init_from=$W/camvid_ti_segvit_s$s \
        --config.seed=$s --config.model.policy.init_from=$POLICY_SEGVIT
  done
  # From scratch, the default config (one schedule, the exits' losses off until pruning
  # starts at step 1751; recorded as forks of the SegViT runs at step 1500, their BASE);
  # before: pruning from 1501 (camvid_ti_step68_s*), and the first try trained the exits'
  # losses from step 1 (camvid_ti_step68_segvit_s0).
  for s in 0 1; do
    train camvid_ti_step68_p1750_s$s method=step --config.seed=$s \
        --config.model.policy.init_from=$POLICY_SEGVIT
    train camvid_ti_step68_s$s method=step --config.seed=$s --config.prune_from_step=1500 \
        --config.model.policy.init_from=$POLICY_SEGVIT
  done
elif [ "${1:-}" = algm ]; then
  # Issue 28: the peer method ALGM (2 seeds) and its compositions with dCTS and the exits
  # (1 seed each), the same recipe (2000 steps, one schedule); the policy of the exit runs.
  mkdir -p "$W"
  train camvid_ti_algm_s0 method=algm
  # Its policy trains first (150 steps, deterministic: the same as $POLICY_SEGVIT's).
  train camvid_ti_dcts_algm_s0 method=dcts_algm
  train camvid_ti_algm_s1 method=algm --config.seed=1
  train camvid_ti_algm_dtop_s0 method=algm_dtop
elif [ "${1:-}" = table_algm ]; then
  # Issue 28's side-by-side alone (~16 min): SegViT, dCTS and the default STEP rows beside
  # ALGM and its compositions, measured in one run. The first row, the reference of the
  # ratios, is SegViT's program with ALGM s1's weights (':nomerge': what nothing merging
  # computes, without ALGM's matching), so that the table stands on ALGM's runs alone where
  # the SegViT/STEP workdirs are gone (their records stay in experiments/results).
  add "SegViT's program, ALGM s1 weights" camvid_ti_algm_s1:nomerge
  add "SegViT s0" camvid_ti_segvit_s0
  add "SegViT s1" camvid_ti_segvit_s1
  add "+dCTS's program, dCTS&ALGM s0 weights" camvid_ti_dcts_algm_s0:nomerge
  add "+dCTS (STEP@[6,8] s0 weights, no exits)" camvid_ti_step68_from_segvit_s0:without_exits
  add "+STEP@[6,8] τ .8 (default) from SegViT s0" camvid_ti_step68_from_segvit_s0
  add "+STEP@[6,8] τ .8 (default) from SegViT s1" camvid_ti_step68_from_segvit_s1
  add "+STEP@[6,8] τ .8 (default) from scratch s0" fork68_p1750_s0
  add "+STEP@[6,8] τ .8 (default) from scratch s1" fork68_p1750_s1
  add "+ALGM s0" camvid_ti_algm_s0
  add "+ALGM s1" camvid_ti_algm_s1
  add "+dCTS&ALGM s0" camvid_ti_dcts_algm_s0
  add "+ALGM&exits@[6,8] s0" camvid_ti_algm_dtop_s0
  $PY experiments/compare.py "${rows[@]}" --res=1024 --num_images=4 --reps=3 \
      --out=experiments/results/compare_camvid_ti_algm
elif [ "${1:-}" = table ]; then
  add "SegViT s0" camvid_ti_segvit_s0
  add "SegViT s1" camvid_ti_segvit_s1
  add "DToP-BASE" camvid_ti_dtop_s0@1500:noexit
  add "+DToP@[8]" camvid_ti_dtop_s0
  add "+dCTS τ-6899" camvid_ti_dcts_s0
  add "+STEP@[8] DToP head" camvid_ti_step_dtop_s0_ft1e-4
  add "STEP ATM exits BASE" camvid_ti_step_atm_s0@1500:noexit
  add "+STEP@[8] ATM exits s0" camvid_ti_step_atm_s0_ft1e-4
  add "+STEP@[8] ATM exits s1" camvid_ti_step_atm_s1
  add "+STEP@[8] ATM exits s0, τ .85" camvid_ti_step_atm_s0_ft1e-4:tau=0.85
  add "+STEP@[8] ATM exits s1, τ .85" camvid_ti_step_atm_s1:tau=0.85
  add "STEP segvit exits BASE s0" camvid_ti_step_segvit_s0@1500:noexit
  add "+STEP@[8] segvit exits s0" camvid_ti_step_segvit_s0
  add "+STEP@[8] from SegViT s0" camvid_ti_step_from_segvit_s0
  add "+STEP@[6,8] τ .8 (default) from SegViT s0" camvid_ti_step68_from_segvit_s0
  add "+STEP@[6,8] τ .8 (default) from SegViT s1" camvid_ti_step68_from_segvit_s1
  add "+STEP@[6,8] τ .8, exit losses from step 1, s0" camvid_ti_step68_segvit_s0
  add "+STEP@[6,8] τ .8, pruning from 1501, s0" camvid_ti_step68_s0
  add "+STEP@[6,8] τ .8, pruning from 1501, s1" camvid_ti_step68_s1
  add "+STEP@[6,8] τ .8 (default) from scratch s0" fork68_p1750_s0
  add "+STEP@[6,8] τ .8 (default) from scratch s1" fork68_p1750_s1
  add "+dCTS (STEP@[6,8] s0 weights, no exits)" camvid_ti_step68_from_segvit_s0:without_exits
  add "+ALGM s0" camvid_ti_algm_s0
  add "+ALGM s1" camvid_ti_algm_s1
  add "+dCTS&ALGM s0" camvid_ti_dcts_algm_s0
  add "+ALGM&exits@[6,8] s0" camvid_ti_algm_dtop_s0
  $PY experiments/compare.py "${rows[@]}" --res=1024 --num_images=4 --reps=3 \
      --out=experiments/results/compare_camvid_ti
else
  echo "usage: bash experiments/compare_camvid_ti.sh train|exits|algm|table|table_algm" >&2
  exit 2
fi
