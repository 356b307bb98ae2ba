#!/usr/bin/env bash
# Idempotent install of a single-node SLURM (Debian packages) for tests/CI.
# Skips in well under a second when everything is already there.
# Needs root (or passwordless sudo) and apt-get. Exit 0 on success.
set -euo pipefail

PKGS=(slurmctld slurmd slurm-client munge)
BINS=(slurmctld slurmd sinfo squeue sbatch scancel scontrol munged mungekey)

have_all() {
    local b
    for b in "${BINS[@]}"; do
        command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
    done
}

if have_all; then
    echo "[slurm/install] already installed: $(/usr/sbin/slurmctld -V 2>/dev/null || true)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "[slurm/install] not root and no passwordless sudo: cannot install ${PKGS[*]}" >&2
        exit 2
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "[slurm/install] apt-get not found: cannot install ${PKGS[*]}" >&2
    exit 2
fi

export DEBIAN_FRONTEND=noninteractive
# Retry once: a stale package list is the usual first failure on fresh machines.
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PKGS[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PKGS[@]}"
}

have_all || { echo "[slurm/install] packages installed but binaries missing" >&2; exit 1; }
echo "[slurm/install] installed: $(/usr/sbin/slurmctld -V 2>/dev/null || true)"
