#!/usr/bin/env bash
# Set up (see setup.sh), then run every check: ruff, mypy, and the whole pytest suite.
# As root, privileged tests (network namespaces, nftables, iptables), PostgreSQL tests and
# browser tests (Debian's Chromium) must run: a skip fails.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = 0 ]; then
    export BULKHEAD_REQUIRE_PRIVILEGED=1 BULKHEAD_REQUIRE_POSTGRES=1 BULKHEAD_REQUIRE_BROWSER=1
fi
echo "== ruff"
.venv/bin/ruff check src tests bench
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 "$@"
