#!/bin/bash
# One training run as a plain SLURM batch job (no Hydra launcher), one task per GPU:
#
#   cd mobilesam-se && sbatch scripts/sbatch_train.sh experiment=seed_everything dataset=folder dataset.root=/data/train ...
#   sbatch --nodes=2 scripts/sbatch_train.sh ...            # 8 GPUs over 2 nodes
#
# Ranks come from srun (SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID), MASTER_ADDR from the
# first node of the step's node list, MASTER_PORT from the job id (mobilesam_se/engine/distributed.py).
# Preemption: --signal sends USR1 to the tasks 120 s before the time limit (and `scancel --signal=USR1`
# does it by hand); the trainer saves last.ckpt at the next step and rank 0 runs `scontrol requeue`.
# The requeued job keeps its job id, so the run directory below is the same and the run resumes
# (same W&B run id). For sweeps prefer `python run.py -m hydra/launcher=slurm ...` (docs/scaling.md).
#SBATCH --job-name=mobilesam-se
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
# The job starts in the directory sbatch was called from (or --chdir): the repository root.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-8}"
PY="${PYTHON:-python}"
RUN_DIR="${RUN_DIR:-outputs/slurm/${SLURM_JOB_NAME:-train}_${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}}"
echo "[sbatch] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) -> $RUN_DIR"
srun --kill-on-bad-exit=0 "$PY" run.py "hydra.run.dir=$RUN_DIR" "$@"
