#!/usr/bin/env bash
# Installs the real parts tests run against, when missing: Debian's chromium and firefox-esr
# (tests/test_players.py) and nginx (tests/test_nginx.py), with apt, as root (CI runs .ci/run
# as root on a fresh machine), and hls.js pinned by package-lock.json (npm ci). Idempotent;
# with everything present it only checks and returns.
set -euo pipefail
cd "$(dirname "$0")"

missing=()
command -v chromium >/dev/null || missing+=(chromium)
# firefox-esr's Recommends bring libavcodec, which it needs to decode H.264: keep them.
command -v firefox-esr >/dev/null || missing+=(firefox-esr)
command -v npm >/dev/null || missing+=(npm)
# /usr/sbin is not on every user's PATH.
command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v wrk >/dev/null || missing+=(wrk)  # tests/test_zerocopy.py measures a stall with it
command -v redis-server >/dev/null || missing+=(redis-server)  # tests/test_cluster_leases.py

if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "tests/players/install.sh: missing ${missing[*]}; as root run:" >&2
        echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "tests/players/install.sh: installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}"
fi

# npm writes node_modules/.package-lock.json last: older than the lock means a changed pin.
if [[ ! -f node_modules/hls.js/dist/hls.min.js || package-lock.json -nt node_modules/.package-lock.json ]]; then
    echo "tests/players/install.sh: npm ci (hls.js)"
    npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
fi
