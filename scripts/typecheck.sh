#!/usr/bin/env bash
# mypy over the installed package layout: tmdht/ plus aio/, node/, client/, cli/, lab/ as
# tmdht.aio, tmdht.node, ... (mypy cannot follow setuptools' editable finder, so cross-package
# imports would silently become Any). A symlink view under build/typecheck gives it the real
# layout. Every package is checked strictly (pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
view=build/typecheck/tmdht
rm -rf build/typecheck && mkdir -p "$view"
for f in tmdht/*; do [[ $f == */__pycache__ ]] || ln -s "$PWD/$f" "$view/"; done
for pkg in aio node client cli lab vnet; do ln -s "$PWD/$pkg" "$view/$pkg"; done
cd build/typecheck && exec mypy --config-file ../../pyproject.toml -p tmdht "$@"
