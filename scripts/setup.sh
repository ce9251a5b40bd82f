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

# The Rust toolchain builds tmdht._native (native/, PyO3) during the pip install below. rustup
# puts it in ~/.cargo/bin, which a non-interactive shell (CI) may not have on PATH. Debian 12's
# own cargo (rustc 1.63) is too old for pyo3 0.30 and blake3 1.8 (1.85), so it is not installed
# here: without a toolchain tmdht installs and runs its pure-Python path, and says so below.
RUST_MIN=1.85
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
if ! command -v cargo >/dev/null && [[ -x $CARGO_BIN/cargo ]]; then
    export PATH="$CARGO_BIN:$PATH"
fi
rust=$(cargo --version 2>/dev/null | awk '{print $2}' || true)
rust_ok=0
if [[ -n $rust ]] && printf '%s\n%s\n' "$RUST_MIN" "$rust" | sort -C -V; then rust_ok=1; fi

if [[ ! -x $VENV/bin/python ]]; then
    echo "setup: creating virtualenv $VENV" >&2
    python3 -m venv "$VENV"
fi
# Python packages: every package (pip and the build backend included) at the version and hashes
# requirements/dev.txt pins (`bash scripts/lock.sh` refreshes it), then the project itself built
# by those pinned tools (build isolation would fetch whatever setuptools is newest that day).
# Only when what they come from changed (the install is editable: Python source edits need
# none). The stamp is a digest of the inputs: the lock, the project metadata, this script, the
# Rust crate built into tmdht._native by the install, the Python and cargo versions. pip's
# output is kept in a log, shown on failure.
stamp=$( {
    "$VENV/bin/python" -VV
    echo "cargo ${rust:-none}"
    cat requirements/dev.txt pyproject.toml scripts/setup.sh
    if [[ -d native ]]; then
        find native -path native/target -prune -o -type f -print0 | LC_ALL=C sort -z | xargs -0 cat
    fi
} | sha256sum | cut -d' ' -f1)
stamp_file=$VENV/.tmdht-setup-stamp
if [[ $(cat "$stamp_file" 2>/dev/null) != "$stamp" ]] \
    || ! "$VENV/bin/python" -c "import tmdht, tmdht.node, tmdht.client, tmdht.vnet" 2>/dev/null \
    || { ((rust_ok)) && ! "$VENV/bin/python" -c "import tmdht._native" 2>/dev/null; }; then
    echo "setup: installing Python packages into $VENV (log: $VENV/pip.log)" >&2
    rm -f "$stamp_file"
    if ! { "$VENV/bin/python" -m pip install -q --require-hashes -r requirements/dev.txt \
            && "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .; } \
            >"$VENV/pip.log" 2>&1; then
        cat "$VENV/pip.log" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import tmdht, tmdht.node, tmdht.client, tmdht.vnet" # fail loudly if it did not work
    echo "$stamp" >"$stamp_file"
fi
if ! "$VENV/bin/python" -c "import tmdht._native" 2>/dev/null; then
    if ((rust_ok)); then
        rm -f "$stamp_file"  # try the build again next time
        echo "setup: tmdht._native did not build with cargo $rust; run" \
             "'cargo build --release --manifest-path native/Cargo.toml' to see why" >&2
        exit 1
    fi
    why="no Rust toolchain (cargo) found"
    [[ -n $rust ]] && why="Rust $rust is older than $RUST_MIN"
    echo "setup: warning: $why, so tmdht._native is not built: the migration proxies run" \
         "the pure-Python path (several times slower); install Rust >= $RUST_MIN (rustup)" \
         "and re-run to build it" >&2
fi
# Byte-compile the project (an editable install writes no .pyc, nor does Python at import time
# when PYTHONDONTWRITEBYTECODE is set, as on these machines): every process would otherwise
# compile its sources at start, and the QEMU proxies' start-up counts in a migration's time.
"$VENV/bin/python" -m compileall -q tmdht node client cli lab aio vnet >/dev/null
