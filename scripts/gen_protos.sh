#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf stubs from protos/**/*.proto.
#   scripts/gen_protos.sh            write the stubs next to each .proto
#   scripts/gen_protos.sh OUT_DIR    write them under OUT_DIR/sllm/protos/ instead (tests compare)
# protoc derives the generated imports from the path it is given, and protos/ installs as the Python
# package sllm.protos: so protoc reads the .proto files through a staging root where protos/ sits at
# sllm/protos/ (a symlink), and protos/v1/sllm.proto becomes the module sllm.protos.v1.sllm_pb2.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo "$repo/.venv/bin/python" || echo python3 )}"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/sllm"
ln -s "$repo/protos" "$stage/sllm/protos"
if [ $# -ge 1 ]; then
  out=$(mkdir -p "$1" && cd "$1" && pwd)
else
  out="$stage"  # written through the symlink, next to each .proto
fi
cd "$stage"
# shellcheck disable=SC2046
"$PY" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  $(cd "$stage" && find -L sllm/protos -name '*.proto' | sort)
