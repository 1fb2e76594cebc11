#!/bin/bash
# Copies a finished run's record (config, metrics, eval json, console log, policy eval) from
# its workdir into experiments/results/<name>/ with the command that made it.
#   bash experiments/save_run.sh WORKDIR NAME "COMMAND"
set -euo pipefail
wd=$1; out=experiments/results/$2; mkdir -p "$out"
cp "$wd/config.json" "$wd/metrics.jsonl" "$out/"
for f in "$wd"/eval_*.json; do cp "$f" "$out/"; done
[ -f "$wd.log" ] && grep -v "^[IW][0-9]\{4\} " "$wd.log" > "$out/train.log" || true
[ -f "$wd/policy/eval_policy.json" ] && cp "$wd/policy/eval_policy.json" "$out/policy_eval.json"
echo "$3" > "$out/command.txt"
git add -f "$out"
