"""The GPU figures of issue 14 in one process: segment speed against the reference AMG, matched-precision
parity, bf16 drift, torch.compile on/off for the decoder, and a full-recipe training step.

    python -m benchmarks.gpu_checks [--device cuda] [--quick] [--parts segment,parity,train] [--out results.json]

- segment: images/s at a 32x32 grid on 1024-px photos (coffee and a COCO portrait, resized so the
  long side is 1024), ours (fp32 with TF32 off, bf16, bf16 + torch.compile'd decoder) and the official
  `SamAutomaticMaskGenerator`, same weights (`structured_mobilesam_state_dict`), interleaved, medians.
- parity: TF32 off, fp32: mask count, paired IoU (min; the AMG-identity test asks >= 0.99) and the
  largest predicted-IoU / stability difference of paired masks (<= 1e-3), per photo; bf16 drift
  against our fp32 masks: counts and the paired-IoU distribution.
- train: the full recipe step (1024 px, 32x32 grid, 3 masks, bf16 autocast, activation checkpointing,
  the real EverythingLoss with Hungarian matching, AdamW): images/s and peak GPU memory.
Every part also runs on the CPU (`--device cpu --quick`: 4x4 grid, a short step), which is how it is
tested; there the figures are a smoke test, not a measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import numpy as np
import torch

from benchmarks.common import machine_info, quiet_imports

quiet_imports()
ROOT = Path(__file__).resolve().parent.parent



def _recipe_loss():
    """The recipe's everything loss (experiment=seed_everything), from its YAML."""
    import sys

    from hydra.utils import instantiate

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.hydra_utils import compose_cfg

    return instantiate(compose_cfg(["experiment=seed_everything", "logger=none"]).loss)

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def no_tf32():
    """Matched precision: fp32 matmuls and convolutions really in fp32 on CUDA (TF32 off)."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def photos(long_side: int) -> Dict[str, np.ndarray]:
    """coffee and a COCO portrait (if the sample is beside the repository), long side resized."""
    from PIL import Image
    from skimage import data

    ims = {"coffee": data.coffee()}
    portrait = ROOT.parent / "shared" / "data" / "coco_sample" / "train" / "image" / "000000000036.jpg"
    ims["portrait"] = (np.array(Image.open(portrait).convert("RGB")) if portrait.is_file()
                       else np.ascontiguousarray(ims["coffee"].transpose(1, 0, 2)))
    out = {}
    for name, im in ims.items():
        h, w = im.shape[:2]
        s = long_side / max(h, w)
        out[name] = np.array(Image.fromarray(im).resize((round(w * s), round(h * s)), Image.BILINEAR))
    return out


def build_models(device: torch.device):
    """Ours and the reference with the same structured weights (as tests/test_segment_parity.py)."""
    import mobile_sam
    from skimage import data

    from mobilesam_se.inference.synthetic import structured_mobilesam_state_dict
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.models.checkpoint import load_official_state_dict

    torch.manual_seed(0)
    ref = mobile_sam.build_sam_vit_t()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in ref.state_dict().items():
        if not v.dtype.is_floating_point:
            sd[k] = v
        elif "running_var" in k:
            sd[k] = v.abs() + 0.5 + 0.1 * torch.rand(v.shape, generator=g)
        else:
            sd[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    weights = structured_mobilesam_state_dict(sd, data.coffee())
    ref.load_state_dict(weights)
    ours = build_mobilesam(1024).eval()
    load_official_state_dict(ours, weights, "structured weights")
    return ours.to(device), ref.eval().to(device)


def paired(a: List[dict], b: List[dict]) -> Dict[str, Any]:
    """Each of a's masks paired with its best-IoU mask of b: IoU distribution and score differences."""
    from mobilesam_se.inference import rle as rle_utils

    out: Dict[str, Any] = {"count_a": len(a), "count_b": len(b)}
    if not a or not b:
        return out
    ious = rle_utils.iou_matrix([r["segmentation"] for r in a], [r["segmentation"] for r in b])
    best, j = ious.max(1), ious.argmax(1)
    out.update(
        min_iou=float(best.min()), iou_quantiles={str(q): float(np.quantile(best, q)) for q in (0.01, 0.05, 0.5)},
        share_iou_ge_0_99=float((best >= 0.99).mean()), share_iou_ge_0_9=float((best >= 0.9).mean()),
        max_pred_iou_diff=float(max(abs(x["predicted_iou"] - b[k]["predicted_iou"]) for x, k in zip(a, j))),
        max_stability_diff=float(max(abs(x["stability_score"] - b[k]["stability_score"]) for x, k in zip(a, j))),
    )
    return out


