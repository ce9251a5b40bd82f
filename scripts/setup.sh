#!/usr/bin/env bash
# Install everything tmdht's tests and demo need on a fresh Debian 12 machine (run as root):
# Debian packages (QEMU, the cloud kernel, busybox) and a virtualenv with tmdht and its tools.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(qemu-system-x86 qemu-utils linux-image-cloud-amd64 busybox-static cpio python3 python3-venv prometheus docker-compose systemd nftables iproute2)
VENV=${TMDHT_VENV:-build/venv}

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
# python3/python3-venv only matter when no usable python3 with venv is on PATH already.
if command -v python3 >/dev/null && python3 -c "import venv, ensurepip" 2>/dev/null; then
    filtered=()
    for pkg in "${missing[@]}"; do [[ $pkg == python3* ]] || filtered+=("$pkg"); done
    missing=("${filtered[@]+"${filtered[@]}"}")
fi
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ ! -x $VENV/bin/python ]]; then
    echo "setup: creating virtualenv $VENV" >&2
    python3 -m venv "$VENV"
fi
# Python packages: only when what they come from changed (the install is editable: source edits
# need none). The stamp is a digest of the inputs; pip's output is kept in a log, shown on failure.
stamp_inputs=(pyproject.toml scripts/setup.sh)
stamp=$( { "$VENV/bin/python" -VV; cat "${stamp_inputs[@]}"; } | sha256sum | cut -d' ' -f1)
stamp_file=$VENV/.tmdht-setup-stamp
if [[ $(cat "$stamp_file" 2>/dev/null) != "$stamp" ]] \
    || ! "$VENV/bin/python" -c "import tmdht, tmdht.node, tmdht.client" 2>/dev/null; then
    echo "setup: installing Python packages into $VENV (log: $VENV/pip.log)" >&2
    rm -f "$stamp_file"
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip || true  # offline: keep the old
            "$VENV/bin/python" -m pip install -q -e '.[dev]'; } >"$VENV/pip.log" 2>&1; then
        cat "$VENV/pip.log" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import tmdht, tmdht.node, tmdht.client" # fail loudly if it did not work
    echo "$stamp" >"$stamp_file"
fi
# Byte-compile the project (an editable install writes no .pyc, nor does Python at import time
# when PYTHONDONTWRITEBYTECODE is set, as on these machines): every process would otherwise
# compile its sources at start, and the QEMU proxies' start-up counts in a migration's time.
"$VENV/bin/python" -m compileall -q tmdht node client cli lab >/dev/null
