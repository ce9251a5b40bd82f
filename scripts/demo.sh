#!/usr/bin/env bash
# The main job, end to end on a fresh Debian 12 machine: install, boot real guests, mine, encode,
# rebuild, print the savings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${TMDHT_VENV:-build/venv}
exec "$VENV/bin/tmdht" demo --build-dir build "$@"
