"""Search the AMG thresholds (predicted IoU, stability, box NMS) that fit a model, on a val split.

The grid candidates of every image are decoded once; each threshold combination then only
filters them (the AMG's own rules: predicted IoU > t, stability >= s, box NMS at n, one crop),
and is scored by class-agnostic COCO AR@100 (pycocotools) with F1 at IoU 0.5 (Hungarian) as the
tie-break. The stock values are always among the combinations, so "tuned" is never worse than
stock on the split it was tuned on.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mobilesam_se.evaluation.coco_eval import CocoMaskEval, encode_masks
from mobilesam_se.evaluation.metrics import aggregate, evaluate_image
from mobilesam_se.inference.thresholds import TUNED_KEYS

DEFAULT_GRID = {
    "pred_iou_thresh": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.88),
    "stability_score_thresh": (0.5, 0.7, 0.8, 0.9, 0.95),
    "box_nms_thresh": (0.5, 0.6, 0.7, 0.8),
}
OBJECTIVES = ("AR_100", "f1")


@dataclass
class _Image:
    hw: tuple
    gt: torch.Tensor  # (K, H, W) bool
    masks: torch.Tensor  # (q, H, W) bool: candidates that pass the loosest thresholds
    scores: torch.Tensor  # (q,)
    stability: torch.Tensor  # (q,)
    rles: List[dict] = field(default_factory=list)


@dataclass
class TuneResult:
    best: Dict[str, float]
    stock: Dict[str, float]  # metrics of the stock thresholds
    tuned: Dict[str, float]  # metrics of the best thresholds
    table: List[Dict[str, float]]  # every combination with its metrics
    objective: str
    num_images: int

    def summary(self) -> str:
        def row(name: str, th: Dict[str, float], m: Dict[str, float]) -> str:
            return (f"{name:7} pred_iou {th['pred_iou_thresh']:.2f}  stability {th['stability_score_thresh']:.2f}  "
                    f"nms {th['box_nms_thresh']:.2f}   AR@100 {m['AR_100']:.3f}  F1@0.5 {m['f1']:.3f}  "
                    f"masks/img {m['masks_per_image']:.1f}")
        return "\n".join([row("stock", TUNED_KEYS, self.stock), row("tuned", self.best, self.tuned)])


@torch.no_grad()
def _collect(model: nn.Module, dataset, device: torch.device, multimask_output: bool, points_per_batch: int,
             loosest: Dict[str, float], max_images: Optional[int], progress: bool) -> List[_Image]:
    from mobilesam_se.data.sample import collate_samples
    from mobilesam_se.evaluation.validation import full_res_candidates, predict_candidates

    n = len(dataset) if max_images is None else min(len(dataset), int(max_images))
    loader = DataLoader(Subset(dataset, range(n)), batch_size=1, shuffle=False, collate_fn=collate_samples)
    images: List[_Image] = []
    for batch in tqdm(loader, desc="tune: decode", unit="image", disable=not progress):
        logits, scores = predict_candidates(model, batch, device, multimask_output, points_per_batch)
        q, s = logits[0].flatten(0, 1), scores[0].flatten()
        masks, stability = full_res_candidates(q, batch.input_size[0], batch.orig_size[0],
                                               int(model.image_size), with_stability=True)
        keep = (s > loosest["pred_iou_thresh"]) & (stability >= loosest["stability_score_thresh"])
        keep &= masks.flatten(1).any(1)
        img = _Image(tuple(batch.orig_size[0]), batch.masks[0].bool().cpu(), masks[keep].cpu(),
                     s[keep].float().cpu(), stability[keep].float().cpu())
        img.rles = encode_masks(img.masks) if img.masks.shape[0] else []
        images.append(img)
    return images


def _score(images: List[_Image], th: Dict[str, float], max_dets: int = 100) -> Dict[str, float]:
    from mobilesam_se.evaluation.validation import amg_keep

    coco = CocoMaskEval((max_dets,))
    views = []
    kept_total = 0
    for img in images:
        iid = coco.add_image(img.hw, img.gt)
        keep = amg_keep(img.masks, img.scores, img.stability, th["pred_iou_thresh"], th["stability_score_thresh"],
                        th["box_nms_thresh"]) if img.masks.shape[0] else torch.zeros(0, dtype=torch.long)
        kept_total += int(keep.numel())
        coco.add_detections("amg", iid, [img.rles[i] for i in keep.tolist()], img.scores[keep])
        views.append(evaluate_image(img.masks[keep], img.scores[keep], img.gt))
    agg = aggregate(views)
    p, r = agg["micro_precision"], agg["micro_recall"]
    f1 = 0.0 if (math.isnan(p) or math.isnan(r) or p + r == 0) else 2 * p * r / (p + r)
    ar = coco.summarize("amg")[f"AR_{max_dets}"]
    return {"AR_100": 0.0 if math.isnan(ar) else ar, "f1": f1, "precision": p, "recall": r,
            "masks_per_image": kept_total / max(1, len(images))}


def tune_amg_thresholds(
    model: nn.Module,
    dataset,
    device: torch.device | str = "cpu",
    *,
    multimask_output: bool = True,
    points_per_batch: int = 64,
    grid: Optional[Dict[str, Sequence[float]]] = None,
    objective: str = "AR_100",
    search: str = "coordinate",
    max_passes: int = 3,
    max_images: Optional[int] = None,
    progress: bool = True,
) -> TuneResult:
    """Best thresholds of `grid` (default DEFAULT_GRID, always with the stock values) on `dataset`,
    by coordinate ascent from the stock values (`search="coordinate"`) or every combination ("grid")."""
    if search not in ("coordinate", "grid"):
        raise ValueError(f"search must be coordinate or grid, got {search!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    grid = {k: sorted(set(float(v) for v in (grid or DEFAULT_GRID).get(k, DEFAULT_GRID[k])) | {TUNED_KEYS[k]})
            for k in TUNED_KEYS}
    device = torch.device(device)
    model = model.to(device).eval()
    loosest = {k: min(v) for k, v in grid.items()}
    images = _collect(model, dataset, device, multimask_output, points_per_batch, loosest, max_images, progress)
    other = "f1" if objective == "AR_100" else "AR_100"

    def rank(r: Dict[str, float]):
        # Objective, then the other metric, then the setting closest to stock (fewest surprises).
        return (round(r[objective], 6), round(r[other], 6), -sum(abs(r[k] - TUNED_KEYS[k]) for k in TUNED_KEYS))

    scored: Dict[tuple, Dict[str, float]] = {}

    def evaluate(th: Dict[str, float]) -> Dict[str, float]:
        key = tuple(th[k] for k in TUNED_KEYS)
        if key not in scored:
            scored[key] = dict(th) | _score(images, th)
        return scored[key]

    stock_row = evaluate(dict(TUNED_KEYS))
    if search == "grid":
        for values in tqdm(list(itertools.product(*grid.values())), desc="tune: grid", disable=not progress):
            evaluate(dict(zip(grid, values)))
        best_row = max(scored.values(), key=rank)
    else:
        # Coordinate ascent from the stock values: one threshold at a time over its grid, the
        # others held, until a full pass changes nothing (a fraction of the grid's COCO evaluations).
        # Two starts: stock, and the loosest setting (where a model whose head under-predicts
        # keeps masks at all; from stock alone every one-key move can still keep nothing).
        loose_start = {"pred_iou_thresh": min(grid["pred_iou_thresh"]),
                       "stability_score_thresh": min(grid["stability_score_thresh"]), "box_nms_thresh": TUNED_KEYS["box_nms_thresh"]}
        finals = []
        for start in (stock_row, evaluate(loose_start)):
            row = start
            for _ in range(max_passes):
                before = tuple(row[k] for k in TUNED_KEYS)
                for key, values in grid.items():
                    rows = [evaluate({k: row[k] for k in TUNED_KEYS} | {key: v}) for v in values]
                    row = max(rows + [row], key=rank)
                if tuple(row[k] for k in TUNED_KEYS) == before:
                    break
            finals.append(row)
        best_row = max(finals, key=rank)
    table = list(scored.values())
    metric_keys = ("AR_100", "f1", "precision", "recall", "masks_per_image")
    return TuneResult(
        best={k: best_row[k] for k in TUNED_KEYS},
        stock={k: stock_row[k] for k in metric_keys},
        tuned={k: best_row[k] for k in metric_keys},
        table=table, objective=objective, num_images=len(images),
    )
