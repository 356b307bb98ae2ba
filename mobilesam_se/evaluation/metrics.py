"""Segment-everything metrics: Hungarian-matched dice / IoU, recall and precision per image.

The recipe's score is the mean dice (and IoU) over the one-to-one Hungarian pairs of predicted
and gt masks. Those pairs ignore unmatched masks on either side, so recall and precision at an
IoU threshold are reported too, to expose missed objects and spurious masks.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import torch
from torch import Tensor

from mobilesam_se.matching import mask_nms, hungarian_match, mask_iou_matrix

NAN = float("nan")
MEAN_KEYS = ("dice", "iou", "recall", "precision")
COUNT_KEYS = ("num_pred", "num_gt", "num_tp")


def _ratio(num: int, den: int) -> float:
    """num / den, NaN when undefined (den == 0)."""
    return num / den if den > 0 else NAN


def evaluate_image(
    pred_masks: Tensor,
    pred_scores: Tensor,
    gt_masks: Tensor,
    iou_thresh: float = 0.5,
    score_thresh: float | None = None,
    nms_iou: float | None = None,
) -> Dict[str, float]:
    """Match predictions (Q, H, W) bool with scores (Q,) to gt (K, H, W) bool for one image.

    Every prediction is considered unless score_thresh is given (then only those with score >=
    score_thresh: a raw IoU head can predict below 0, and such a candidate still counts when no
    threshold is asked for), deduplicated by mask NMS at nms_iou when given. Returns:
      dice, iou: mean over the Hungarian pairs (a pair's dice is 2 IoU / (1 + IoU)); 0 when
        there are gt objects but no predictions, NaN when K == 0 (nothing to score).
      recall = num_tp / K, NaN when K == 0 (undefined; aggregate skips it, micro recall counts it).
      precision = num_tp / num_pred, 0 when K == 0 and there are predictions, NaN with none.
      num_pred, num_gt, num_tp: predictions considered, gt objects, pairs with IoU >= iou_thresh.
    """
    pred_masks = torch.as_tensor(pred_masks).bool()
    gt_masks = torch.as_tensor(gt_masks).bool().to(pred_masks.device)
    scores = torch.as_tensor(pred_scores, dtype=torch.float32).to(pred_masks.device)
    if score_thresh is None:
        keep = torch.arange(scores.shape[0], device=scores.device)
    else:
        keep = torch.nonzero(scores >= score_thresh).flatten()
    if nms_iou is not None and keep.numel() > 0:
        keep = keep[mask_nms(pred_masks[keep], scores[keep], nms_iou).to(keep.device)]
    preds = pred_masks[keep]

    num_pred, num_gt = preds.shape[0], gt_masks.shape[0]
    pair_iou = torch.zeros(0)
    if num_pred > 0 and num_gt > 0:
        iou = mask_iou_matrix(preds, gt_masks)
        pi, gi = hungarian_match(iou)
        pair_iou = iou[pi, gi].double().cpu()
    num_tp = int((pair_iou >= iou_thresh).sum())

    if num_gt == 0:
        mean_iou = mean_dice = NAN
    elif pair_iou.numel() == 0:
        mean_iou = mean_dice = 0.0
    else:
        mean_iou = float(pair_iou.mean())
        mean_dice = float((2 * pair_iou / (1 + pair_iou)).mean())
    return {
        "dice": mean_dice,
        "iou": mean_iou,
        "recall": _ratio(num_tp, num_gt),
        "precision": _ratio(num_tp, num_pred),
        "num_pred": num_pred,
        "num_gt": num_gt,
        "num_tp": num_tp,
    }


def aggregate(per_image: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Dataset summary of `evaluate_image` results (one view of the predictions): mean of each
    per-image metric ignoring NaN (NaN if all are), totals of the counts, and micro recall /
    precision from those totals, so every ratio's numerator and denominator come from one view."""
    out: Dict[str, float] = {"num_images": len(per_image)}
    for key in MEAN_KEYS:
        vals = [float(r[key]) for r in per_image if not math.isnan(float(r[key]))]
        out[key] = sum(vals) / len(vals) if vals else NAN
    for key in COUNT_KEYS:
        out[key] = sum(int(r[key]) for r in per_image)
    out["micro_recall"] = _ratio(out["num_tp"], out["num_gt"])
    out["micro_precision"] = _ratio(out["num_tp"], out["num_pred"])
    return out


def summarize_views(all_candidates: Sequence[Dict[str, Any]], filtered: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """Validation summary from two views of the same images.

    From every candidate (the recipe's score: how well the best one-to-one pairing covers the
    objects): dice, iou, recall, micro_recall, num_gt, num_tp, num_candidates. From the filtered
    candidates (confident, after NMS): precision, recall_filtered, micro_precision,
    micro_recall_filtered, num_pred, num_tp_filtered.
    """
    a, f = aggregate(all_candidates), aggregate(filtered)
    return {
        "num_images": a["num_images"],
        "dice": a["dice"], "iou": a["iou"], "recall": a["recall"], "micro_recall": a["micro_recall"],
        "num_gt": a["num_gt"], "num_tp": a["num_tp"], "num_candidates": a["num_pred"],
        "precision": f["precision"], "recall_filtered": f["recall"], "micro_precision": f["micro_precision"],
        "micro_recall_filtered": f["micro_recall"], "num_pred": f["num_pred"], "num_tp_filtered": f["num_tp"],
    }
