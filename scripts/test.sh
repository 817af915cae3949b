#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: .venv (every role, for development) and
# .venv-edge (the edge install only, for tests/test_edge_install.py).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup_edge.sh
# .venv/bin/pytest, not `python -m pytest`: the checkout is not put on sys.path, so the suite
# exercises the installed package
exec .venv/bin/pytest -q "$@"
