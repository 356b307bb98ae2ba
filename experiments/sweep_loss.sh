#!/usr/bin/env bash
# Loss-weight sweep (conf/experiment/sweep_loss.yaml: loss.w_focal x loss.w_dice) as one SLURM job
# array, then the results table. Arguments and LAUNCHER: as in experiments/sweep_grid.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec experiments/run_sweep.sh sweep_loss "$@"
