#!/usr/bin/env bash
# Idempotent set-up on Debian (run as root): system packages, then a virtualenv in .venv with
# Bulkhead and its development tools. Safe to run again; fast when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(python3 python3-venv python3-pip nftables iptables ipset conntrack iproute2 iputils-ping
      procps util-linux kmod postgresql chromium)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
elif [ "$(id -u)" != 0 ]; then
    echo "setup: not root: skipping system packages (the firewall parts need root)" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.bulkhead-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
