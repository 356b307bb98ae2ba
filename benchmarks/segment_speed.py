"""Segment-everything speed: our EverythingGenerator vs the official SamAutomaticMaskGenerator.

    python -m benchmarks.segment_speed [--image coffee|PATH] [--points-per-side 16] [--crop-n-layers 0]
        [--reps 2] [--threads 2] [--device cpu|cuda] [--hierarchical] [--out experiments/benchmarks/segment_cpu.json]

Both generators run in one process on the same image with the same weights and parameters,
interleaved (reference, ours, reference, ours, ...) so that load from other processes hits both
alike; the figure is images/s from the median time of each. The weights are
`structured_mobilesam_state_dict` (a perturbed random MobileSAM whose decoder answers each point with
nested blobs): random weights give near-identical masks that the filters drop early, which would
flatter neither side realistically. Time is split into image encoder, mask decoder and the rest
(upsampling, filters, NMS, RLE) for each generator. The outputs are compared too (mask count, paired
mask IoU). With --hierarchical, our hierarchical mode is timed as well and its recall of the full
grid's masks (share of full-grid masks with an IoU >= 0.9 / 0.5 match) is reported.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List

warnings.filterwarnings("ignore", message="Overwriting tiny_vit")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="timm")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class PhaseTimer:
    """Accumulates wall time of wrapped callables by phase name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t: Dict[str, float] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def inner(*a, **k):
            _sync(self.device)
            t0 = time.perf_counter()
            out = fn(*a, **k)
            _sync(self.device)
            self.t[name] = self.t.get(name, 0.0) + time.perf_counter() - t0
            return out

        return inner


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_image(spec: str) -> np.ndarray:
    if spec == "coffee":
        from skimage import data

        return data.coffee()
    from PIL import Image

    return np.array(Image.open(spec).convert("RGB"))


