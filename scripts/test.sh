#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite: .venv (every role, for development),
# .venv-edge (the edge install only, for tests/test_edge_install.py), nginx (for
# tests/test_cloud_cluster.py) and Chromium (for tests/test_chat_page.py); those two are installed only where
# they are missing and we are root with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
./scripts/setup_edge.sh
./scripts/ensure_deb.sh nginx 90 nginx  # for the replica tests, where it can be installed (CI runs as root)
./scripts/ensure_deb.sh chromium 180 chromium chromium-browser  # for the chat page's browser test, likewise
# .venv/bin/pytest, not `python -m pytest`: `sllm.*` comes from the install (pytest puts only the
# checkout root on sys.path, for bench/, which is not installed)
exec .venv/bin/pytest -q "$@"
