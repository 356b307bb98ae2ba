#!/usr/bin/env bash
# Start a private single-node SLURM (munged + slurmctld + slurmd) for tests/CI.
#
#   scripts/slurm/start.sh <state_dir>      # then: source <state_dir>/env.sh
#   scripts/slurm/stop.sh  <state_dir>
#
# Everything lives under <state_dir>: slurm.conf, a private munge key + socket,
# state/spool dirs, logs, and one <name>.pid file per daemon started here
# (stop.sh kills exactly those PIDs); only when <state_dir> is too long for
# unix socket paths, the munge socket and slurmd spool go to /tmp/slurm.XXXXXX
# (recorded in <state_dir>/sock_dir, removed by stop.sh).
# Nothing is written to /etc, /run or /var:
# munged runs with its own key and socket (as root, with --force, because test
# dirs such as pytest's tmp_path are 0700), so several clusters (e.g. parallel
# test sessions) can coexist on one machine; the TCP ports are picked free.
#
# <state_dir>/env.sh exports SLURM_CONF and puts <state_dir>/bin first on PATH;
# bin/ holds a `sacct` shim (there is no slurmdbd, so the real sacct fails and
# submitit would poll a dead job forever) that answers from squeue.
#
# Needs root (daemons run as SlurmUser=root / SlurmdUser=root) and the Debian
# packages from install.sh. Exits non-zero and prints the logs if the node is
# not idle within LOCAL_SLURM_START_TIMEOUT seconds (default 60).
#
# Optional env (LOCAL_ prefix: test helpers drop inherited SLURM_* vars):
# LOCAL_SLURM_CTLD_PORT + LOCAL_SLURMD_PORT (default: a free pair in
# 20000-27999 picked from a hash of <state_dir>), LOCAL_SLURM_CPUS (default:
# max(nproc, 2)), LOCAL_SLURM_START_TIMEOUT.
set -euo pipefail

