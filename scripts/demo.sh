#!/usr/bin/env bash
# The main job: chat with the bundled default model (models/default). Starts a cloud server on
# 127.0.0.1 for models/default/cloud, runs edge-chat on models/default/edge (ONNX Runtime, no
# torch), and stops the server on exit. Extra arguments go to edge-chat, e.g.
#   ./scripts/demo.sh --prompt "It is a truth universally acknowledged," --max-sentences 4
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
exec edge-chat --local --model models/default "$@"
