#!/usr/bin/env bash
# Create .venv-edge (Python 3.11): the edge install only, as a user gets it on a laptop or an ARM
# board: a wheel built from the checkout, installed with its `edge` extra (not editable): numpy,
# tokenizers, huggingface_hub, onnxruntime (CPU build), grpcio, protobuf, typer; no torch,
# transformers or onnx. tests/test_edge_install.py checks that this env runs edge-chat, installs
# nothing but the `sllm` package, and lacks the other roles' packages.
#
# Idempotent and quick when done:
# - the dependencies are installed once per pyproject.toml: when its content changes, the env is
#   rebuilt from scratch (so a dependency dropped from the edge extra really leaves it);
# - the project's own code is reinstalled (a wheel of a clean copy of its packages, no deps)
#   whenever a hash of the package sources changes: never stale code (about 4 s here; 0.03 s when nothing changed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv-edge
PIP=(-q --disable-pip-version-check --no-input)

# the folders the wheel is built from: those pyproject.toml maps into the sllm namespace (package-dir),
# so a folder that is not installed (bench/, tests/) never reaches the wheel
mapfile -t packages < <("$PY" -c 'import tomllib
cfg = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
print("\n".join(sorted(set(cfg.values()))))')
sources_hash() {
  {
    sha256sum pyproject.toml README.md
    find "${packages[@]}" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z |
      xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}

deps_key=$(sha256sum pyproject.toml | cut -d' ' -f1)
deps_stamp=$VENV/.sllm-deps    # pyproject.toml hash the dependencies were installed for
code_stamp=$VENV/.sllm-code    # source hash of the installed project code
code_key=$(sources_hash)

if [ -f "$deps_stamp" ] && [ "$(cat "$deps_stamp")" = "$deps_key" ] && [ -x "$VENV/bin/python" ] &&
   [ -f "$code_stamp" ] && [ "$(cat "$code_stamp")" = "$code_key" ]; then
  exit 0  # up to date: a few ms
fi

# a wheel built from a clean copy of the packages (pip would otherwise build in-tree, and setuptools
# leaves files deleted from the sources in build/lib, where the next wheel picks them up)
src=$(mktemp -d "${TMPDIR:-/tmp}/sllm-edge-src.XXXXXX")
trap 'rm -rf "$src"' EXIT
cp pyproject.toml README.md "$src"/
tar -cf - --exclude=__pycache__ --exclude='*.pyc' "${packages[@]}" | tar -xf - -C "$src"
fresh=0
if [ ! -f "$deps_stamp" ] || [ "$(cat "$deps_stamp")" != "$deps_key" ] || [ ! -x "$VENV/bin/python" ]; then
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  fresh=1
fi
# the dev env's setuptools builds the (pure Python) wheel in about half the time of an isolated build
if [ -x .venv/bin/python ] && .venv/bin/python -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null; then
  .venv/bin/pip wheel "${PIP[@]}" --no-deps --no-build-isolation -w "$src/dist" "$src"
else
  "$VENV/bin/pip" wheel "${PIP[@]}" --no-deps -w "$src/dist" "$src"
fi
wheel=$(echo "$src"/dist/sllm-*.whl)
if [ "$fresh" = 1 ]; then
  "$VENV/bin/pip" install "${PIP[@]}" "$wheel[edge]"
  echo "$deps_key" > "$deps_stamp"
else
  "$VENV/bin/pip" install "${PIP[@]}" --no-deps --force-reinstall "$wheel"
fi
echo "$code_key" > "$code_stamp"
