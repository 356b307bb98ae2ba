#!/usr/bin/env bash
# Stop the cluster started by start.sh <state_dir>: kills exactly the PIDs
# recorded in <state_dir>/{slurmd,slurmctld,munged}.pid (never by name), in
# that order, TERM then KILL after a grace period; then the job processes that
# slurmd left behind (only processes whose environment carries this cluster's
# SLURM_CONF). Idempotent: a missing or stale pid file is fine.
set -uo pipefail

[ $# -eq 1 ] || { echo "usage: $0 <state_dir>" >&2; exit 2; }
[ -d "$1" ] || exit 0
STATE="$(cd "$1" && pwd)"
GRACE="${LOCAL_SLURM_STOP_GRACE:-10}"

# Is $1 still the process we started (not a recycled pid)?
ours() {
    local pid=$1 name=$2
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' 2>/dev/null < "/proc/$pid/cmdline" | grep -q -- "$name" || return 1
}

stop_one() {
    local name=$1 f="$STATE/$1.pid" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f")"
    if ours "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq $((GRACE * 10))); do
            ours "$pid" "$name" || break
            sleep 0.1
        done
        if ours "$pid" "$name"; then
            echo "[slurm/stop] $name (pid $pid) ignored SIGTERM for ${GRACE}s: SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null
            sleep 0.2
        fi
    fi
    rm -f "$f"
}

# Job steps (slurmstepd + user processes) of this cluster still alive: they
# carry SLURM_CONF=<state_dir>/slurm.conf in their environment.
# (A shell that sourced env.sh carries SLURM_CONF too, hence the extra test:
# SLURM_JOB_ID in the environment, or a slurmstepd.)
leftover_jobs() {
    local p env
    for p in /proc/[0-9]*; do
        [ "${p#/proc/}" = "$$" ] && continue
        env="$(tr '\0' '\n' 2>/dev/null < "$p/environ")" || continue
        grep -qx "SLURM_CONF=$STATE/slurm.conf" <<<"$env" || continue
        if grep -q "^SLURM_JOB_ID=" <<<"$env" || tr '\0' ' ' 2>/dev/null < "$p/cmdline" | grep -q '^slurmstepd'; then
            echo "${p#/proc/}"
        fi
    done
}

# Cancel this cluster's jobs first, while slurmctld/slurmd still run, so that
# job processes are reaped by slurm itself.
if [ -f "$STATE/slurmctld.pid" ] && ours "$(cat "$STATE/slurmctld.pid")" slurmctld \
        && command -v squeue >/dev/null 2>&1; then
    export SLURM_CONF="$STATE/slurm.conf"
    ids="$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
    if [ -n "${ids// /}" ]; then
        echo "[slurm/stop] cancelling jobs: $ids" >&2
        # shellcheck disable=SC2086  # word splitting intended
        timeout 10 scancel $ids 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(timeout 5 squeue -h -o %A 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

stop_one slurmd
stop_one slurmctld
stop_one munged

pids="$(leftover_jobs | tr '\n' ' ')"
if [ -n "${pids// /}" ]; then
    echo "[slurm/stop] killing leftover job processes: $pids" >&2
    # shellcheck disable=SC2086  # word splitting intended
    kill -KILL $pids 2>/dev/null || true
fi

if [ -f "$STATE/sock_dir" ]; then   # short socket/spool dir of a long state dir
    d="$(cat "$STATE/sock_dir")"
    case "$d" in /tmp/slurm.*) rm -rf "$d" ;; esac
    rm -f "$STATE/sock_dir"
fi
echo "[slurm/stop] stopped cluster in $STATE" >&2
