"""SAM's loss for a prompted object: the best of the M candidates takes the mask loss, and the IoU
head learns every candidate's true IoU.

With multimask output one prompt (a single point, say) may fairly mean a part, the object or a
group, so only the candidate closest to the target, by w_focal * focal + w_dice * dice (SAM uses
20 : 1), receives the mask gradient; the others stay free to cover the other readings. The IoU
head, whose job is to rank candidates, is supervised on all of them. The focal and Dice terms are
`mobilesam_se.losses.mask`'s per-mask ones, so both modes train on the same loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch import Tensor

from mobilesam_se.losses.mask import dice_per_mask, focal_per_mask, iou_mse


@dataclass
class PromptedLossWeights:
    focal: float = 20.0
    dice: float = 1.0
    iou: float = 1.0
    focal_alpha: float = 0.25  # < 0 disables the class weighting
    focal_gamma: float = 2.0


def binary_iou(logits: Tensor, targets: Tensor) -> Tensor:
    """(..., h, w) -> (...) IoU of (logits > 0) with the (broadcast) targets; 1 where both are empty."""
    pred = (logits > 0).flatten(-2)
    t = targets.bool().flatten(-2)
    inter = (pred & t).sum(-1).float()
    union = (pred | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def best_candidate_loss(
    logits: Tensor, iou_pred: Tensor, targets: Tensor, weights: PromptedLossWeights
) -> Dict[str, Tensor]:
    """logits (N, M, h, w), iou_pred (N, M), targets (N, h, w) bool -> scalar terms and `best` (N,).

    loss = w_focal * focal[best] + w_dice * dice[best] + w_iou * mse(iou_pred, true IoU), each
    averaged over the N objects (the MSE over all N * M candidates). With N == 0 every term is a
    zero still connected to `logits`, so the caller can always add and backward.
    """
    n = logits.shape[0]
    if n == 0:
        zero = logits.sum().float() * 0.0 + iou_pred.sum().float() * 0.0
        return {"loss": zero, "focal": zero, "dice": zero, "iou": zero,
                "best": torch.zeros(0, dtype=torch.long, device=logits.device)}
    per_candidate = targets[:, None]  # (N, 1, h, w): broadcast over the M candidates
    focal = focal_per_mask(logits, per_candidate, weights.focal_alpha, weights.focal_gamma)  # (N, M)
    dice = dice_per_mask(logits, per_candidate)
    # Selection is a choice, not a function to differentiate: detach so argmin carries no gradient.
    best = (weights.focal * focal + weights.dice * dice).detach().argmin(1)
    rows = torch.arange(n, device=logits.device)
    focal_b, dice_b = focal[rows, best].mean(), dice[rows, best].mean()
    iou = iou_mse(iou_pred, binary_iou(logits.detach(), per_candidate))
    loss = weights.focal * focal_b + weights.dice * dice_b + weights.iou * iou
    return {"loss": loss, "focal": focal_b, "dice": dice_b, "iou": iou, "best": best}
