"""Peak memory of a real everything-mode training run against grid size.

    python -m benchmarks.train_memory [--grids 8,16,32] [--image-size 1024] [--out results.json] [-- extra overrides]

Each grid size runs `python run.py model=mobilesam model.image_size=1024 model.activation_checkpointing=true
dataset.batch_size=1 trainer.max_steps=2 trainer.val_every=0 dataset.grid_points=G logger=none` in a
subprocess of its own (the synthetic data, fp32 on the CPU), and its peak resident set size is the
kernel's `ru_maxrss` of that child (`os.wait4`), so every byte the step touches counts (weights,
optimizer state, activations, allocator slack) and no run inherits another's heap. The slope between
the two largest grids is the memory per prompt; the fixed part is what the encoder, the optimizer
and one recomputed decoder chunk need whatever the grid.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
MB = 1024.0  # ru_maxrss is in KiB on Linux


def command(grid: int, image_size: int, extra: List[str], run_dir: str) -> List[str]:
    """The run.py command of issue 14 item 5 for one grid size (outputs in a throw-away directory)."""
    return [
        sys.executable, str(ROOT / "run.py"), "model=mobilesam", f"model.image_size={image_size}",
        "model.activation_checkpointing=true", "dataset.batch_size=1", "trainer.max_steps=2",
        "trainer.val_every=0", f"dataset.grid_points={grid}", "logger=none", f"hydra.run.dir={run_dir}", *extra,
    ]


def measure(grid: int, image_size: int, extra: List[str]) -> Dict[str, object]:
    """Run one training subprocess; its peak RSS (MB) and wall time."""
    with tempfile.TemporaryDirectory(prefix="train_memory_") as tmp:
        cmd = command(grid, image_size, extra, tmp)
        env = dict(os.environ, WANDB_MODE="disabled")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the max over all runs so far.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"grid {grid}: run.py exited with {code}:\n{err[-3000:]}")
    return {"grid": grid, "prompts": grid * grid, "peak_rss_mb": usage.ru_maxrss / MB, "wall_s": wall,
            "command": " ".join(cmd[1:]).replace(str(ROOT) + "/", "")}


def fit(rows: List[Dict[str, object]]) -> Dict[str, float]:
    """Linear peak = fixed + slope * prompts through the two largest grids measured."""
    a, b = sorted(rows, key=lambda r: r["prompts"])[-2:]
    slope = (b["peak_rss_mb"] - a["peak_rss_mb"]) / (b["prompts"] - a["prompts"])
    fixed = a["peak_rss_mb"] - slope * a["prompts"]
    return {"fixed_mb": fixed, "mb_per_prompt": slope, "grid32_extrapolated_mb": fixed + slope * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", default="8,16", help="comma list of dataset.grid_points (32 needs ~10 GB)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    ap.add_argument("overrides", nargs="*", help="extra run.py overrides, after --")
    args = ap.parse_args()
    grids = [int(g) for g in args.grids.split(",")]
    load0 = os.getloadavg()
    rows = []
    for g in grids:
        r = measure(g, args.image_size, args.overrides)
        rows.append(r)
        print(f"grid {g:3d} ({r['prompts']:5d} prompts): peak RSS {r['peak_rss_mb']:8.0f} MB  ({r['wall_s']:.0f} s)", flush=True)
    result: Dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "image_size": args.image_size, "overrides": args.overrides, "runs": rows,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(), "cpus": os.cpu_count(),
    }
    if len(rows) >= 2:
        result["fit"] = fit(rows)
        f = result["fit"]
        print(f"fit over the two largest grids: {f['fixed_mb']:.0f} MB + {f['mb_per_prompt']:.2f} MB/prompt; "
              f"32x32 grid: {f['grid32_extrapolated_mb'] / 1024:.2f} GB (extrapolated)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
