"""Validation in everything mode: the recipe's Hungarian Dice/IoU plus recall and precision at 0.5."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mobilesam_se.evaluation.metrics import evaluate_image, summarize_views
from mobilesam_se.matching import hungarian_match, mask_iou_matrix
from mobilesam_se.transforms import postprocess_masks


def full_res_candidates(
    logits: torch.Tensor, input_hw: Tuple[int, int], orig_hw: Tuple[int, int], image_size: int, chunk: int = 64
) -> torch.Tensor:
    """(Q, S/4, S/4) low-res logits -> (Q, H, W) bool masks at the original size, chunk by chunk."""
    out = []
    for s in range(0, logits.shape[0], chunk):
        out.append(postprocess_masks(logits[s : s + chunk].float(), input_hw, orig_hw, image_size) > 0)
    return torch.cat(out) if out else torch.zeros((0, *orig_hw), dtype=torch.bool, device=logits.device)


@torch.no_grad()
def predict_candidates(model: nn.Module, batch: Dict[str, Any], device: torch.device, multimask_output: bool,
                       points_per_batch: int, autocast_dtype: Optional[torch.dtype] = None):
    pixels = batch["image"].to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(pixels, batch["points"].to(device), multimask_output=multimask_output, points_per_batch=points_per_batch)
    return out["masks"].float(), out["iou_pred"].float()


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

    `evaluator` (an `evaluation.everything.EverythingEvaluator`) also receives every image's
    candidates; its COCO AP / AR and calibration metrics are merged into the result.
    """
    was_training = model.training
    model.eval()
    all_views: List[Dict[str, float]] = []
    filtered_views: List[Dict[str, float]] = []
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
            gt = batch["masks"][b].to(device)
            masks = full_res_candidates(q, batch["input_size"][b], batch["orig_size"][b], image_size)
            everything = evaluate_image(masks, s, gt)
            filtered = evaluate_image(masks, s, gt, score_thresh=score_thresh, nms_iou=nms_iou)
            if evaluator is not None:
                originals = batch.get("image_uint8")
                evaluator.add(batch["image_id"][b], masks, s, gt, originals[b] if originals else None)
            all_views.append(everything)
            filtered_views.append(filtered)
            if len(visuals) < keep_visuals and batch.get("image_uint8") and batch["image_uint8"][b] is not None:
                matched = _matched_masks(masks, gt)
                m = masks.shape[0] // batch["points"].shape[1]
                visuals.append({
                    "image_id": batch["image_id"][b], "image": batch["image_uint8"][b],
                    "gt": gt.cpu().numpy(), "pred": masks[matched].cpu().numpy(),
                    "points": _points_in_original(batch["points"][b], batch["orig_size"][b], image_size).numpy(),
                    "points_matched": np.unique(matched.cpu().numpy() // m),
                })
        if max_images is not None and n_seen >= max_images:
            break
    if was_training:
        model.train()
    metrics = summarize_views(all_views, filtered_views) if all_views else {}
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
