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


def compare_step_time(prompts: int, reps: int, image_size: int = 1024) -> Dict[str, object]:
    """Decoder forward + backward with checkpointing, the lean settings against the previous ones
    (one checkpointed piece per points_per_batch = `prompts`, no heap release), interleaved in this
    process; medians. The embedding requires grad, as when the encoder trains."""
    import torch

    import mobilesam_se.models.sam as sam_module
    from benchmarks.common import build_pair, interleaved_times, make_inputs, median, peak_memory_bytes

    pair = build_pair(image_size, "mobilesam")
    model = pair.ours.train()
    model.set_grad_checkpointing()
    emb, pts = make_inputs(pair, prompts)
    trim = sam_module._MALLOC_TRIM

    def step(lean: bool):
        def run() -> None:
            sam_module._MALLOC_TRIM = trim if lean else None
            model.checkpoint_chunk = None if lean else prompts
            model.zero_grad(set_to_none=True)
            x = emb.detach().requires_grad_(True)
            out = model.predict_grid(x, pts, points_per_batch=prompts)
            (out.masks.sigmoid().mean() + out.iou_pred.pow(2).mean()).backward()
        return run

    fns = {"previous": step(False), "lean": step(True)}
    cpu: Dict[str, list] = {}
    times = interleaved_times(fns, reps, "cpu", cpu_times=cpu)
    peaks = {k: peak_memory_bytes(f, "cpu") / 2**20 for k, f in fns.items()}
    sam_module._MALLOC_TRIM = trim
    model.checkpoint_chunk = None
    return {"prompts": prompts, "image_size": image_size, "reps": reps, "times_s": times, "cpu_times_s": cpu,
            "median_s": {k: median(v) for k, v in times.items()}, "peak_mb": peaks,
            "time_ratio_lean_over_previous": median(times["lean"]) / median(times["previous"]),
            "cpu_time_ratio_lean_over_previous": median(cpu["lean"]) / median(cpu["previous"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grids", default="8,16", help="comma list of dataset.grid_points (32 needs ~10 GB)")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    ap.add_argument("--step-time", type=int, default=0, metavar="P",
                    help="instead: time a P-prompt checkpointed decoder step, lean vs previous settings")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="extra run.py overrides, after --")
    args = ap.parse_args()
    if args.step_time:
        res = compare_step_time(args.step_time, args.reps, args.image_size)
        res["loadavg"] = os.getloadavg()
        m = res["median_s"]
        print(f"{args.step_time} prompts at {args.image_size} px, fwd+bwd with checkpointing: previous {m['previous']:.2f} s, "
              f"lean {m['lean']:.2f} s (x{res['time_ratio_lean_over_previous']:.2f} wall, "
              f"x{res['cpu_time_ratio_lean_over_previous']:.2f} CPU time); peak {res['peak_mb']['previous']:.0f} -> "
              f"{res['peak_mb']['lean']:.0f} MB")
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        return
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
