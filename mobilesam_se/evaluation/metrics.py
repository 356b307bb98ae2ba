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
    score_thresh: float = 0.0,
    nms_iou: float | None = None,
) -> Dict[str, float]:
    """Match predictions (Q, H, W) bool with scores (Q,) to gt (K, H, W) bool for one image.

    Predictions with score >= score_thresh are considered, deduplicated by mask NMS at nms_iou
    when given. Returns:
      dice, iou: mean over the Hungarian pairs (a pair's dice is 2 IoU / (1 + IoU)); 0 when
        there are gt objects but no predictions, NaN when K == 0 (nothing to score).
      recall = num_tp / K, NaN when K == 0 (undefined; aggregate skips it, micro recall counts it).
      precision = num_tp / num_pred, 0 when K == 0 and there are predictions, NaN with none.
      num_pred, num_gt, num_tp: predictions considered, gt objects, pairs with IoU >= iou_thresh.
    """
    pred_masks = torch.as_tensor(pred_masks).bool()
    gt_masks = torch.as_tensor(gt_masks).bool().to(pred_masks.device)
    scores = torch.as_tensor(pred_scores, dtype=torch.float32).to(pred_masks.device)
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
    """Dataset summary: mean of each per-image metric ignoring NaN (NaN if all are), totals of
    the counts, and micro recall / precision from those totals."""
    out: Dict[str, float] = {"num_images": len(per_image)}
    for key in MEAN_KEYS:
        vals = [float(r[key]) for r in per_image if not math.isnan(float(r[key]))]
        out[key] = sum(vals) / len(vals) if vals else NAN
    for key in COUNT_KEYS:
        out[key] = sum(int(r[key]) for r in per_image)
    out["micro_recall"] = _ratio(out["num_tp"], out["num_gt"])
    out["micro_precision"] = _ratio(out["num_tp"], out["num_pred"])
    return out
