"""The segment-everything evaluation, shared by `python -m mobilesam_se.evaluate` and training.

Per image, on top of `evaluation.validation.validate` (Hungarian dice / IoU / recall over all candidates,
precision after the predicted-IoU filter and NMS), an `EverythingEvaluator` collects:

- COCO mask AP / AR (class-agnostic, pycocotools) of
  (a) the raw candidates: all P x M grid candidates ranked by predicted IoU, the best
      max(max_dets) = 1000 kept, no filtering or NMS;
  (b) the stock AMG output: `mobilesam_se.inference.amg.EverythingGenerator` with its default
      thresholds (predicted IoU, stability, box NMS), scored by predicted IoU;
- the calibration of the IoU head: each candidate's predicted IoU against its IoU with the
  best-matching gt mask (reliability bins, ECE, MAE) and the share of candidates whose predicted
  IoU passes the AMG thresholds.

    report = evaluate_everything(model, dataset, device="cpu", generator={"points_per_side": 8})
    print(report.table())
    report.plot_calibration("calibration.png")
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mobilesam_se.evaluation.calibration import best_match_iou, plot_reliability, reliability, survival
from mobilesam_se.evaluation.coco_eval import CocoMaskEval

MAX_DETS = (10, 100, 1000)
SURVIVE = (0.88, 0.95)


def build_generator(model: nn.Module, **kwargs: Any):
    """The AMG (`EverythingGenerator`) on `model` with the given options (the rest at their defaults)."""
    from mobilesam_se.inference.amg import EverythingGenerator

    return EverythingGenerator(model, **kwargs)


def threshold_tag(t: float) -> str:
    """0.88 -> "88", 0.875 -> "87_5": metric names W&B can sort and filter ([A-Za-z0-9_] only)."""
    return f"{100 * t:g}".replace(".", "_")


class EverythingEvaluator:
    """Collects COCO detections and calibration pairs image by image (see the module docstring).

    `generator`: an object with `.generate(image_uint8) -> list of AMG records` (segmentation as
    COCO RLE or a binary mask, predicted_iou), or None to skip the AMG-filtered evaluation.
    `progress`: a tqdm bar over images with this total (None: no bar).
    """

    def __init__(
        self,
        generator: Any = None,
        max_dets: Sequence[int] = MAX_DETS,
        calibration_bins: int = 10,
        survive: Sequence[float] = SURVIVE,
        progress_total: Optional[int] = None,
        progress: bool = False,
    ) -> None:
        self.generator = generator
        self.coco = CocoMaskEval(max_dets)
        self.calibration_bins = int(calibration_bins)
        self.survive = tuple(float(t) for t in survive)
        self.pred_iou: List[np.ndarray] = []
        self.true_iou: List[np.ndarray] = []
        self.num_candidates = 0
        self.num_amg = 0
        self.image_ids: List[str] = []
        self.bar = tqdm(total=progress_total, desc="evaluate", unit="image", disable=not progress)
        self._summary: Optional[Dict[str, float]] = None
        self._reliability: Optional[Dict[str, Any]] = None

    @torch.no_grad()
    def add(
        self,
        image_id: str,
        masks: torch.Tensor,
        scores: torch.Tensor,
        gt: torch.Tensor,
        image_uint8: Optional[np.ndarray] = None,
    ) -> None:
        """One image: (Q, H, W) bool full-resolution candidates with (Q,) predicted IoUs, (K, H, W) gt."""
        hw = tuple(gt.shape[-2:])
        iid = self.coco.add_image(hw, gt)
        self.image_ids.append(str(image_id))
        scores = scores.detach().float().flatten()
        self.coco.add_detections("raw", iid, masks, scores)
        self.num_candidates += int(masks.shape[0])
        self.pred_iou.append(scores.cpu().numpy())
        self.true_iou.append(best_match_iou(masks, gt).cpu().numpy())
        if self.generator is not None:
            if image_uint8 is None:
                raise ValueError(
                    "the AMG evaluation needs the original image: build the dataset with keep_original=True "
                    "(or turn the AMG evaluation off)"
                )
            records = self.generator.generate(image_uint8)
            self.num_amg += len(records)
            self.coco.add_detections(
                "amg", iid, [r["segmentation"] for r in records], [float(r["predicted_iou"]) for r in records]
            )
        self._summary = self._reliability = None
        self.bar.update(1)

    # -- results ---------------------------------------------------------------------------------
    @property
    def reliability(self) -> Dict[str, Any]:
        if self._reliability is None:
            pred = np.concatenate(self.pred_iou) if self.pred_iou else np.zeros(0)
            true = np.concatenate(self.true_iou) if self.true_iou else np.zeros(0)
            self._reliability = reliability(pred, true, self.calibration_bins)
        return self._reliability

    def summarize(self) -> Dict[str, float]:
        """Flat metrics: coco_raw/*, coco_amg/* (with a generator) and calibration/*."""
        if self._summary is not None:
            return dict(self._summary)
        self.bar.close()
        out: Dict[str, float] = {}
        sets = ["raw"] + (["amg"] if self.generator is not None else [])
        for name in sets:
            for k, v in self.coco.summarize(name).items():
                out[f"coco_{name}/{k}"] = v
        n = max(1, self.coco.num_images)
        out["coco_raw/dets_per_image"] = out.pop("coco_raw/num_dets") / n
        if self.generator is not None:
            out["coco_amg/dets_per_image"] = out.pop("coco_amg/num_dets") / n
        rel = self.reliability
        out["calibration/ece"] = rel["ece"]
        out["calibration/mae"] = rel["mae"]
        out["calibration/mean_pred_iou"] = rel["mean_pred_iou"]
        out["calibration/mean_true_iou"] = rel["mean_true_iou"]
        pred = np.concatenate(self.pred_iou) if self.pred_iou else np.zeros(0)
        true = np.concatenate(self.true_iou) if self.true_iou else np.zeros(0)
        for t, share in survival(pred, self.survive).items():
            out[f"calibration/pred_above_{threshold_tag(t)}"] = share
            out[f"calibration/true_above_{threshold_tag(t)}"] = float((true > t).mean()) if true.size else float("nan")
        out["calibration/candidates_per_image"] = self.num_candidates / n
        self._summary = out
        return dict(out)

    def plot_calibration(self, path: Optional[Union[str, Path]] = None, ax=None, title: Optional[str] = None):
        return plot_reliability(self.reliability, None if path is None else str(path), ax=ax, title=title)


@dataclass
class EverythingReport:
    """What `evaluate_everything` returns: flat metrics, reliability bins and run information."""

    metrics: Dict[str, float]
    reliability: Dict[str, Any]
    info: Dict[str, Any] = field(default_factory=dict)

    def grouped(self) -> Dict[str, Dict[str, float]]:
        """{"hungarian": {...}, "coco_raw": {...}, "coco_amg": {...}, "calibration": {...}}"""
        groups: Dict[str, Dict[str, float]] = {}
        for k, v in self.metrics.items():
            head, sep, rest = k.partition("/")
            if k.rpartition("/")[2].startswith("num_") and isinstance(v, float) and v.is_integer():
                v = int(v)  # counts
            if sep:
                groups.setdefault(head, {})[rest] = v
            else:
                groups.setdefault("hungarian", {})[k] = v
        return groups

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = dict(self.grouped())
        out["reliability"] = self.reliability
        out["info"] = self.info
        return _json_safe(out)

    def save(self, out_dir: Union[str, Path], plot: bool = True) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.json"
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        if plot:
            self.plot_calibration(out_dir / "calibration.png")
        return path

    def plot_calibration(self, path: Optional[Union[str, Path]] = None, ax=None, title: Optional[str] = None):
        return plot_reliability(self.reliability, None if path is None else str(path), ax=ax, title=title)

    def table(self) -> str:
        return format_table(self.metrics, self.info)


def _json_safe(obj: Any) -> Any:
    """NaN -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if math.isnan(float(obj)) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def format_table(m: Dict[str, float], info: Optional[Dict[str, Any]] = None) -> str:
    """The printed summary: Hungarian metrics, COCO AP / AR of both detection sets, calibration."""
    info = info or {}
    n = info.get("num_images", m.get("num_images"))
    where = "/".join(str(info[k]) for k in ("dataset", "split") if info.get(k))
    head = f"{int(n) if n is not None else '?'} images" + (f" ({where})" if where else "")
    if "num_gt" in m:
        head += f", {int(m['num_gt'])} gt masks"
    if "calibration/candidates_per_image" in m:
        head += f", {m['calibration/candidates_per_image']:.0f} candidates / image"
    lines = [head]
    if "checkpoint" in info:
        lines.append(f"checkpoint: {info['checkpoint'] or 'none (random init)'}")
    kept = m.get("num_pred", float("nan")) / n if n else float("nan")
    lines += [
        "",
        f"{'Hungarian matching, all candidates':38}dice {_fmt(m.get('dice'))}   IoU {_fmt(m.get('iou'))}"
        f"   recall@0.5 {_fmt(m.get('recall'))}",
        f"{'Filtered (pred IoU >= 0.5, NMS 0.7)':38}precision@0.5 {_fmt(m.get('precision'))}"
        f"   masks / image {'-' if math.isnan(kept) else f'{kept:.1f}'}",
        "",
    ]
    ar = [k.split("/", 1)[1] for k in m if k.startswith("coco_raw/AR_") and k.count("_") == 2]
    cols = ["AP", "AP50", "AP75"] + sorted(ar, key=lambda c: int(c[3:]))
    lines.append(f"{'COCO mask AP / AR (class-agnostic)':38}" + "".join(f"{c.replace('AR_', 'AR@'):>8}" for c in cols)
                 + f"{'dets/img':>10}")
    amg_label = "AMG output (" + str(info.get("amg_thresholds", "stock")).split(" (")[0] + " filters)"
    for name, label in (("coco_raw", "raw candidates, by predicted IoU"), ("coco_amg", amg_label)):
        if f"{name}/AP" in m:
            lines.append(f"{label:38}" + "".join(f"{_fmt(m.get(f'{name}/{c}')):>8}" for c in cols)
                         + f"{m.get(f'{name}/dets_per_image', float('nan')):>10.1f}")
    lines += [
        "",
        f"{'IoU head calibration':38}ECE {_fmt(m.get('calibration/ece'))}   MAE {_fmt(m.get('calibration/mae'))}"
        f"   mean predicted {_fmt(m.get('calibration/mean_pred_iou'))} / true {_fmt(m.get('calibration/mean_true_iou'))}",
    ]
    for t in info.get("survive") or SURVIVE:
        tag = threshold_tag(t)
        if f"calibration/pred_above_{tag}" in m:
            lines.append(f"{f'candidates with IoU > {t:g}':38}predicted {_fmt(m[f'calibration/pred_above_{tag}'], pct=True)}"
                         f"   true {_fmt(m.get(f'calibration/true_above_{tag}'), pct=True)}")
    return "\n".join(lines)


def evaluate_everything(
    model: nn.Module,
    dataset,
    device: Union[str, torch.device] = "cpu",
    *,
    multimask_output: bool = True,
    points_per_batch: int = 64,
    batch_size: int = 1,
    num_workers: int = 0,
    autocast_dtype: Optional[torch.dtype] = None,
    max_images: Optional[int] = None,
    generator: Union[None, bool, Dict[str, Any], Any] = True,
    calibration_bins: int = 10,
    survive: Sequence[float] = SURVIVE,
    max_dets: Sequence[int] = MAX_DETS,
    progress: bool = True,
    info: Optional[Dict[str, Any]] = None,
) -> EverythingReport:
    """Evaluate `model` on every image of `dataset` (a MaskDataset of `Sample`s with original images).

    `generator`: True (the AMG with default thresholds, points_per_side = the dataset's grid),
    a dict of `EverythingGenerator` options, an already built generator, or None / False (skip
    the AMG-filtered evaluation).
    """
    from mobilesam_se.data.sample import collate_samples
    from mobilesam_se.evaluation.validation import validate

    device = torch.device(device)
    model = model.to(device)
    image_size = int(getattr(model, "image_size", getattr(dataset, "image_size", 1024)))
    if getattr(dataset, "image_size", image_size) != image_size:
        raise ValueError(f"the dataset prepares {dataset.image_size}px inputs but the model takes {image_size}px")
    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    gen = _resolve_generator(model, generator, dataset, points_per_batch, multimask_output)
    evaluator = EverythingEvaluator(gen, max_dets, calibration_bins, survive, progress_total=n, progress=progress)
    loader = DataLoader(Subset(dataset, range(n)), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_samples, num_workers=num_workers)
    metrics, _ = validate(
        model, loader, device, image_size, multimask_output, points_per_batch, autocast_dtype,
        max_images=n, progress=False, evaluator=evaluator,
    )
    full_info = {"num_images": n, "image_size": image_size, "multimask_output": multimask_output,
                 "amg": gen is not None, "max_dets": list(max_dets), "survive": [float(t) for t in survive]}
    if isinstance(generator, dict):
        full_info["generator"] = dict(generator)
    full_info.update(info or {})
    return EverythingReport(metrics=metrics, reliability=evaluator.reliability, info=full_info)


def _resolve_generator(model: nn.Module, generator: Any, dataset, points_per_batch: int, multimask_output: bool = True):
    if generator is None or generator is False:
        return None
    if generator is True or isinstance(generator, dict):
        # The AMG decodes the mask tokens the raw candidates come from (a single-mask model: token 0).
        kwargs = {"points_per_side": int(getattr(dataset, "grid_points", 32)), "points_per_batch": points_per_batch,
                  "multimask_output": multimask_output}
        if isinstance(generator, dict):
            kwargs.update({k: v for k, v in generator.items() if v is not None})
        return build_generator(model, **kwargs)
    return generator


def figure_to_rgb(fig) -> np.ndarray:
    """A matplotlib figure as an (H, W, 3) uint8 image (for W&B)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
