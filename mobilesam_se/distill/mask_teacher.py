"""A teacher's segment-everything masks as extra supervision (objects the annotations miss).

The teacher decodes the image's whole prompt grid with multimask output (as SAM's automatic mask
generator does, whatever the student's setting), keeps candidates whose predicted IoU reaches
`pred_iou_thresh`, clips them to the image region (the padding is never an object) and removes
duplicates by greedy mask NMS at `nms_iou`. All at low resolution (S/4), the targets' frame.

- replace_gt: the kept teacher masks become references; a teacher mask that a GT mask matches
  (one-to-one Hungarian on IoU, IoU >= iou_threshold) is replaced by that GT mask; GT masks that
  matched no teacher mask stay. A teacher mask left over that still overlaps some GT mask at IoU >=
  iou_threshold is a duplicate of an annotated object and is dropped. Targets = all GT + the
  teacher masks that are like no GT mask.
- dual_supervision: GT targets unchanged; the student's candidates are also matched to the teacher
  masks (the everything loss's matching rule) and pulled toward the matched teacher probabilities
  by a soft loss (Bernoulli KL + soft dice with a squared denominator, both minimal exactly at the
  teacher's probabilities), weighted by mask_teacher.weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mobilesam_se.distill.terms import bernoulli_kl, soft_dice
from mobilesam_se.matching import mask_nms, hungarian_match, mask_iou_matrix, match_candidates

METHODS = ("none", "replace_gt", "dual_supervision")


@dataclass
class TeacherMasks:
    """One image's kept teacher masks, best predicted IoU first."""

    logits: Tensor  # (R, h, w) float low-res logits (clipped to the image region)
    scores: Tensor  # (R,) predicted IoU

    @property
    def masks(self) -> Tensor:
        return self.logits > 0


def region_mask(valid_hw: Tuple[int, int], side: int, device: torch.device) -> Tensor:
    """(side, side) bool, True on the image region (top-left valid_hw) of the padded low-res frame."""
    inside = torch.zeros(side, side, dtype=torch.bool, device=device)
    inside[: valid_hw[0], : valid_hw[1]] = True
    return inside


def select_candidates(
    logits: Tensor, iou_pred: Tensor, pred_iou_thresh: float, region: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """(Q, h, w) logits, (Q,) predicted IoU -> the confident, non-empty ones (clipped to `region`)."""
    keep = iou_pred >= pred_iou_thresh
    logits, scores = logits[keep].float(), iou_pred[keep].float()
    if region is not None:
        # Clip by pushing padding pixels far negative: they never count as mask, in IoU or loss.
        logits = logits.masked_fill(~region, -20.0)
    nonempty = (logits > 0).flatten(1).any(1)
    return logits[nonempty], scores[nonempty]


def finish(logits: Sequence[Tensor], scores: Sequence[Tensor], nms_iou: float, shape: Tuple[int, int]) -> TeacherMasks:
    """Concatenate one image's selected candidates (from all prompt chunks) and run NMS."""
    device = logits[0].device if logits else torch.device("cpu")
    all_logits = torch.cat(list(logits)) if logits else torch.zeros(0, *shape, device=device)
    all_scores = torch.cat(list(scores)) if scores else torch.zeros(0, device=device)
    keep = mask_nms(all_logits > 0, all_scores, nms_iou)
    return TeacherMasks(all_logits[keep], all_scores[keep])


def replace_with_gt(teacher: Tensor, gt: Tensor, iou_threshold: float) -> Tuple[Tensor, Dict[str, int]]:
    """teacher (R, h, w), gt (K, h, w) bool -> targets (K + added, h, w) bool and counts.

    Hungarian on IoU pairs each GT with at most one teacher mask; a pair at IoU >= iou_threshold
    means "the teacher found this annotated object": the GT (the better mask) stands for it. Of the
    teacher masks left, those at IoU >= iou_threshold with any GT mask are further copies of an
    annotated object (dropped); the rest are objects the annotations lack (added).
    """
    teacher, gt = teacher.bool(), gt.to(teacher.device).bool()
    if teacher.shape[0] == 0:
        return gt, {"replaced": 0, "added": 0, "duplicates": 0}
    if gt.shape[0] == 0:
        return teacher, {"replaced": 0, "added": int(teacher.shape[0]), "duplicates": 0}
    iou = mask_iou_matrix(teacher, gt)
    t_idx, g_idx = hungarian_match(iou)
    replaced = t_idx[iou[t_idx, g_idx] >= iou_threshold]
    left = torch.ones(teacher.shape[0], dtype=torch.bool, device=teacher.device)
    left[replaced] = False
    duplicate = left & (iou.max(dim=1).values >= iou_threshold)
    added = left & ~duplicate
    targets = torch.cat([gt, teacher[added]])
    return targets, {"replaced": int(replaced.numel()), "added": int(added.sum()), "duplicates": int(duplicate.sum())}


def dual_supervision_loss(
    student_logits: Tensor,
    teacher: TeacherMasks,
    points_lowres: Optional[Tensor],
    fg_iou: float = 0.5,
    point_credit: float = 0.0,
    point_fg: bool = False,
) -> Dict[str, Tensor]:
    """One image: student candidates (P, M, h, w) matched to the teacher masks as to GT; soft loss
    (Bernoulli KL toward the teacher probabilities + soft dice) on the foreground pairs, mean over them."""
    p, m, h, w = student_logits.shape
    zero = student_logits.float().sum() * 0.0
    if teacher.logits.shape[0] == 0:
        return {"loss": zero, "kl": zero, "dice": zero, "pairs": torch.tensor(0.0)}
    match = match_candidates(student_logits.detach(), teacher.masks, points_lowres, fg_iou, point_credit, point_fg)
    if match.num_fg == 0:
        return {"loss": zero, "kl": zero, "dice": zero, "pairs": torch.tensor(0.0)}
    s = student_logits.reshape(p * m, h, w)[match.fg_pred_idx]
    t = teacher.logits[match.fg_gt_idx]
    kl = bernoulli_kl(s, t).flatten(1).mean(1).mean()
    dice = soft_dice(s, torch.sigmoid(t.float()))
    return {"loss": kl + dice, "kl": kl, "dice": dice, "pairs": torch.tensor(float(match.num_fg))}
