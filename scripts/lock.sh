#!/usr/bin/env bash
# Refresh the dependency locks from pyproject.toml (dependencies, the dev extra, [build-system]
# requires) and requirements/build.in, pinning every package with its hashes:
#   requirements/dev.txt      what scripts/setup.sh (and so CI) installs into the virtualenv
#   requirements/runtime.txt  what the container image installs (no dev tools); same versions
# Both are for CPython 3.11 on Linux (Debian 12's python3 and the image's base).
#
#   bash scripts/lock.sh            re-lock after editing pyproject.toml; keeps existing pins
#   bash scripts/lock.sh --upgrade  take the newest versions pyproject.toml allows
#
# Then run `bash scripts/test.sh` (it installs the new pins) and commit requirements/.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP_TOOLS_VERSION=7.6.2
TOOLS=build/lock-tools
if [[ ! -x $TOOLS/bin/pip-compile ]] || ! "$TOOLS/bin/pip-compile" --version | grep -q "$PIP_TOOLS_VERSION"; then
    python3 -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q "pip-tools==$PIP_TOOLS_VERSION"
fi

upgrade=()
case ${1:-} in
    --upgrade) upgrade=(--upgrade) ;;
    "") ;;
    *) echo "usage: bash scripts/lock.sh [--upgrade]" >&2; exit 2 ;;
esac
# pyproject.toml's [build-system] requires, as a requirements file pip-compile can read beside
# the others (its --all-build-deps takes no .in files along).
build_system=$TOOLS/build-system.in
"$TOOLS/bin/python" -c '
import sys, tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))
' > "$build_system"
compile=("$TOOLS/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras
         --no-emit-index-url --no-emit-find-links)
sources=(pyproject.toml requirements/build.in "$build_system")
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"
# The dev lock first (the superset), then the runtime lock constrained to its versions, so a
# package the two share has one version everywhere.
"${compile[@]}" "${upgrade[@]}" --extra dev -o requirements/dev.txt "${sources[@]}"
"${compile[@]}" -c requirements/dev.txt -o requirements/runtime.txt "${sources[@]}"
echo "lock: $(grep -c '==' requirements/dev.txt) packages in requirements/dev.txt," \
     "$(grep -c '==' requirements/runtime.txt) in requirements/runtime.txt" >&2
