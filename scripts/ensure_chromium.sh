#!/usr/bin/env bash
# Chromium for the chat page's browser test (tests/test_chat_page.py: Debian's Chromium, headless, driven over
# the DevTools protocol; nothing downloads a browser of its own). Installs Debian's `chromium` package only where
# it is missing and this runs as root with apt-get (CI); elsewhere it does nothing and that test skips, saying
# why. Quiet and bounded (180 s a step: install, else update + install); never fails the test run.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    exit 0
fi
log="$(mktemp)"
export DEBIAN_FRONTEND=noninteractive
install() { timeout 180 apt-get install -y -q --no-install-recommends chromium >>"$log" 2>&1; }
if install || { timeout 180 apt-get update -q >>"$log" 2>&1 && install; }; then
    echo "scripts/ensure_chromium.sh: installed $(chromium --version 2>/dev/null)" >&2
else
    echo "scripts/ensure_chromium.sh: could not install chromium (the chat page test will skip); last lines:" >&2
    tail -n 5 "$log" >&2
fi
rm -f "$log"
exit 0
