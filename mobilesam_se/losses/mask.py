"""Mask and IoU-head losses on low-res logits, each written once.

One function per mask loss returns one value per mask, (..., h, w) -> (...): the mean over that
mask's pixels (Dice: over its pixel sums), so every object counts the same whatever its size.
Callers reduce: the everything loss averages over its foreground pairs (`sigmoid_bce`,
`sigmoid_focal`, `dice_loss`), the prompted loss first picks each object's best candidate.
Targets may broadcast against the logits (one target for a prompt's M candidates). Logits are
promoted to float32 so bf16 autocast outputs do not lose precision in the reductions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bce_per_mask(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits, mean over each mask's pixels: (..., h, w) -> (...)."""
    x = logits.float()
    return F.binary_cross_entropy_with_logits(x, targets.to(x).expand_as(x), reduction="none").flatten(-2).mean(-1)


def focal_per_mask(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                   soft: bool = False) -> Tensor:
    """RetinaNet focal loss, as SAM trains masks, mean over each mask's pixels: (..., h, w) -> (...).

    FL = alpha_t * (1 - p_t)^gamma * CE, alpha_t = alpha for positives, 1 - alpha for negatives.
    A negative alpha disables the class weighting. `soft`: targets in [0, 1] (cell coverages); the
    modulating factor is then |t - p|^gamma (the quality focal loss), which equals (1 - p_t)^gamma
    for 0/1 targets and keeps p = t the minimum of the unweighted loss; alpha_t is interpolated.
    """
    x = logits.float()
    t = targets.to(x).expand_as(x)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    if soft:
        loss = ce * (t - p).abs() ** gamma
    else:
        p_t = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss.flatten(-2).mean(-1)


def dice_per_mask(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice loss 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) of each mask: (..., h, w) -> (...)."""
    p = torch.sigmoid(logits.float()).flatten(-2)
    t = targets.to(p).flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def _mean_over_masks(per_mask: Tensor) -> Tensor:
    """Mean of per-mask values; with no masks a zero still on the graph (the sum of nothing), so
    callers can always add and backward."""
    return per_mask.mean() if per_mask.numel() else per_mask.sum() * 0.0


def sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """`bce_per_mask` of (F, h, w) masks, mean over the F masks."""
    return _mean_over_masks(bce_per_mask(logits, targets))


def sigmoid_focal(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                  soft: bool = False) -> Tensor:
    """`focal_per_mask` of (F, h, w) masks, mean over the F masks."""
    return _mean_over_masks(focal_per_mask(logits, targets, alpha, gamma, soft))


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """`dice_per_mask` of (F, h, w) masks, mean over the F masks."""
    return _mean_over_masks(dice_per_mask(logits, targets, eps))


def _zero(x: Tensor) -> Tensor:
    """A zero scalar on x's graph: keeps backward() valid when there is nothing to learn from."""
    return x.sum().float() * 0.0


def _mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Mean of `values`, or its `weight`-weighted mean (weight of the same shape)."""
    if weight is None:
        return values.mean()
    w = weight.detach().to(values)
    return (values * w).sum() / w.sum().clamp_min(1e-12)


def iou_mse(pred_iou: Tensor, true_iou: Tensor, weight: Tensor | None = None) -> Tensor:
    """Mean squared error of the IoU head against the measured IoU; (N,) each (any shape).
    `weight` (same shape): a weighted mean instead (prompts sampled unevenly from the grid)."""
    if pred_iou.numel() == 0:
        return _zero(pred_iou)
    x = pred_iou.float()
    if weight is None:
        return F.mse_loss(x, true_iou.detach().to(x))
    return _mean((x - true_iou.detach().to(x)) ** 2, weight)


def iou_confidence_bce(pred_iou: Tensor, labels: Tensor, eps: float = 1e-4, weight: Tensor | None = None) -> Tensor:
    """BCE of the predicted IoU, read as a confidence, against 0/1 foreground labels; mean over Q.

    The IoU head emits a raw IoU estimate (no sigmoid), so the confidence is
    pred_iou.clamp(eps, 1 - eps). Outside [eps, 1 - eps] the clamp passes no gradient and only
    the IoU MSE pulls the head back into range. That keeps the head an IoU estimate in [0, 1],
    so the AMG's stock pred_iou_thresh (0.88) keeps its meaning; training the head as a logit
    (sigmoid inside the BCE) lets it drift to arbitrary values and breaks that threshold.
    """
    if pred_iou.numel() == 0:
        return _zero(pred_iou)
    c = pred_iou.float().clamp(eps, 1 - eps)
    y = labels.detach().to(c)
    return _mean(-(y * torch.log(c) + (1 - y) * torch.log(1 - c)), weight)
