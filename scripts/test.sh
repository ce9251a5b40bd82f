#!/usr/bin/env bash
# The full test command: set up, lint (ruff), type-check (mypy, strict on tmdht/), run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${TMDHT_VENV:-build/venv}
export PATH="$PWD/$VENV/bin:$PATH"
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin  # the packaging test builds a wheel (tmdht._native)
if ! command -v cargo >/dev/null && [[ -x $CARGO_BIN/cargo ]]; then export PATH="$PATH:$CARGO_BIN"; fi
echo "== ruff" && ruff check .
echo "== mypy" && bash scripts/typecheck.sh
echo "== pytest" && python -m pytest -q "$@"
