"""Validation in everything mode: the recipe's Hungarian Dice/IoU plus recall and precision at 0.5,
the IoU head's calibration, and (`Validator`) what the trainer runs at each validation."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mobilesam_se.data.sample import Batch
from mobilesam_se.evaluation.calibration import best_match_iou
from mobilesam_se.evaluation.metrics import aggregate, evaluate_image, summarize_views
from mobilesam_se.matching import hungarian_match, mask_iou_matrix
from mobilesam_se.precision import autocast
from mobilesam_se.transforms import postprocess_masks


# The stock SamAutomaticMaskGenerator filters, for the calibration guard of every validation.
STOCK_AMG = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "box_nms_thresh": 0.7}
STABILITY_OFFSET = 1.0


def full_res_candidates(
    logits: torch.Tensor, input_hw: Tuple[int, int], orig_hw: Tuple[int, int], image_size: int, chunk: int = 64,
    with_stability: bool = False,
):
    """(Q, S/4, S/4) low-res logits -> (Q, H, W) bool masks at the original size, chunk by chunk;
    with `with_stability` also the (Q,) AMG stability scores of the full-size logits
    (area above +offset over area above -offset, as SAM's `calculate_stability_score`)."""
    out, stability = [], []
    for s in range(0, logits.shape[0], chunk):
        full = postprocess_masks(logits[s : s + chunk].float(), input_hw, orig_hw, image_size)
        out.append(full > 0)
        if with_stability:
            hi = (full > STABILITY_OFFSET).flatten(1).sum(1, dtype=torch.int32)
            lo = (full > -STABILITY_OFFSET).flatten(1).sum(1, dtype=torch.int32)
            stability.append(hi.float() / lo.float().clamp_min(1.0) * (lo > 0))
    masks = torch.cat(out) if out else torch.zeros((0, *orig_hw), dtype=torch.bool, device=logits.device)
    if not with_stability:
        return masks
    return masks, (torch.cat(stability) if stability else torch.zeros(0, device=logits.device))


def amg_keep(
    masks: torch.Tensor, scores: torch.Tensor, stability: torch.Tensor,
    pred_iou_thresh: float = STOCK_AMG["pred_iou_thresh"],
    stability_score_thresh: float = STOCK_AMG["stability_score_thresh"],
    box_nms_thresh: float = STOCK_AMG["box_nms_thresh"],
) -> torch.Tensor:
    """Indices of the candidates the AMG (one crop, no small-region clean-up) keeps from these
    grid candidates: predicted IoU > pred_iou_thresh, stability >= stability_score_thresh, then
    box NMS by predicted IoU; with the defaults, what `EverythingGenerator` (stock) returns for the
    same grid and weights."""
    from torchvision.ops import masks_to_boxes, nms

    keep = torch.nonzero((scores > pred_iou_thresh) & (stability >= stability_score_thresh)).flatten()
    keep = keep[masks[keep].flatten(1).any(1)]
    if keep.numel() == 0:
        return keep
    boxes = masks_to_boxes(masks[keep])  # XYXY with the inclusive max corner, as SAM's boxes
    return keep[nms(boxes, scores[keep].float(), box_nms_thresh)]


@torch.no_grad()
def predict_candidates(model: nn.Module, batch: Batch, device: torch.device, multimask_output: bool,
                       points_per_batch: int, autocast_dtype: Optional[torch.dtype] = None):
    pixels = batch.image.to(device)
    with autocast(device, autocast_dtype):
        out = model(pixels, batch.points.to(device), multimask_output=multimask_output, points_per_batch=points_per_batch)
    return out.masks.float(), out.iou_pred.float()


@torch.no_grad()
def validate(
    model: nn.Module,
    loader,
    device: torch.device,
    image_size: int,
    multimask_output: bool,
    points_per_batch: int,
    autocast_dtype: Optional[torch.dtype] = None,
    score_thresh: float = 0.5,
    nms_iou: float = 0.7,
    max_images: Optional[int] = None,
    progress: bool = True,
    keep_visuals: int = 0,
    evaluator=None,
) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    """Mean metrics over the loader's images, and up to `keep_visuals` items for pictures.

    - dice / iou / recall: every candidate takes part in the Hungarian assignment (the recipe's
      score: how well the best one-to-one pairing covers the objects);
    - precision (and recall_filtered): only candidates whose predicted IoU >= score_thresh, after
      mask NMS at nms_iou, so spurious confident masks count against the model.

    `evaluator` (an `evaluation.evaluator.EverythingEvaluator`) also receives every image's
    candidates; its COCO AP / AR and calibration metrics are merged into the result.
    """
    was_training = model.training
    model.eval()
    all_views: List[Dict[str, float]] = []
    filtered_views: List[Dict[str, float]] = []
    amg_views: List[Dict[str, float]] = []
    calib_pred: List[torch.Tensor] = []
    calib_true: List[torch.Tensor] = []
    visuals: List[Dict[str, Any]] = []
    n_seen = 0
    bar = tqdm(loader, desc="val", leave=False, disable=not progress)
    for batch in bar:
        logits, scores = predict_candidates(model, batch, device, multimask_output, points_per_batch, autocast_dtype)
        for b in range(logits.shape[0]):
            if max_images is not None and n_seen >= max_images:
                break
            n_seen += 1
            q = logits[b].flatten(0, 1)
            s = scores[b].flatten()
            gt = batch.masks[b].to(device)
            masks, stability = full_res_candidates(q, batch.input_size[b], batch.orig_size[b], image_size,
                                                   with_stability=True)
            everything = evaluate_image(masks, s, gt)
            filtered = evaluate_image(masks, s, gt, score_thresh=score_thresh, nms_iou=nms_iou)
            amg = amg_keep(masks, s, stability)
            amg_views.append(evaluate_image(masks[amg], s[amg], gt))
            calib_pred.append(s.clamp(0, 1).cpu())
            calib_true.append(best_match_iou(masks, gt).cpu())
            if evaluator is not None:
                originals = batch.image_uint8
                evaluator.add(batch.image_id[b], masks, s, gt, originals[b] if originals else None)
            all_views.append(everything)
            filtered_views.append(filtered)
            if len(visuals) < keep_visuals and batch.image_uint8 and batch.image_uint8[b] is not None:
                matched = _matched_masks(masks, gt)
                m = masks.shape[0] // batch.points.shape[1]
                visuals.append({
                    "image_id": batch.image_id[b], "image": batch.image_uint8[b],
                    "gt": gt.cpu().numpy(), "pred": masks[matched].cpu().numpy(),
                    "points": _points_in_original(batch.points[b], batch.orig_size[b], image_size).numpy(),
                    "points_matched": np.unique(matched.cpu().numpy() // m),
                })
        if max_images is not None and n_seen >= max_images:
            break
    if was_training:
        model.train()
    metrics = summarize_views(all_views, filtered_views) if all_views else {}
    if all_views:
        metrics.update(calibration_summary(torch.cat(calib_pred), torch.cat(calib_true), amg_views))
    if evaluator is not None:
        metrics.update(evaluator.summarize())
    return {k: float(v) for k, v in metrics.items()}, visuals


def _matched_masks(masks: torch.Tensor, gt: torch.Tensor, min_iou: float = 0.5) -> torch.Tensor:
    """Indices of candidates in a Hungarian pair with IoU >= min_iou."""
    if gt.shape[0] == 0 or masks.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=masks.device)
    iou = mask_iou_matrix(masks, gt)
    pi, gi = hungarian_match(iou)
    keep = iou[pi, gi] >= min_iou
    return pi[keep]


def _points_in_original(points: torch.Tensor, orig_hw: Tuple[int, int], image_size: int) -> torch.Tensor:
    """Resized-frame points back to original pixels (for drawing)."""
    scale = image_size / max(orig_hw)
    return points.float() / scale


def calibration_summary(pred: torch.Tensor, true: torch.Tensor, amg_views: List[Dict[str, float]]) -> Dict[str, float]:
    """The calibration guard: is the IoU head an IoU estimate the stock AMG thresholds can use?

    calibration/mean_pred_iou, mean_true_iou and gap (|difference|) over every candidate
    (predictions clipped to [0, 1], true = IoU with the best-matching gt); the shares of
    candidates above 0.88 predicted and true; amg/masks_per_image and amg/recall (at IoU 0.5)
    of the stock AMG filters applied to the same candidates.
    """
    t = STOCK_AMG["pred_iou_thresh"]
    n = max(1, len(amg_views))
    mean_pred, mean_true = float(pred.double().mean()), float(true.double().mean())
    amg = aggregate(amg_views)
    return {
        "calibration/mean_pred_iou": mean_pred,
        "calibration/mean_true_iou": mean_true,
        "calibration/gap": abs(mean_pred - mean_true),
        "calibration/pred_above_88": float((pred > t).double().mean()),
        "calibration/true_above_88": float((true > t).double().mean()),
        "amg/masks_per_image": amg["num_pred"] / n,
        "amg/recall": amg["recall"],
        "amg/precision": amg["precision"],
    }


@dataclass
class ValidationResult:
    metrics: Dict[str, float]
    visuals: List[Dict[str, Any]]  # for `engine.pictures`
    figures: Dict[str, np.ndarray]  # name -> RGB image (the reliability diagram when COCO eval ran)


class Validator:
    """The validation a training run does, with the settings of its data and model; the trainer
    says when (COCO metrics, the real AMG and the prompted evaluation are each asked for per call)."""

    def __init__(
        self,
        dataset,
        *,
        batch_size: int = 1,
        num_workers: int = 0,
        image_size: int,
        multimask_output: bool = True,
        points_per_batch: int = 64,
        grid_points: int,
        max_images: Optional[int] = None,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.multimask_output = multimask_output
        self.points_per_batch = points_per_batch
        self.grid_points = grid_points
        self.max_images = max_images

    def loader(self):
        from torch.utils.data import DataLoader

        from mobilesam_se.data.sample import collate_samples

        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate_samples,
                          num_workers=self.num_workers)

    def __call__(self, model: nn.Module, device: torch.device, autocast_dtype: Optional[torch.dtype] = None, *,
                 coco: bool = False, amg: bool = False, prompted: bool = False, keep_visuals: int = 0,
                 progress: bool = True) -> ValidationResult:
        """`coco`: COCO mask AP/AR of the raw candidates and the reliability diagram; `amg`: also the
        stock AMG's output in the COCO metrics (a second decode per image); `prompted`: point / box /
        corrective-click mIoU as prompted/*."""
        from mobilesam_se.evaluation.evaluator import EverythingEvaluator, build_generator, figure_to_rgb

        loader = self.loader()
        evaluator = None
        if coco:
            generator = (build_generator(model, points_per_side=self.grid_points, points_per_batch=self.points_per_batch,
                                         multimask_output=self.multimask_output) if amg else None)
            evaluator = EverythingEvaluator(generator)
        metrics, visuals = validate(
            model, loader, device, self.image_size, self.multimask_output, self.points_per_batch, autocast_dtype,
            max_images=self.max_images, progress=progress, keep_visuals=keep_visuals, evaluator=evaluator,
        )
        figures = {"calibration": figure_to_rgb(evaluator.plot_calibration())} if evaluator is not None else {}
        if prompted:
            from mobilesam_se.evaluation.prompted import evaluate_promptable

            scores = evaluate_promptable(
                model, loader, device, self.multimask_output, max_images=self.max_images,
                autocast_dtype=autocast_dtype, points_per_batch=self.points_per_batch, progress=progress,
            )
            metrics.update({f"prompted/{k}": v for k, v in scores.items()})
        return ValidationResult(metrics=metrics, visuals=visuals, figures=figures)
