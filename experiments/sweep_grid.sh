#!/usr/bin/env bash
# Grid-size sweep (conf/experiment/sweep_grid.yaml) as one SLURM job array, then the results table.
#
#   experiments/sweep_grid.sh hydra.launcher.partition=gpu model=mobilesam model.checkpoint=mobile_sam.pt \
#       dataset=folder dataset.root=/data/train dataset.val_root=/data/val
#
# Extra arguments are Hydra overrides for every job. LAUNCHER=submitit_local runs the jobs on this
# machine instead (in parallel, through submitit); LAUNCHER=basic runs them one after another.
set -euo pipefail
cd "$(dirname "$0")/.."
exec experiments/run_sweep.sh sweep_grid "$@"
