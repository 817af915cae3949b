#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: .venv (every role, for development),
# .venv-edge (the edge install only, for tests/test_edge_install.py) and nginx (for
# tests/test_cloud_cluster.py; installed only where it is missing and we are root with apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup_edge.sh
./scripts/ensure_nginx.sh  # nginx for the replica tests, where it can be installed (CI runs as root)
# .venv/bin/pytest, not `python -m pytest`: the checkout is not put on sys.path, so the suite
# exercises the installed package
exec .venv/bin/pytest -q "$@"