usage() { echo "usage: $0 <state_dir>" >&2; exit 2; }
[ $# -eq 1 ] || usage
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mkdir -p "$1"
STATE="$(cd "$1" && pwd)"
TIMEOUT="${LOCAL_SLURM_START_TIMEOUT:-60}"
SBIN=/usr/sbin

log() { echo "[slurm/start] $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (daemons run as SlurmUser=root)"; exit 3
fi
for b in slurmctld slurmd munged mungekey; do
    [ -x "$SBIN/$b" ] || command -v "$b" >/dev/null 2>&1 || { log "missing $b: run scripts/slurm/install.sh"; exit 3; }
done
for b in sinfo squeue scontrol; do
    command -v "$b" >/dev/null 2>&1 || { log "missing $b: run scripts/slurm/install.sh"; exit 3; }
done

# Refuse to start twice on the same state dir.
for name in munged slurmctld slurmd; do
    if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null \
            && tr '\0' ' ' 2>/dev/null < "/proc/$(cat "$STATE/$name.pid")/cmdline" | grep -q -- "$name"; then
        log "$name already running from $STATE (pid $(cat "$STATE/$name.pid")); run stop.sh first"; exit 4
    fi
done
rm -f "$STATE"/*.pid
if [ -f "$STATE/sock_dir" ]; then  # stale short dir of an unstopped earlier run
    case "$(cat "$STATE/sock_dir")" in /tmp/slurm.*) rm -rf "$(cat "$STATE/sock_dir")" ;; esac
    rm -f "$STATE/sock_dir"
fi

mkdir -p "$STATE"/{log,ctld,bin,munge}

# ---- machine description -------------------------------------------------
NCPU="$(nproc)"
CPUS="${LOCAL_SLURM_CPUS:-$(( NCPU < 2 ? 2 : NCPU ))}"   # >=2 so a 2-task job always fits
MEM_MB="$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)"
REAL_MEM=$(( MEM_MB > 1024 ? MEM_MB - 512 : MEM_MB ))   # a bit under the total: never "Low RealMemory"
NODE="$(hostname -s 2>/dev/null || true)"
if ! [[ "$NODE" =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] || ! getent hosts "$NODE" >/dev/null 2>&1; then
    NODE=localhost
fi
CLUSTER="localtest"
FIRST_JOB_ID=$(( ($(date +%s) % 600000) * 100 + $(printf %s "$STATE" | cksum | cut -d' ' -f1) % 100 + 1 ))

# ---- free TCP ports --------------------------------------------------------
# Base port from a hash of the state dir (two test sessions starting at the
# same moment do not race for the same port), below the ephemeral range.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ -n "${LOCAL_SLURM_CTLD_PORT:-}" ] && [ -n "${LOCAL_SLURMD_PORT:-}" ]; then
    CTLD_PORT=$LOCAL_SLURM_CTLD_PORT
    SLURMD_PORT=$LOCAL_SLURMD_PORT
else
    CTLD_PORT=$(( 20000 + ($(printf %s "$STATE" | cksum | cut -d' ' -f1) % 4000) * 2 ))
    while port_busy "$CTLD_PORT" || port_busy $((CTLD_PORT + 1)); do
        CTLD_PORT=$(( CTLD_PORT + 2 > 27999 ? 20000 : CTLD_PORT + 2 ))
    done
    SLURMD_PORT=$((CTLD_PORT + 1))
fi

# ---- short dir for unix sockets ---------------------------------------------
# Unix socket paths must stay < 108 bytes: the munge socket and slurmd's spool
# dir (slurmstepd creates <spool>/<node>_<jobid>.<stepid> sockets there; too
# long a path = "launch failed requeued held" and a job that never runs). With
# a long <state_dir> they go to a short dir in /tmp that stop.sh removes.
# longest socket: <dir>/spool/<node>_<jobid>.<stepid> (jobid <= 8, stepid <= 10 digits)
if [ $(( ${#STATE} + 7 + ${#NODE} + 20 )) -le 100 ]; then
    SOCK_DIR="$STATE"
else
    SOCK_DIR="$(mktemp -d /tmp/slurm.XXXXXX)"
    echo "$SOCK_DIR" > "$STATE/sock_dir"
fi
SPOOL_DIR="$SOCK_DIR/spool"
mkdir -p "$SPOOL_DIR" "$SOCK_DIR/munge"

# ---- munge: private key + socket ------------------------------------------
MUNGE_DIR="$SOCK_DIR/munge"
chmod 755 "$MUNGE_DIR"
MUNGE_SOCK="$MUNGE_DIR/munge.sock"
MUNGE_KEY="$STATE/munge/munge.key"
[ -s "$MUNGE_KEY" ] || mungekey --create --keyfile="$MUNGE_KEY" >/dev/null 2>&1 \
    || dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
chmod 600 "$MUNGE_KEY"

# ---- slurm.conf -------------------------------------------------------------
CONF="$STATE/slurm.conf"
: > "$STATE/plugstack.conf"
cat > "$CONF" <<EOF
# Generated by scripts/slurm/start.sh: single-node test cluster, no slurmdbd.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$STATE/ctld/slurmctld.pidfile
SlurmdPidFile=$SPOOL_DIR/slurmd.pidfile
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$STATE/plugstack.conf
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobContainerType=job_container/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Start jobs right away (defaults delay batch jobs by up to ~3 s).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Node state comes from this file, not from probing (gVisor/containers may
# report odd sockets/cores/memory and the node would be drained).
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=30
SlurmctldTimeout=30
InactiveLimit=0
KillWait=2
# Keep finished jobs in slurmctld memory for an hour: the sacct shim reads
# final states (COMPLETED/FAILED/CANCELLED/TIMEOUT) from "squeue -t all".
MinJobAge=3600
# Job ids differ between clusters started at different times: submitit's
# class-level SlurmInfoWatcher caches job states by id within a process.
FirstJobId=$FIRST_JOB_ID
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

# ---- sacct shim + env.sh ----------------------------------------------------
install -m 755 "$HERE/sacct_shim.py" "$STATE/bin/sacct"
cat > "$STATE/env.sh" <<EOF
export SLURM_CONF='$CONF'
export PATH='$STATE/bin':"\$PATH"
export LOCAL_SLURM_STATE_DIR='$STATE'
EOF

# ---- start daemons ----------------------------------------------------------
# setsid: own session, survive the caller; all stdio to files so a caller that
# captures our output (subprocess.run(capture_output=True)) is not kept waiting.
# setsid in a non-interactive shell execs without forking, so $! is the daemon.
start_daemon() {  # name, command...
    local name=$1; shift
    setsid "$@" </dev/null >"$STATE/log/$name.out" 2>&1 &
    echo $! > "$STATE/$name.pid"
}

dump_logs() {
    local f
    for f in "$STATE"/log/*; do
        [ -s "$f" ] || continue
        echo "===== $f (last 40 lines) =====" >&2
        tail -n 40 "$f" >&2
    done
    return 0
}
fail() {
    log "$*"
    dump_logs
    "$HERE/stop.sh" "$STATE" >&2 || true
    exit 1
}

T0=$(date +%s.%N)
start_daemon munged "$SBIN/munged" --foreground --force \
    --socket="$MUNGE_SOCK" --key-file="$MUNGE_KEY" \
    --pid-file="$MUNGE_DIR/munged.pidfile" --log-file="$STATE/log/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed"
for _ in $(seq 100); do [ -S "$MUNGE_SOCK" ] && break; sleep 0.1; done
[ -S "$MUNGE_SOCK" ] || fail "munged did not create $MUNGE_SOCK"

export SLURM_CONF="$CONF"
start_daemon slurmctld "$SBIN/slurmctld" -D -i -f "$CONF"
start_daemon slurmd "$SBIN/slurmd" -D -N "$NODE" -f "$CONF"

deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    for name in munged slurmctld slurmd; do
        kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null || fail "$name exited during startup"
    done
    state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)"
    case "$state" in
        idle|mixed|allocated) break ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] || fail "node $NODE not idle after ${TIMEOUT}s (state: '${state:-no answer}'; $(scontrol show node "$NODE" 2>/dev/null | grep -o 'Reason=.*' || true))"
    sleep 0.25
done
T1=$(date +%s.%N)
log "up in $(awk -v a="$T0" -v b="$T1" 'BEGIN{printf "%.1f", b-a}')s: node $NODE ($CPUS cpus, ${REAL_MEM}MB) state=$state, partition debug, ports $CTLD_PORT/$SLURMD_PORT"
log "pids: munged=$(cat "$STATE/munged.pid") slurmctld=$(cat "$STATE/slurmctld.pid") slurmd=$(cat "$STATE/slurmd.pid")"
log "use: source $STATE/env.sh"
