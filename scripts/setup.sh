#!/usr/bin/env bash
# Create .venv (Python 3.11) with every role installed for development (`.[dev]`: edge + cloud + train +
# export + bench + test tools). Idempotent and quick when done. The roles one by one: README "Install".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.sllm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # onnxruntime and onnxruntime-gpu overwrite each other's files: the dev env holds the CPU build only
  if .venv/bin/pip show -q onnxruntime-gpu 2>/dev/null; then
    .venv/bin/pip uninstall -q -y onnxruntime-gpu onnxruntime
  fi
  # torch first, pinned: this machine's wheel mirror holds its CPU build; on a plain index the same line
  # takes a multi-GB CUDA build, so there add --index-url https://download.pytorch.org/whl/cpu (docs/install.md)
  .venv/bin/pip install -q --disable-pip-version-check "torch==2.13.0"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]"
  touch "$stamp"
fi
