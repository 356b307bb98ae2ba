"""Per-mask losses on low-res logits; pure functions, each returns a scalar.

Mask losses average over the pixels of each mask first, then over the F masks, so every
object counts the same whatever its size. Logits are promoted to float32 so bf16 autocast
outputs do not lose precision in the reductions. With F == 0 each returns a zero that is still
connected to the graph (`x.sum() * 0`), so callers can always add and backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _zero(x: Tensor) -> Tensor:
    """A zero scalar on x's graph: keeps backward() valid when there is nothing to learn from."""
    return x.sum().float() * 0.0


def _per_mask_mean(pixel_loss: Tensor) -> Tensor:
    """(F, ...) per-pixel loss -> mean over pixels, then over masks."""
    return pixel_loss.flatten(1).mean(1).mean()


def sigmoid_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits; (F, h, w) each, mean over pixels then over F."""
    if logits.shape[0] == 0:
        return _zero(logits)
    x = logits.float()
    return _per_mask_mean(F.binary_cross_entropy_with_logits(x, targets.to(x), reduction="none"))


def sigmoid_focal(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """RetinaNet focal loss per pixel, as SAM trains masks; mean over pixels then over F.

    FL = alpha_t * (1 - p_t)^gamma * CE, alpha_t = alpha for positives, 1 - alpha for negatives.
    A negative alpha disables the class weighting.
    """
    if logits.shape[0] == 0:
        return _zero(logits)
    x = logits.float()
    t = targets.to(x)
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return _per_mask_mean(loss)


def dice_loss(logits: Tensor, targets: Tensor, eps: float = 1.0) -> Tensor:
    """Soft dice 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) per mask, mean over F."""
    if logits.shape[0] == 0:
        return _zero(logits)
    p = torch.sigmoid(logits.float()).flatten(1)
    t = targets.to(p).flatten(1)
    dice = (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)
    return (1 - dice).mean()


def iou_mse(pred_iou: Tensor, true_iou: Tensor) -> Tensor:
    """Mean squared error of the IoU head against the measured IoU; (N,) each."""
    if pred_iou.numel() == 0:
        return _zero(pred_iou)
    x = pred_iou.float()
    return F.mse_loss(x, true_iou.detach().to(x))


def iou_confidence_bce(pred_iou: Tensor, labels: Tensor, eps: float = 1e-4) -> Tensor:
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
    return -(y * torch.log(c) + (1 - y) * torch.log(1 - c)).mean()