def timed(fns: Dict[str, Callable[[], Any]], reps: int, device: torch.device) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def segment_and_parity(device: torch.device, grid: int, reps: int, compile_decoder: bool) -> Dict[str, Any]:
    import mobile_sam

    from mobilesam_se.inference import EverythingGenerator

    ours, ref = build_models(device)
    params = dict(points_per_side=grid, points_per_batch=64, pred_iou_thresh=0.88, stability_score_thresh=0.92,
                  output_mode="coco_rle")
    big_batch = dict(params, points_per_batch=grid * grid)  # on a GPU one decoder call per image
    gens = {
        "reference_fp32": mobile_sam.SamAutomaticMaskGenerator(ref, **params).generate,
        "ours_fp32": EverythingGenerator(ours, **big_batch).generate,
        "ours_bf16": EverythingGenerator(ours, precision="bf16", **big_batch).generate,
    }
    result: Dict[str, Any] = {"grid": grid, "params": params, "photos": {}}
    ims = photos(1024)
    with no_tf32():  # fp32 parity needs real fp32 on CUDA (TF32 flipped masks in the first GPU run)
        for name, im in ims.items():
            outs = {k: fn(im) for k, fn in gens.items()}  # also the warm-up
            result["photos"][name] = {
                "hw": list(im.shape[:2]),
                "fp32_vs_reference": paired(outs["ours_fp32"], outs["reference_fp32"]),
                "bf16_vs_fp32": paired(outs["ours_bf16"], outs["ours_fp32"]),
            }
        times = timed({k: (lambda fn=fn: [fn(im) for im in ims.values()]) for k, fn in gens.items()}, reps, device)
    if compile_decoder:
        # torch.compile of the decoder (off by default: on the CPU, compile time dominates); compile
        # time is the first call's, reported apart from the steady-state time.
        decoder = ours.mask_decoder
        ours.mask_decoder = torch.compile(decoder, dynamic=False)
        gen = EverythingGenerator(ours, precision="bf16", **big_batch).generate
        t0 = time.perf_counter()
        [gen(im) for im in ims.values()]
        _sync(device)
        result["compile_first_call_s"] = time.perf_counter() - t0
        times.update(timed({"ours_bf16_compiled": lambda: [gen(im) for im in ims.values()]}, reps, device))
        ours.mask_decoder = decoder
    n = len(ims)
    result["images_per_s"] = {k: n / statistics.median(v) for k, v in times.items()}
    result["times_s"] = times
    ips = result["images_per_s"]
    result["speedup_vs_reference"] = {k: v / ips["reference_fp32"] for k, v in ips.items() if k != "reference_fp32"}
    return result


def train_step(device: torch.device, quick: bool, reps: int) -> Dict[str, Any]:
    """The full recipe's step: encoder + 32x32x3 grid, bf16 autocast, checkpointing, real loss, AdamW."""
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.data.sample import Batch
    from mobilesam_se.objective import SegmentEverythingObjective
    from mobilesam_se.prompts import build_point_grid

    size, grid, batch = (256, 4, 1) if quick else (1024, 32, 4 if device.type == "cuda" else 1)
    torch.manual_seed(0)
    model = build_mobilesam(size, size="tiny" if quick else "mobilesam").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    low = size // 4
    yy, xx = torch.meshgrid(torch.arange(low), torch.arange(low), indexing="ij")
    rng = np.random.default_rng(0)
    gts = []
    for _ in range(batch):  # 30 discs per image as ground truth
        c = rng.uniform(0, low, (30, 2))
        r = rng.uniform(low / 40, low / 8, 30)
        gts.append(torch.stack([(yy - cy) ** 2 + (xx - cx) ** 2 < rr**2 for (cy, cx), rr in zip(c, r)]))
    pts = torch.as_tensor(build_point_grid(grid) * size, dtype=torch.float32)
    data = Batch(image=torch.randn(batch, 3, size, size), points=pts[None].expand(batch, -1, -1).contiguous(),
                 masks_lowres=gts)
    model.set_grad_checkpointing(True)
    objective = SegmentEverythingObjective(
        model, _recipe_loss(), multimask_output=True, points_per_batch=grid * grid if device.type == "cuda" else 64,
        autocast_dtype=torch.bfloat16)

    def step() -> None:
        objective(data)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = timed({"step": step}, reps, device)["step"]
    out: Dict[str, Any] = {"image_size": size, "grid": grid, "batch": batch, "masks_per_prompt": 3, "precision": "bf16",
                           "activation_checkpointing": True, "times_s": times,
                           "images_per_s": batch / statistics.median(times)}
    if device.type == "cuda":
        out["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main(argv=None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="4x4 grid, tiny training model: the CPU smoke test")
    ap.add_argument("--parts", default="segment,train")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    result: Dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine_info(args.device), "quick": args.quick}
    reps = 1 if args.quick else args.reps
    if "segment" in parts or "parity" in parts:
        compile_decoder = not args.no_compile and device.type == "cuda"
        result["segment"] = segment_and_parity(device, 4 if args.quick else 32, reps, compile_decoder)
        s = result["segment"]
        print("segment images/s: " + ", ".join(f"{k} {v:.3f}" for k, v in s["images_per_s"].items()))
        print("speedup vs reference: " + ", ".join(f"{k} {v:.2f}x" for k, v in s["speedup_vs_reference"].items()))
        for name, p in s["photos"].items():
            print(f"{name}: fp32 vs reference {json.dumps(p['fp32_vs_reference'])}")
            print(f"{name}: bf16 vs fp32 {json.dumps(p['bf16_vs_fp32'])}")
    if "train" in parts:
        result["train"] = t = train_step(device, args.quick, reps)
        print(f"train step ({t['image_size']} px, {t['grid']}x{t['grid']}x3, bf16, ckpt, batch {t['batch']}): "
              f"{t['images_per_s']:.3f} images/s" + (f", peak {t['peak_gpu_memory_gb']:.1f} GB" if "peak_gpu_memory_gb" in t else ""))
    result["machine"]["loadavg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
