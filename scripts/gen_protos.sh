#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf stubs from protos/**/*.proto.
#   scripts/gen_protos.sh            write the stubs next to each .proto
#   scripts/gen_protos.sh OUT_DIR    write them under OUT_DIR instead (tests compare)
# -I is the repository root: protos/sllm/v1/sllm.proto becomes the Python module
# protos.sllm.v1.sllm_pb2, and the generated imports say exactly that.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p "$out"
# shellcheck disable=SC2046
"$PY" -m grpc_tools.protoc -I . --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  $(find protos -name '*.proto' | sort)
