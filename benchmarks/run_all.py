"""Run every benchmark, print a table of ratios against the reference and write the figures as JSON.

    python -m benchmarks.run_all [--quick] [--device cpu|cuda] [--dtype fp32|bf16] [--out results.json]
                                 [--threads N] [--only decoder_forward,train_step,matching] [--throughput]

The reference is the official `mobile_sam` PromptEncoder / MaskDecoder (same weights and inputs),
measured in the same process, interleaved with ours. See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
from typing import Dict, List, Optional

import torch

from benchmarks.common import machine_info

# Targets of issue 7: ours / reference (throughput) or reference / ours (time, memory).
TARGETS = {"decoder_forward": 2.5, "train_step_time": 2.0, "train_step_memory": 4.0, "matching": 10.0}

SIZES = {
    # full: 1024 px images (64x64 embedding), SAM's decoder dims.
    "full": dict(image_size=1024, decoder="mobilesam", fwd_prompts=64, fwd_reps=3, train_prompts=32, train_chunk=8, train_reps=3,
                 mem_prompts=[16, 32], ckpt_mem_prompts=[64], match=dict(prompts=256, candidates=3, objects=50, size=256), match_reps=3),
    # quick: same code paths on 256 px images (16x16 embedding) with the tiny decoder dims, for the
    # smoke test; one thread, so that a loaded machine does not stall it on thread barriers.
    "quick": dict(image_size=256, decoder="tiny", fwd_prompts=8, fwd_reps=1, train_prompts=4, train_chunk=2, train_reps=1,
                  mem_prompts=[2, 4], ckpt_mem_prompts=[8], match=dict(prompts=16, candidates=3, objects=8, size=64), match_reps=1),
}
CUDA_OVERRIDES = {"full": dict(fwd_prompts=256, fwd_reps=10, train_prompts=64, train_chunk=16, train_reps=5,
                               mem_prompts=[32, 64], ckpt_mem_prompts=[256], match_reps=10)}


def table(results: Dict[str, dict]) -> List[Dict[str, object]]:
    """Rows: name, unit, ref, ours, ratio (higher is better for ours), target."""
    rows: List[Dict[str, object]] = []
    f = results.get("decoder_forward")
    if f:
        rows.append(dict(name=f"decoder forward ({f['prompts']} prompts, {f['image_size']} px)", unit="prompts/s",
                         ref=f["ref_prompts_per_s"], ours=f["ours_prompts_per_s"], ratio=f["speedup"], cpu_ratio=f["cpu_speedup"],
                         target=TARGETS["decoder_forward"], key="decoder_forward"))
    t = results.get("train_step")
    if t:
        ctx = f"{t['prompts']} prompts, ckpt per {t['ckpt_chunk']}"
        rows.append(dict(name=f"train step time ({ctx})", unit="s", ref=t["ref_s"], ours=t["ours_ckpt_s"],
                         ratio=t["speedup"], cpu_ratio=t["cpu_speedup"], target=TARGETS["train_step_time"],
                         key="train_step_time"))
        rows.append(dict(name=f"train peak memory / prompt ({ctx})", unit="MB", ref=t["ref_peak_mb_per_prompt"],
                         ours=t["ours_ckpt_peak_mb_per_prompt"], ratio=t["memory_ratio"],
                         target=TARGETS["train_step_memory"], key="train_step_memory"))
        rows.append(dict(name="  train step time, no ckpt", unit="s", ref=t["ref_s"], ours=t["ours_s"],
                         ratio=t["speedup_no_ckpt"], cpu_ratio=t["cpu_speedup_no_ckpt"], target=None,
                         key="train_step_time_no_ckpt"))
        rows.append(dict(name="  train peak memory / prompt, no ckpt", unit="MB", ref=t["ref_peak_mb_per_prompt"],
                         ours=t["ours_peak_mb_per_prompt"], ratio=t["memory_ratio_no_ckpt"], target=None,
                         key="train_step_memory_no_ckpt"))
        if "ref_grid1024_gb" in t:
            rows.append(dict(name="  32x32 grid x 3 masks, fwd+bwd (extrapolated; ours = ckpt)", unit="GB",
                             ref=t["ref_grid1024_gb"], ours=t["ours_ckpt_grid1024_gb"],
                             ratio=t["ref_grid1024_gb"] / t["ours_ckpt_grid1024_gb"], target=None, key="grid_memory"))
            rows.append(dict(name="  32x32 grid x 3 masks, fwd+bwd, ours no ckpt", unit="GB",
                             ref=t["ref_grid1024_gb"], ours=t["ours_grid1024_gb"],
                             ratio=t["ref_grid1024_gb"] / t["ours_grid1024_gb"], target=None, key="grid_memory_no_ckpt"))
    m = results.get("matching")
    if m:
        rows.append(dict(name=f"IoU matrix + Hungarian ({m['prompts']}x{m['candidates']} vs {m['objects']}, {m['size']}^2)",
                         unit="ms", ref=m["ref_s"] * 1e3, ours=m["ours_s"] * 1e3, ratio=m["speedup"],
                         target=TARGETS["matching"], key="matching"))
    for r in rows:
        r.setdefault("cpu_ratio", None)
        r["met"] = None if r["target"] is None else bool(r["ratio"] >= r["target"])
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    head = (f"| {'benchmark':<62} | {'unit':<9} | {'reference':>10} | {'ours':>10} | {'ratio':>7} | {'target':>7} | met "
            f"| {'CPU-time ratio':>14} |")
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        target = "" if r["target"] is None else f">= {r['target']:g}x"
        met = "" if r["met"] is None else ("yes" if r["met"] else "NO")
        cpu = "" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}x"
        lines.append(
            f"| {r['name']:<62} | {r['unit']:<9} | {r['ref']:>10.4g} | {r['ours']:>10.4g} | {r['ratio']:>6.2f}x | {target:>7} "
            f"| {met:<3} | {cpu:>14} |"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test), not meaningful for speed")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: torch.autocast for ref and ours")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--only", default=None, help="comma list of decoder_forward,train_step,matching")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's default; --quick uses 1)")
    ap.add_argument("--throughput", action="store_true",
                    help="also images/s of a full-model training step and everything pass (32x32 grid)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")

    mode = "quick" if args.quick else "full"
    cfg = dict(SIZES[mode])
    if args.device == "cuda":
        cfg.update(CUDA_OVERRIDES.get(mode, {}))
    only = set(args.only.split(",")) if args.only else {"decoder_forward", "train_step", "matching"}
    threads = torch.get_num_threads()
    if args.threads or args.quick:
        torch.set_num_threads(args.threads or 1)
    info = machine_info(args.device)
    started = time.time()
    results: Dict[str, dict] = {}

    if "decoder_forward" in only:
        from benchmarks.decoder import bench_decoder_forward

        results["decoder_forward"] = bench_decoder_forward(
            cfg["image_size"], cfg["fwd_prompts"], cfg["fwd_reps"], args.device, args.dtype, cfg["decoder"])
        print(f"decoder forward done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if "train_step" in only:
        from benchmarks.train_step import bench_train_step

        results["train_step"] = bench_train_step(
            cfg["image_size"], cfg["train_prompts"], cfg["train_chunk"], cfg["train_reps"], args.device, args.dtype,
            mem_prompts=cfg["mem_prompts"], decoder_size=cfg["decoder"], ckpt_mem_prompts=cfg["ckpt_mem_prompts"])
        print(f"train step done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if "matching" in only:
        from benchmarks.matching import bench_matching

        results["matching"] = bench_matching(**cfg["match"], reps=cfg["match_reps"], device=args.device)
        print(f"matching done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if args.throughput:
        from benchmarks.throughput import bench_throughput

        results["throughput"] = bench_throughput(quick=args.quick, device=args.device, dtype=args.dtype)
        print(f"throughput done ({time.time() - started:.0f} s)", file=sys.stderr, flush=True)

    rows = table(results)
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    report = {
        "command": "python -m benchmarks.run_all " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "mode": mode, "dtype": args.dtype, "machine": info, "config": cfg, "targets": TARGETS,
        "wall_s": time.time() - started, "table": rows, "results": results,
    }
    print(f"\n{mode} benchmarks on {args.device} ({args.dtype}), torch {torch.__version__}, "
          f"{info.get('cpu', '')} x{info.get('cpu_count')}, {info.get('gpu', '')}".rstrip(", "))
    print(format_table(rows))
    if "throughput" in results:
        tp = results["throughput"]
        print(f"\nfull model, {tp['image_size']} px, {tp['grid']}x{tp['grid']} grid x 3 masks, batch {tp['batch']}: "
              f"everything pass {tp['forward_images_per_s']:.3g} images/s, "
              f"training step {tp['train_images_per_s']:.3g} images/s")
    torch.set_num_threads(threads)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
