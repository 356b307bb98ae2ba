#!/usr/bin/env bash
# experiments/run_sweep.sh <experiment> [hydra overrides...]
#
# Launches `python run.py -m experiment=<experiment>` (LAUNCHER: slurm (default) | submitit_local |
# basic), waits for the jobs (the Hydra process stays until the array is done: run it in tmux/screen,
# or on a login node), then prints the table and writes results.{csv,md,png} in the sweep directory.
# The sweep directory is fixed up front so that the collection step knows where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
EXP="${1:?usage: experiments/run_sweep.sh <experiment> [overrides...]}"; shift
PY="${PYTHON:-python}"
STAMP="$(date +%Y-%m-%d_%H-%M-%S)_$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
SWEEP_DIR="${SWEEP_DIR:-multirun/${EXP}/${STAMP}}"
LAUNCHER_ARGS=()
case "${LAUNCHER:-slurm}" in
    slurm) LAUNCHER_ARGS=(hydra/launcher=slurm) ;;
    submitit_local) LAUNCHER_ARGS=(hydra/launcher=submitit_local) ;;
    basic) ;;
    *) echo "LAUNCHER must be slurm, submitit_local or basic" >&2; exit 2 ;;
esac
echo "[sweep] $EXP -> $SWEEP_DIR"
"$PY" run.py -m "experiment=$EXP" "${LAUNCHER_ARGS[@]}" "hydra.sweep.dir=$SWEEP_DIR" "$@"
"$PY" experiments/collect.py "$SWEEP_DIR"
