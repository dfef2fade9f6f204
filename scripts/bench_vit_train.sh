#!/usr/bin/env bash
# ViT-B/16 training throughput: run.py (Lightning, synthetic ImageNet-shaped batches on the GPU, bf16,
# batch 256) against a bare PyTorch loop (scripts/plain_timm_loop.py), eager and compiled, all in
# one run on one GPU. Prints a markdown table; figures go to docs/benchmarks.md.
#   bash scripts/bench_vit_train.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-40}
PY=${PYTHON:-python3}
LOGS=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$PY -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)"

plain() { $PY scripts/plain_timm_loop.py --batch 256 --steps "$STEPS" "$@" | tee -a "$LOGS/plain.txt"; }
structlab() {  # $1: name, rest: overrides
  local name=$1; shift
  $PY run.py experiment=synthetic/vit_b16-dense logger=csv print_config=false paths.log_dir="$LOGS" \
    run_name="$name" task.data.steps_per_epoch=$((STEPS + 6)) "$@" > "$LOGS/$name.log" 2>&1 \
    || { tail -40 "$LOGS/$name.log"; exit 1; }
  $PY - "$LOGS/runs/$name/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"run.py {s['run']['name']}: {s['speed']['train samples/s']} img/s")
PY
}
plain
structlab eager
plain --compile
structlab compiled compile=true

$PY - "$LOGS" <<'PY'
import json, re, sys
from pathlib import Path
logs = Path(sys.argv[1])
plain = [float(m) for m in re.findall(r"([\d.]+) img/s", (logs / "plain.txt").read_text())]
ours = [json.loads((logs / "runs" / n / "summary.json").read_text())["speed"]["train samples/s"]
        for n in ("eager", "compiled")]
print("\n| ViT-B/16, bf16, batch 256 | plain timm loop (img/s) | run.py (img/s) | run.py / plain | run.py / plain eager |")
print("| --- | --- | --- | --- | --- |")
for mode, p, o in zip(("eager", "torch.compile"), plain, ours):
    print(f"| {mode} | {p:,.0f} | {o:,.0f} | {o / p:.3f} | {o / plain[0]:.3f} |")
PY
