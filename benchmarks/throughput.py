"""Full-model throughput in images / second at 1024 px with a 32x32 point grid (3 masks per point).

- everything pass: encode + decode the whole grid, no autograd;
- training step: encode + decode the whole grid with activation checkpointing per prompt chunk,
  a simple loss over every mask and IoU prediction, backward, AdamW step. The Hungarian matching
  and the real losses are not included (the matching has its own row in run_all).

    python -m benchmarks.throughput [--quick] [--device cuda] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import autocast, interleaved_times, median, sync

SETTINGS = {
    # image size, model size, grid per side, batch, points_per_batch (fwd, train), reps
    "quick": dict(image_size=256, size="tiny", grid=4, batch=1, ppb_fwd=16, ppb_train=8, reps=1),
    "cpu": dict(image_size=1024, size="mobilesam", grid=32, batch=1, ppb_fwd=64, ppb_train=16, reps=1),
    "cuda": dict(image_size=1024, size="mobilesam", grid=32, batch=4, ppb_fwd=256, ppb_train=128, reps=5),
}


def bench_throughput(quick: bool, device: str, dtype: str, settings: Optional[dict] = None) -> Dict[str, object]:
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.prompts import grid_points_for_model

    s = dict(settings or SETTINGS["quick" if quick else ("cuda" if device.startswith("cuda") else "cpu")])
    size, B = s["image_size"], s["batch"]
    torch.manual_seed(0)
    model = build_mobilesam(size, size=s["size"], grad_checkpointing=True).to(device)  # acts in train(); forward() has no graph
    pts = grid_points_for_model(s["grid"], (size, size), size).to(device)
    points = pts[None].expand(B, -1, -1).contiguous()
    P = points.shape[1]
    pixels = torch.randn(B, 3, size, size, device=device)
    target = torch.rand(B, P, 3, device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def forward() -> None:
        model.eval()
        with torch.no_grad(), autocast(device, dtype):
            model.predict_grid(model.encode(pixels), points, points_per_batch=s["ppb_fwd"])

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            out = model.predict_grid(model.encode(pixels), points, points_per_batch=s["ppb_train"])
        loss = out.masks.float().sigmoid().mean() + F.mse_loss(out.iou_pred.float(), target)
        loss.backward()
        opt.step()

    times = interleaved_times({"forward": forward, "train": train}, s["reps"], device)
    peak_gb = None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        train()
        sync(device)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    fwd, trn = median(times["forward"]), median(times["train"])
    return {
        **s, "prompts_per_image": P, "dtype": dtype, "forward_s": fwd, "train_s": trn,
        "forward_images_per_s": B / fwd, "train_images_per_s": B / trn, "train_peak_gb": peak_gb, "times_s": times,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    r = bench_throughput(args.quick, args.device, args.dtype)
    print(f"{r['image_size']} px, {r['grid']}x{r['grid']} grid x 3 masks, batch {r['batch']}, {args.device} {args.dtype}: "
          f"everything pass {r['forward_images_per_s']:.3g} images/s ({r['forward_s']:.3g} s/batch), "
          f"training step {r['train_images_per_s']:.3g} images/s ({r['train_s']:.3g} s/batch)"
          + (f", train peak {r['train_peak_gb']:.1f} GB" if r["train_peak_gb"] is not None else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
