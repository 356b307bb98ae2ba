"""SAM's loss for a prompted object: the best of the M candidates takes the mask loss, and the IoU
head learns every candidate's true IoU.

With multimask output one prompt (a single point, say) may fairly mean a part, the object or a
group, so only the candidate closest to the target, by w_focal * focal + w_dice * dice (SAM uses
20 : 1), receives the mask gradient; the others stay free to cover the other readings. The IoU
head, whose job is to rank candidates, is supervised on all of them.

The per-mask terms agree with `mobilesam_se.losses.mask` (mean over pixels, float32); they are
restated here per mask because selection needs one value per candidate, not a batch mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class PromptedLossWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    focal_alpha: float = 0.25  # < 0 disables the class weighting
    focal_gamma: float = 2.0


def focal_per_mask(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """(F, h, w) logits and targets -> (F,) sigmoid focal loss, mean over each mask's pixels."""
    x = logits.float()
    t = targets.to(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p = torch.sigmoid(x)
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss.flatten(1).mean(1)


def dice_per_mask(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """(F, h, w) -> (F,) soft dice loss 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps)."""
    p = torch.sigmoid(logits.float()).flatten(1)
    t = targets.to(p).flatten(1)
    return 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def binary_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """(F, h, w) -> (F,) IoU of (logits > 0) with the targets; 1 where both are empty."""
    pred = (logits > 0).flatten(1)
    t = targets.bool().flatten(1)
    inter = (pred & t).sum(1).float()
    union = (pred | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def best_candidate_loss(
    logits: Tensor, iou_pred: Tensor, targets: Tensor, weights: PromptedLossWeights
) -> Dict[str, Tensor]:
    """logits (N, M, h, w), iou_pred (N, M), targets (N, h, w) bool -> scalar terms and `best` (N,).

    loss = w_focal * focal[best] + w_dice * dice[best] + w_iou * mse(iou_pred, true IoU), each
    averaged over the N objects (the MSE over all N * M candidates). With N == 0 every term is a
    zero still connected to `logits`, so the caller can always add and backward.
    """
    n, m = logits.shape[:2]
    if n == 0:
        zero = logits.sum().float() * 0.0 + iou_pred.sum().float() * 0.0
        return {"loss": zero, "focal": zero, "dice": zero, "iou": zero,
                "best": torch.zeros(0, dtype=torch.long, device=logits.device)}
    flat = logits.flatten(0, 1)
    expanded = targets[:, None].expand(n, m, *targets.shape[1:]).flatten(0, 1)
    focal = focal_per_mask(flat, expanded, weights.focal_alpha, weights.focal_gamma).view(n, m)
    dice = dice_per_mask(flat, expanded).view(n, m)
    # Selection is a choice, not a function to differentiate: detach so argmin carries no gradient.
    best = (weights.focal * focal + weights.dice * dice).detach().argmin(1)
    rows = torch.arange(n, device=logits.device)
    focal_b, dice_b = focal[rows, best].mean(), dice[rows, best].mean()
    true_iou = binary_iou(flat.detach(), expanded).view(n, m)
    iou = F.mse_loss(iou_pred.float(), true_iou)
    loss = weights.focal * focal_b + weights.dice * dice_b + weights.iou * iou
    return {"loss": loss, "focal": focal_b, "dice": dice_b, "iou": iou, "best": best}
