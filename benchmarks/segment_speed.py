"""Segment-everything speed: our EverythingGenerator vs the official SamAutomaticMaskGenerator.

    python -m benchmarks.segment_speed [--image coffee|PATH] [--points-per-side 16] [--crop-n-layers 0]
        [--reps 2] [--threads 2] [--device cpu|cuda] [--modes exact,bf16,hierarchical,hierarchical_bf16]
        [--ar-checkpoint best.pt] [--out experiments/benchmarks/segment_cpu.json]

Both generators run in one process on the same image with the same weights and parameters,
interleaved (reference, ours, reference, ours, ...) so that load from other processes hits both
alike; the figure is images/s from the median time of each. The weights are
`structured_mobilesam_state_dict` (a perturbed random MobileSAM whose decoder answers each point with
nested blobs): random weights give near-identical masks that the filters drop early, which would
flatter neither side realistically. Time is split into image encoder, mask decoder and the rest
(upsampling, filters, NMS, RLE) for each generator. The outputs are compared too (mask count, paired
mask IoU). `--modes` adds our opt-in fast modes to the same interleaved run (bf16 autocast, the
hierarchical grid, both): each gets its speed against the reference and against the exact mode, and
its cost against the exact mode's masks on the same image (mask count, paired IoU: for each exact
mask the best IoU among the mode's masks, min / median, and the share >= 0.9). `--ar-checkpoint`
also scores every mode's AMG output on the synthetic val split with that trained checkpoint (COCO
AR@100, class-agnostic, the checkpoint's tuned thresholds when it has them), in the same process.
`--hierarchical` is `--modes exact,hierarchical`.
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


MODES = {  # name -> EverythingGenerator options on top of the shared parameters
    "exact": {},
    "bf16": {"precision": "bf16"},
    "hierarchical": {"hierarchical": True},
    "hierarchical_bf16": {"hierarchical": True, "precision": "bf16"},
}
RUN_NAME = {"exact": "ours", "bf16": "ours_bf16", "hierarchical": "ours_hierarchical",
            "hierarchical_bf16": "ours_hierarchical_bf16"}


def paired_iou(exact: List[dict], other: List[dict]) -> Dict[str, object]:
    """Each exact-mode mask's best IoU among `other`'s masks: min / median / share >= 0.9 and 0.5."""
    from mobilesam_se.inference import rle as rle_utils

    if not exact:
        return {"min": None, "median": None, "share_0.9": None, "share_0.5": None}
    if not other:
        return {"min": 0.0, "median": 0.0, "share_0.9": 0.0, "share_0.5": 0.0}
    best = rle_utils.iou_matrix([r["segmentation"] for r in exact], [r["segmentation"] for r in other]).max(1)
    return {"min": float(best.min()), "median": float(np.median(best)), "share_0.9": float((best >= 0.9).mean()),
            "share_0.5": float((best >= 0.5).mean())}


def ar_by_mode(checkpoint: str, modes: List[str], points_per_side: int, max_images=None) -> Dict[str, object]:
    """COCO AR@100 (class-agnostic) of each mode's AMG output on the synthetic val split, with a trained
    checkpoint (its tuned thresholds when <stem>.amg.yaml is beside it). One ground truth, one set
    of detections per mode, scored by predicted IoU as in the evaluation CLI."""
    from hydra import compose, initialize_config_dir

    from mobilesam_se.evaluation.coco_eval import CocoMaskEval
    from mobilesam_se.inference import EverythingGenerator
    from mobilesam_se.inference.thresholds import read_tuned
    from mobilesam_se.tune import load_for_tuning

    overrides = [f"checkpoint={checkpoint}", "dataset=synthetic", "split=val", "device=cpu"]
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parent.parent / "conf"), version_base="1.3"):
        cfg = compose("tune", overrides=overrides)
    model, dataset = load_for_tuning(cfg, overrides)
    model = model.eval()
    tuned = read_tuned(checkpoint) or {}
    params = {"points_per_side": points_per_side, **{k: v for k, v in tuned.items() if v is not None}}
    gens = {m: EverythingGenerator(model, **params, **MODES[m]) for m in modes}
    ev = CocoMaskEval(max_dets=(100,))
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    seconds = {m: 0.0 for m in modes}
    for i in range(n):
        sample = dataset[i]
        image, gt = sample.image_uint8, sample.masks
        image_id = ev.add_image(image.shape[:2], gt)
        for m, g in gens.items():
            t0 = time.perf_counter()
            recs = g.generate(image)
            seconds[m] += time.perf_counter() - t0
            ev.add_detections(m, image_id, [r["segmentation"] for r in recs], [r["predicted_iou"] for r in recs])
    out = {"checkpoint": checkpoint, "images": n, "image_size": int(model.image_size), "params": params,
           "split": "synthetic val"}
    for m in modes:
        summ = ev.summarize(m)
        out[m] = {"AR_100": summ["AR_100"], "AP": summ["AP"], "dets_per_image": summ["num_dets"] / max(n, 1),
                  "seconds": seconds[m]}
    for m in modes:
        out[m]["AR_100_minus_exact"] = out[m]["AR_100"] - out["exact"]["AR_100"] if "exact" in out else None
    return out


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
    ap.add_argument("--hierarchical", action="store_true", help="= --modes exact,hierarchical")
    ap.add_argument("--modes", default="exact", help=f"comma list of {','.join(MODES)} (exact always runs)")
    ap.add_argument("--ar-checkpoint", default=None, help="trained checkpoint for AR@100 per mode on the synthetic val split")
    ap.add_argument("--ar-points-per-side", type=int, default=32)
    ap.add_argument("--ar-max-images", type=int, default=None)
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

    modes = ["exact"] + [m for m in args.modes.split(",") if m and m != "exact"]
    if args.hierarchical and "hierarchical" not in modes:
        modes.append("hierarchical")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown modes {unknown}; choose from {list(MODES)}")
    gens = {RUN_NAME[m]: EverythingGenerator(ours_model, **params, **MODES[m]) for m in modes}
    ref_gen = mobile_sam.SamAutomaticMaskGenerator(ref_model, **params)

    runs = {} if args.no_reference else {"reference": ref_gen.generate}
    runs.update({name: g.generate for name, g in gens.items()})
    timers = {name: (t_ref if name == "reference" else t_ours) for name in runs}

    times: Dict[str, List[float]] = {k: [] for k in runs}
    phases: Dict[str, List[Dict[str, float]]] = {k: [] for k in runs}
    outputs: Dict[str, List[dict]] = {}
    # warm-up (allocator, lazy init) on a small grid, not timed
    for m in modes:
        EverythingGenerator(ours_model, **{**params, "points_per_side": 2}, **MODES[m]).generate(image)
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
    for m in modes:
        name = RUN_NAME[m]
        r = result[name]
        r["mode"] = m
        r["options"] = MODES[m]
        r["points_decoded"] = gens[name].stats["points_decoded"]
        r["points_total"] = gens[name].stats["points_total"]
        r["speedup_vs_exact"] = result["ours"]["seconds"] / r["seconds"]
        r["paired_iou_vs_exact"] = paired_iou(outputs["ours"], outputs[name])
    if "ours_hierarchical" in runs:  # the keys of earlier JSON files
        h = result["ours_hierarchical"]
        h["recall_iou0.9"], h["recall_iou0.5"] = h["paired_iou_vs_exact"]["share_0.9"], h["paired_iou_vs_exact"]["share_0.5"]
        h["speedup_vs_ours"] = h["speedup_vs_exact"]
    if "reference" in runs:
        result["speedup"] = result["reference"]["seconds"] / result["ours"]["seconds"]
        a, b = outputs["ours"], outputs["reference"]
        ious = rle_utils.iou_matrix([r["segmentation"] for r in a], [r["segmentation"] for r in b])
        result["parity"] = {"masks_ours": len(a), "masks_reference": len(b),
                            "min_paired_iou": float(ious.max(1).min()) if len(a) and len(b) else None}
        for m in modes:
            result[RUN_NAME[m]]["speedup_vs_reference"] = result["reference"]["seconds"] / result[RUN_NAME[m]]["seconds"]
        rp, op = result["reference"]["phases_median"], result["ours"]["phases_median"]
        print(f"\nreference {result['reference']['images_per_s']:.4f} img/s, ours {result['ours']['images_per_s']:.4f} img/s, "
              f"speedup {result['speedup']:.2f}x")
        for k in ("encoder", "decoder", "rest"):
            print(f"  {k:8s} reference {rp.get(k, 0):7.2f} s   ours {op.get(k, 0):7.2f} s   "
                  f"ratio {rp.get(k, 0) / max(op.get(k, 0), 1e-9):6.2f}x")
        print(f"  parity: {result['parity']}")
    if args.ar_checkpoint:
        print("AR@100 per mode on the synthetic val split ...", flush=True)
        result["ar"] = ar_by_mode(args.ar_checkpoint, modes, args.ar_points_per_side, args.ar_max_images)
    print("\n| mode | s / image | vs reference | vs exact | masks | paired IoU vs exact min / median | >= 0.9 | points decoded |"
          + (" AR@100 | AR@100 - exact |" if "ar" in result else ""))
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if "ar" in result else ""))
    for m in modes:
        r = result[RUN_NAME[m]]
        pi = r["paired_iou_vs_exact"]
        vs_ref = f"{r['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in r else "-"
        fmt = lambda v: "-" if v is None else f"{v:.3f}"
        line = (f"| {m} | {r['seconds']:.2f} | {vs_ref} | {r['speedup_vs_exact']:.2f}x | {r['masks']} | "
                f"{fmt(pi['min'])} / {fmt(pi['median'])} | {fmt(pi['share_0.9'])} | {r['points_decoded']}/{r['points_total']} |")
        if "ar" in result:
            line += f" {result['ar'][m]['AR_100']:.4f} | {result['ar'][m]['AR_100_minus_exact']:+.4f} |"
        print(line)
    result["machine"]["loadavg_end"] = os.getloadavg()
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
