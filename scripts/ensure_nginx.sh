#!/usr/bin/env bash
# nginx for the replica tests (tests/test_cloud_cluster.py: real nginx in front of real replicas on
# 127.0.0.1). Installs Debian's `nginx` package only where nginx is missing and this runs as root with
# apt-get (CI); elsewhere it does nothing and those tests skip, saying why. Quiet and bounded (90 s a
# step: install, else update + install; 4.5 min at worst); never fails the test run. The package's
# own service is not started (a policy-rc.d that denies it is in place for the install): the tests
# run nginx themselves, in the foreground, on loopback.
set -uo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
    exit 0
fi
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
install() { timeout 90 apt-get install -y -q --no-install-recommends nginx >>"$log" 2>&1; }
if install || { timeout 90 apt-get update -q >>"$log" 2>&1 && install; }; then
    echo "scripts/ensure_nginx.sh: installed nginx ($(/usr/sbin/nginx -v 2>&1))" >&2
else
    echo "scripts/ensure_nginx.sh: could not install nginx (the replica tests will skip); last lines:" >&2
    tail -n 5 "$log" >&2
fi
[ "$made_policy" = 1 ] && rm -f "$policy"
rm -f "$log"
exit 0
