#!/usr/bin/env bash
# A Debian package a test needs, installed only where it is missing and this runs as root with apt-get
# (CI); elsewhere it does nothing and the tests that need it skip, saying why. Never fails the test run.
#   scripts/ensure_deb.sh PACKAGE SECONDS BINARY...   (installed when none of BINARY... is found)
# Used for nginx (tests/test_cloud_cluster.py: real nginx in front of real replicas on 127.0.0.1) and
# chromium (tests/test_chat_page.py: the chat page, headless, over the DevTools protocol).
# Quiet and bounded (SECONDS a step: install, else update + install). The package's own service is not
# started (a policy-rc.d that denies it is in place for the install): the tests run what they need
# themselves, in the foreground, on loopback.
set -uo pipefail
package=$1 seconds=$2
shift 2
for binary in "$@"; do
    if command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ]; then
        exit 0
    fi
done
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    exit 0
fi
log="$(mktemp)"
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
install() { timeout "$seconds" apt-get install -y -q --no-install-recommends "$package" >>"$log" 2>&1; }
if install || { timeout "$seconds" apt-get update -q >>"$log" 2>&1 && install; }; then
    echo "scripts/ensure_deb.sh: installed $package" >&2
else
    echo "scripts/ensure_deb.sh: could not install $package (the tests that need it will skip); last lines:" >&2
    tail -n 5 "$log" >&2
fi
[ "$made_policy" = 1 ] && rm -f "$policy"
rm -f "$log"
exit 0
