#!/bin/bash
# usage: experiments/learning/round7/exp.sh <run> [overrides...]
# One training at one thread (THREADS=N for more) on a snapshot of this checkout, in
# ${EXP_DIR:-/tmp/exp16}/runs/<run>, then evaluate on the val split (tuned and stock AMG).
set -e
run=$1; shift
repo=$(cd "$(dirname "$0")/../../.." && pwd)
d=${EXP_DIR:-/tmp/exp16}/runs/$run
mkdir -p "$d/src"
(cd "$repo" && tar cf - --anchored --exclude=./.venv --exclude=./outputs --exclude=./multirun --exclude=./.git --exclude=./data .) | (cd "$d/src" && tar xf -)
cd "$d/src"
source "$repo/.venv/bin/activate"
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
start=$(date +%s)
python run.py logger=none trainer.progress=false hydra.run.dir="$d/out" "$@" > "$d/train.log" 2>&1
echo "wall_s=$(( $(date +%s) - start ))" > "$d/wall.txt"
python -m mobilesam_se.evaluate checkpoint="$d/out/checkpoints/best.pt" > "$d/eval.txt" 2>&1
python -m mobilesam_se.evaluate checkpoint="$d/out/checkpoints/best.pt" generator.tuned=false > "$d/eval_stock.txt" 2>&1 || true
echo done > "$d/done"
