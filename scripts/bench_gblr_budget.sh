#!/usr/bin/env bash
# Compiled ViT-B/16 with gblr layers (β = 0.25, all 48 block linears, synthetic batches, bf16, batch
# 256) trained through run.py with the default callbacks, with and without GBLRBudget (the width
# projection after every optimizer step), in one process tree on one GPU; then the time of converting
# all 48 layers from dense (init=dense). Figures go to docs/benchmarks.md.
#   bash scripts/bench_gblr_budget.sh [steps] [runs: with_budget without_budget convert]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-60}
PY=${PYTHON:-python3}
LOGS=${LOGS:-$(mktemp -d)}
nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # $1: name, rest: overrides
  local name=$1; shift
  $PY run.py experiment=synthetic/vit_b16-dense callbacks=default trainer.enable_checkpointing=true \
    trainer.limit_val_batches=1 layer=gblr layer.budget=0.25 layer.init=scratch compile=true \
    logger=csv print_config=false paths.log_dir="$LOGS" run_name="$name" \
    task.data.steps_per_epoch=$((STEPS + 6)) "$@" > "$LOGS/$name.log" 2>&1 \
    || { tail -40 "$LOGS/$name.log"; exit 1; }
  $PY -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], s['speed']['train samples/s'], 'img/s', s['cost']['budget (structured MACs / dense)'])" \
    "$LOGS/runs/$name/summary.json" "$name"
}
shift || true
for what in ${@:-with_budget without_budget convert}; do
  case $what in
    with_budget*) run "$what" ;;
    without_budget*) run "$what" callbacks.gblr_budget=null ;;
    convert) $PY scripts/bench_gblr_convert.py ;;
  esac
done