def recall(full: List[dict], other: List[dict], thr: float) -> float:
    from mobilesam_se.inference import rle as rle_utils

    if not full:
        return 1.0
    if not other:
        return 0.0
    ious = rle_utils.iou_matrix([r["segmentation"] for r in full], [r["segmentation"] for r in other])
    return float((ious.max(1) >= thr).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="coffee")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--points-per-batch", type=int, default=64)
    ap.add_argument("--crop-n-layers", type=int, default=0)
    ap.add_argument("--pred-iou-thresh", type=float, default=0.88)
    ap.add_argument("--stability-score-thresh", type=float, default=0.92)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hierarchical", action="store_true")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)

    import mobile_sam

    from mobilesam_se.inference import EverythingGenerator
    from mobilesam_se.inference import rle as rle_utils
    from mobilesam_se.inference.synthetic import structured_mobilesam_state_dict
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.models.checkpoint import load_official_state_dict

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    image = load_image(args.image)

    torch.manual_seed(0)
    ref_model = mobile_sam.build_sam_vit_t()
    g = torch.Generator().manual_seed(0)
    sd = {k: (v + 0.05 * torch.randn(v.shape, generator=g) if v.dtype.is_floating_point and "running_var" not in k
              else (v.abs() + 0.5 + 0.1 * torch.rand(v.shape, generator=g) if "running_var" in k else v))
          for k, v in ref_model.state_dict().items()}
    from skimage import data as skdata

    weights = structured_mobilesam_state_dict(sd, skdata.coffee())
    ref_model.load_state_dict(weights)
    ref_model = ref_model.eval().to(device)
    ours_model = build_mobilesam(1024).eval()
    load_official_state_dict(ours_model, weights, "structured weights")
    ours_model = ours_model.to(device)

    params = dict(points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
                  pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
                  crop_n_layers=args.crop_n_layers, output_mode="coco_rle")

    # phase timers (instance attributes shadow the methods)
    t_ours, t_ref = PhaseTimer(device), PhaseTimer(device)
    ours_model.encode = t_ours.wrap("encoder", ours_model.encode)
    ours_model.predict_grid = t_ours.wrap("decoder", ours_model.predict_grid)
    ref_model.image_encoder.forward = t_ref.wrap("encoder", ref_model.image_encoder.forward)
    ref_model.mask_decoder.forward = t_ref.wrap("decoder", ref_model.mask_decoder.forward)

    ours_gen = EverythingGenerator(ours_model, **params)
    ref_gen = mobile_sam.SamAutomaticMaskGenerator(ref_model, **params)
    hier_gen = EverythingGenerator(ours_model, hierarchical=True, **params) if args.hierarchical else None

    runs = {"ours": ours_gen.generate}
    if not args.no_reference:
        runs = {"reference": ref_gen.generate, "ours": ours_gen.generate}
    if hier_gen is not None:
        runs["ours_hierarchical"] = hier_gen.generate
    timers = {"ours": t_ours, "reference": t_ref, "ours_hierarchical": t_ours}

    times: Dict[str, List[float]] = {k: [] for k in runs}
    phases: Dict[str, List[Dict[str, float]]] = {k: [] for k in runs}
    outputs: Dict[str, List[dict]] = {}
    # warm-up (allocator, lazy init) on a small grid, not timed
    EverythingGenerator(ours_model, **{**params, "points_per_side": 2}).generate(image)
    for rep in range(args.reps):
        for name, fn in runs.items():
            timer = timers[name]
            timer.t = {}
            _sync(device)
            t0 = time.perf_counter()
            outputs[name] = fn(image)
            _sync(device)
            total = time.perf_counter() - t0
            times[name].append(total)
            ph = dict(timer.t)
            ph["rest"] = total - sum(ph.values())
            ph["total"] = total
            phases[name].append(ph)
            print(f"rep {rep} {name:18s} {total:8.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in ph.items() if k != "total")
                  + f"  masks {len(outputs[name])}", flush=True)

    def med_phases(name):
        keys = phases[name][0].keys()
        return {k: statistics.median(p[k] for p in phases[name]) for k in keys}

    result = {
        "benchmark": "segment_everything",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "image": args.image, "image_hw": list(image.shape[:2]), "params": params, "reps": args.reps,
        "machine": {"cpu": cpu_name(), "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": str(device),
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                    "loadavg": os.getloadavg()},
        "weights": "structured_mobilesam_state_dict (perturbed random MobileSAM, hand-set decoder)",
    }
    for name in runs:
        med = statistics.median(times[name])
        result[name] = {"seconds": med, "images_per_s": 1.0 / med, "times": times[name], "phases_median": med_phases(name),
                        "masks": len(outputs[name])}
    if "ours_hierarchical" in runs:
        result["ours_hierarchical"]["points_decoded"] = hier_gen.stats["points_decoded"]
        result["ours_hierarchical"]["points_total"] = hier_gen.stats["points_total"]
        result["ours_hierarchical"]["recall_iou0.9"] = recall(outputs["ours"], outputs["ours_hierarchical"], 0.9)
        result["ours_hierarchical"]["recall_iou0.5"] = recall(outputs["ours"], outputs["ours_hierarchical"], 0.5)
        result["ours_hierarchical"]["speedup_vs_ours"] = result["ours"]["seconds"] / result["ours_hierarchical"]["seconds"]
    if "reference" in runs:
        result["speedup"] = result["reference"]["seconds"] / result["ours"]["seconds"]
        a, b = outputs["ours"], outputs["reference"]
        ious = rle_utils.iou_matrix([r["segmentation"] for r in a], [r["segmentation"] for r in b])
        result["parity"] = {"masks_ours": len(a), "masks_reference": len(b),
                            "min_paired_iou": float(ious.max(1).min()) if len(a) and len(b) else None}
        if "ours_hierarchical" in runs:
            result["ours_hierarchical"]["speedup_vs_reference"] = (
                result["reference"]["seconds"] / result["ours_hierarchical"]["seconds"])
        rp, op = result["reference"]["phases_median"], result["ours"]["phases_median"]
        print(f"\nreference {result['reference']['images_per_s']:.4f} img/s, ours {result['ours']['images_per_s']:.4f} img/s, "
              f"speedup {result['speedup']:.2f}x")
        for k in ("encoder", "decoder", "rest"):
            print(f"  {k:8s} reference {rp.get(k, 0):7.2f} s   ours {op.get(k, 0):7.2f} s   "
                  f"ratio {rp.get(k, 0) / max(op.get(k, 0), 1e-9):6.2f}x")
        print(f"  parity: {result['parity']}")
    if "ours_hierarchical" in runs:
        h = result["ours_hierarchical"]
        print(f"hierarchical: {h['images_per_s']:.4f} img/s ({h['speedup_vs_ours']:.2f}x ours), decoded "
              f"{h['points_decoded']}/{h['points_total']} points, recall@0.9 {h['recall_iou0.9']:.3f}, "
              f"recall@0.5 {h['recall_iou0.5']:.3f}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
