#!/usr/bin/env bash
# The deploy test: deploy/ run by its real engines (Docker and systemd), as root. CI runs it after
# scripts/test.sh; a developer runs it on purpose, since it starts a Docker daemon:
#
#   bash scripts/deploy-test.sh [--only docker|systemd]
#
# It installs what it needs from Debian (docker.io, debootstrap, systemd-container), makes two
# debootstrapped bookworm bases (cached in build/deploy-cache, or $TMDHT_DEPLOY_CACHE), builds and
# runs the image, boots the systemd unit in a container, and leaves the host as it found it (it
# checks that at the end). About 4 minutes with cached bases, 7 without. Logs: build/deploy-test/logs.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) != 0 ]]; then
    echo "deploy-test: run as root (it starts dockerd and systemd-nspawn)" >&2
    exit 2
fi
DEPLOY_PACKAGES=(docker.io debootstrap systemd-container)
missing=()
for pkg in "${DEPLOY_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "deploy-test: installing Debian packages: ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # The packages' scripts must not start the daemons they ship: a system dockerd would set up
    # its bridge, firewall rules and ip_forward. The test starts its own, with private roots.
    # policy-rc.d saying 101 ("not allowed") is Debian's way to say so, for this install only.
    policy=/usr/sbin/policy-rc.d
    own_policy=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\n# scripts/deploy-test.sh: no service starts while it installs packages\nexit 101\n' > "$policy"
        chmod 0755 "$policy"
        own_policy=1
    fi
    installed=
    for attempt in 1 2 3; do
        if apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
            installed=1
            break
        fi
        sleep 10  # another apt-get may hold the lock
    done
    [[ -n $own_policy ]] && rm -f "$policy"
    [[ -n $installed ]] || { echo "deploy-test: could not install ${missing[*]}" >&2; exit 1; }
fi
bash scripts/setup.sh
VENV=${TMDHT_VENV:-build/venv}
PYTHONPATH=tests exec "$VENV/bin/python" -m deploy_engines "$@"
