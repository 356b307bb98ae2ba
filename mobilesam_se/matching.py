"""One-to-one matching of decoder candidates to ground-truth masks.

Every grid point prompt yields M candidate masks; all P*M candidates of an image compete for the
K ground-truth objects through a Hungarian assignment on mask IoU. Everything here runs without
gradients and only index / target tensors come out; the losses gather from the live logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

# Above this many bytes of float32 copies the intersection matmul is split along pixels, so full-res
# evaluation with hundreds of masks does not need gigabytes of scratch. Partial products are integer
# counts below 2**24, so summing them in float32 is exact and the split changes no result.
MAX_FLOAT_BYTES = 1 << 28


def _flat_binary(masks: Tensor) -> Tensor:
    """(N, ...) masks -> (N, HW) bool. Non-bool inputs are read as 0/1 (> 0.5 counts as inside)."""
    flat = masks.flatten(1)
    return flat if flat.dtype == torch.bool else flat > 0.5


def mask_iou_matrix(pred: Tensor, gt: Tensor, max_float_bytes: int = MAX_FLOAT_BYTES) -> Tensor:
    """(Q, K) float32 IoU between every pred mask and every gt mask.

    pred: (Q, h, w) or (Q, HW), gt: (K, ...) of the same pixel count; bool or 0/1 float.
    The intersection is a matrix product of the flattened masks (Q x HW @ HW x K), never a
    Q x K x HW broadcast. Runs on pred's device; an empty union gives IoU 0.
    """
    p = _flat_binary(pred)
    g = _flat_binary(gt).to(p.device)
    if p.shape[1] != g.shape[1]:
        raise ValueError(f"pixel counts differ: pred {tuple(pred.shape)} vs gt {tuple(gt.shape)}")
    q, hw = p.shape
    k = g.shape[0]
    # Autocast would run the matmul in fp16/bf16 and round counts above 2048/256.
    with torch.autocast(device_type=p.device.type, enabled=False):
        inter = _intersection(p, g, max_float_bytes)
    union = p.sum(1, dtype=torch.float32)[:, None] + g.sum(1, dtype=torch.float32)[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))
    return iou.reshape(q, k)


def _intersection(p: Tensor, g: Tensor, max_float_bytes: int) -> Tensor:
    """Pixel counts p @ g.T in float32, in one product unless the float copies exceed the budget."""
    q, hw = p.shape
    rows = max(q + g.shape[0], 1)
    chunk = max(1, min(hw, max_float_bytes // (4 * rows)))
    inter = torch.zeros(q, g.shape[0], dtype=torch.float32, device=p.device)
    for start in range(0, hw, chunk):
        sl = slice(start, start + chunk)
        inter += p[:, sl].to(torch.float32) @ g[:, sl].to(torch.float32).T
    return inter


def hungarian_match(score: Tensor | np.ndarray) -> Tuple[Tensor, Tensor]:
    """Maximum-score one-to-one assignment of rows (predictions) to columns (gt).

    Returns (pred_idx, gt_idx) long tensors of length min(Q, K), sorted by pred_idx, on the
    input tensor's device (CPU for arrays). Empty when Q == 0 or K == 0.
    """
    device = score.device if isinstance(score, Tensor) else torch.device("cpu")
    s = score.detach().float().cpu().numpy() if isinstance(score, Tensor) else np.asarray(score, np.float64)
    if s.ndim != 2:
        raise ValueError(f"score must be 2-D, got shape {s.shape}")
    if s.shape[0] == 0 or s.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    rows, cols = linear_sum_assignment(s, maximize=True)
    return (torch.as_tensor(rows, dtype=torch.long, device=device),
            torch.as_tensor(cols, dtype=torch.long, device=device))


@dataclass
class MatchResult:
    """Outcome of `match_candidates` for one image; candidate index q = p * M + m."""

    pred_idx: Tensor  # (A,) long, assigned candidates (A = min(Q, K))
    gt_idx: Tensor  # (A,) long, their gt
    iou: Tensor  # (A,) float, IoU of each assigned pair
    fg: Tensor  # (Q,) bool, candidate is foreground
    fg_pred_idx: Tensor  # (F,) long, foreground subset of pred_idx
    fg_gt_idx: Tensor  # (F,) long, matching gt
    iou_matrix: Tensor  # (Q, K) float, detached
    true_iou: Tensor  # (Q,) float, IoU with the assigned gt, 0 when unassigned
    best_iou: Tensor  # (Q,) float, max IoU over all gt, 0 when K == 0

    @property
    def num_fg(self) -> int:
        return int(self.fg_pred_idx.numel())


def point_in_masks(points: Tensor, masks: Tensor) -> Tensor:
    """(P, K) bool: does xy point p fall on a foreground pixel of mask k.

    Points are continuous pixel coordinates of the masks' frame (pixel (i, j) covers
    [j, j+1) x [i, i+1), SAM's convention), so the pixel is floor(xy), clamped to the frame.
    """
    k, h, w = masks.shape
    xy = points.to(masks.device).floor().long()
    x = xy[:, 0].clamp(0, w - 1)
    y = xy[:, 1].clamp(0, h - 1)
    return masks[:, y, x].T.bool().reshape(points.shape[0], k)


@torch.no_grad()
def match_candidates(
    pred_logits: Tensor,
    gt: Tensor,
    points: Tensor | None = None,
    fg_iou: float = 0.5,
    point_credit: float = 0.0,
    point_fg: bool = False,
) -> MatchResult:
    """Hungarian-match all P*M candidates of one image to its K gt masks.

    pred_logits: (P, M, h, w) low-res logits, binarised at logit > 0.
    gt: (K, h, w) bool masks in the same frame. points: (P, 2) xy prompts in that frame, or None.

    Assignment score = IoU + point_credit * [prompt point inside the gt]. A candidate is
    foreground when it is assigned AND (IoU >= fg_iou OR (point_fg AND its point is inside the gt)).

    Why the point terms: from random (or badly adapted) decoder weights no candidate reaches
    IoU 0.5, so the plain IoU rule yields no foreground and the mask losses have nothing to
    bootstrap from. `point_credit` steers the assignment towards gt that the prompt actually hits,
    and `point_fg` makes such pairs foreground whatever their IoU. Both default off, which gives
    the plain IoU-threshold rule.
    """
    p, m, h, w = pred_logits.shape
    q = p * m
    device = pred_logits.device
    gt = gt.to(device).bool()
    if gt.shape[1:] != (h, w):
        raise ValueError(f"gt {tuple(gt.shape)} not in the logits' frame {(h, w)}")
    k = gt.shape[0]

    iou = mask_iou_matrix(pred_logits.reshape(q, h * w) > 0, gt.reshape(k, h * w))
    if points is None or k == 0:
        inside = torch.zeros(q, k, dtype=torch.bool, device=device)
    else:
        inside = point_in_masks(points, gt).repeat_interleave(m, dim=0)  # every candidate of a prompt shares its point

    pred_idx, gt_idx = hungarian_match(iou + point_credit * inside.float())
    pair_iou = iou[pred_idx, gt_idx]
    pair_fg = pair_iou >= fg_iou
    if point_fg:
        pair_fg |= inside[pred_idx, gt_idx]

    fg = torch.zeros(q, dtype=torch.bool, device=device)
    fg[pred_idx[pair_fg]] = True
    true_iou = torch.zeros(q, dtype=torch.float32, device=device)
    true_iou[pred_idx] = pair_iou
    best_iou = iou.max(1).values if k > 0 else torch.zeros(q, dtype=torch.float32, device=device)
    return MatchResult(
        pred_idx=pred_idx, gt_idx=gt_idx, iou=pair_iou, fg=fg,
        fg_pred_idx=pred_idx[pair_fg], fg_gt_idx=gt_idx[pair_fg],
        iou_matrix=iou, true_iou=true_iou, best_iou=best_iou,
    )


def mask_nms(masks: Tensor, scores: Tensor, iou_thresh: float) -> Tensor:
    """Indices (by descending score) of masks kept by greedy NMS: drop any mask whose IoU with a
    higher-scoring kept mask exceeds iou_thresh (the torchvision / AMG convention, strict >)."""
    order = torch.argsort(scores, descending=True, stable=True)
    iou = mask_iou_matrix(masks[order], masks[order]).cpu()
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep: List[int] = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_thresh
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]
