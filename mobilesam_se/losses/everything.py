"""The segment-everything training loss for one image (and a mean over a batch of images)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import Tensor, nn

from mobilesam_se.losses.mask import (dice_loss, dice_per_mask, focal_per_mask, iou_confidence_bce, iou_mse, sigmoid_bce,
                                      sigmoid_focal)
from mobilesam_se.matching import MatchResult, match_candidates, point_in_masks

TERMS = ("bce", "focal", "dice", "iou", "cls")
IOU_TARGETS = ("assigned", "assigned_zero", "best")
IOU_OVER = ("all", "assigned", "fg")
CLS_TERMS = ("recipe", "no_duplicates", "off")
# Prompts per piece when `point_supervision` picks each prompt's best candidate (bounds the float copies).
POINT_PAIR_CHUNK = 32


@dataclass
class LossOutput:
    """The everything loss of one image or a batch: `terms` holds scalar tensors only ("loss", the
    weighted sum that is optimised, and each term it sums); the rest is what the matching found."""

    terms: Dict[str, Tensor]
    matches: List[MatchResult]  # per image
    num_fg: int  # foreground (candidate, gt) pairs
    num_gt: int  # ground-truth objects
    mean_matched_iou: float  # over every Hungarian pair (0 without any)


class EverythingLoss(nn.Module):
    """Hungarian-matched mask losses plus IoU-head losses over all P*M candidates of an image.

    - bce / focal / dice: on foreground (candidate, gt) pairs only, each averaged over the
      foreground candidates; zero (with a gradient path) when there are none.
    - iou: MSE of the IoU head against the measured IoU, averaged over `iou_over` candidates:
      "all" (every candidate, so the head also learns that bad masks are bad), "assigned" (the
      Hungarian-assigned ones) or "fg" (the foreground pairs: the recipe's average over matched
      predictions). Targets (`iou_target`): "assigned" gives an assigned candidate its IoU with its
      assigned gt and every other candidate its best IoU over all gt, so the head learns an honest
      quality estimate, not "0 because another candidate won the object" (the AMG's NMS is what
      removes duplicates); an assignment at IoU 0 (Hungarian filler for an object nobody overlaps)
      does not count as one. "assigned_zero" is the strict recipe (unassigned: 0); "best" uses the
      best IoU for every candidate.
    - cls: `iou_confidence_bce` of the predicted IoU against the foreground label (`cls_term`):
      "recipe" takes every non-foreground candidate as a negative; "no_duplicates" leaves out the
      good duplicates (IoU >= fg_iou with some object), since BCE toward 0 there fights the MSE
      toward their real IoU; "off" drops the term (it is logged as 0).
    loss = sum of w_term * term, and `LossOutput.terms` are exactly those summed.
    """

    def __init__(
        self,
        *,  # every setting by name, and no defaults here: conf/loss/everything.yaml is their one source
        w_bce: float,
        w_focal: float,
        w_dice: float,
        w_iou: float,
        w_cls: float,
        focal_alpha: float,
        focal_gamma: float,
        fg_iou: float,
        point_credit: float,
        point_fg: bool,
        iou_target: str,
        point_supervision: bool,
        iou_over: str,
        cls_term: str,
    ) -> None:
        super().__init__()
        for key, value, allowed in (("iou_target", iou_target, IOU_TARGETS), ("iou_over", iou_over, IOU_OVER),
                                    ("cls_term", cls_term, CLS_TERMS)):
            if value not in allowed:
                raise ValueError(f"loss.{key} must be one of {allowed}, got {value!r}")
        self.iou_over = iou_over
        self.cls_term = cls_term
        self.weights = {"bce": w_bce, "focal": w_focal, "dice": w_dice, "iou": w_iou, "cls": w_cls}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.fg_iou = fg_iou
        self.point_credit = point_credit
        self.point_fg = point_fg
        self.iou_target = iou_target
        self.point_supervision = point_supervision

    def forward(
        self,
        logits: Tensor,
        pred_iou: Tensor,
        gt_lowres: Tensor,
        points_lowres: Tensor | None = None,
        ignore_lowres: Tensor | None = None,
        prompt_weights: Tensor | None = None,
        soft_lowres: Tensor | None = None,
    ) -> LossOutput:
        """logits (P, M, h, w), pred_iou (P, M), gt_lowres (K, h, w) bool, points (P, 2) xy or None.

        `ignore_lowres` (h, w) bool: objects left out of the targets (e.g. by max_masks_per_image).
        A non-foreground candidate lying mostly (>= 50% of its area) inside it gets no IoU-head
        and no classification loss: it may well segment a real object we simply did not keep.
        `prompt_weights` (P,): each prompt's weight in the IoU-head terms (iou, cls), a weighted
        mean, for prompts sampled unevenly from the grid (`dataset.prompt_sampling=balanced`); the
        mask terms are not weighted.
        `soft_lowres` (K, h, w) float in [0, 1]: each object's cell coverage (`dataset.soft_targets`),
        the target of the mask terms in place of `gt_lowres`; matching and the IoU targets keep the
        binary masks.
        """
        p, m, h, w = logits.shape
        match = match_candidates(logits, gt_lowres, points_lowres, self.fg_iou, self.point_credit, self.point_fg)
        flat_logits = logits.reshape(p * m, h, w)
        flat_iou = pred_iou.reshape(p * m)

        keep = ~self._ignored(flat_logits, match.fg, ignore_lowres)
        pred_idx, gt_idx = match.fg_pred_idx, match.fg_gt_idx
        if self.point_supervision and points_lowres is not None and gt_lowres.shape[0]:
            extra_pred, extra_gt = self._point_pairs(logits, gt_lowres, points_lowres)
            pred_idx = torch.cat([pred_idx, extra_pred.to(pred_idx.device)])
            gt_idx = torch.cat([gt_idx, extra_gt.to(gt_idx.device)])
        iou_rows, cls_rows = keep & self._iou_rows(match), keep & self._cls_rows(match)
        row_w = None if prompt_weights is None else prompt_weights.float().repeat_interleave(m).to(flat_iou.device)
        fg_logits = flat_logits[pred_idx]
        soft = soft_lowres is not None
        fg_targets = (soft_lowres if soft else gt_lowres).to(logits.device)[gt_idx].float()
        terms = {
            "bce": sigmoid_bce(fg_logits, fg_targets),
            "focal": sigmoid_focal(fg_logits, fg_targets, self.focal_alpha, self.focal_gamma, soft=soft),
            "dice": dice_loss(fg_logits, fg_targets),
            "iou": iou_mse(flat_iou[iou_rows], self._iou_target(match)[iou_rows],
                           None if row_w is None else row_w[iou_rows]),
            "cls": iou_confidence_bce(flat_iou[cls_rows], match.fg.float()[cls_rows],
                                      weight=None if row_w is None else row_w[cls_rows]),
        }
        return LossOutput(
            terms={"loss": self._weighted_sum(terms), **terms}, matches=[match], num_fg=int(match.num_fg),
            num_gt=int(gt_lowres.shape[0]), mean_matched_iou=float(match.iou.mean()) if match.iou.numel() else 0.0,
        )

    @torch.no_grad()
    def _point_pairs(self, logits: Tensor, gt: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
        """SAM's own prompted signal, for training from scratch: every prompt whose point lies in an
        object supervises its best candidate (lowest focal + Dice, as SAM picks among its 3) toward
        that object (the smallest one containing the point). The Hungarian pairs alone give one
        supervised mask per object, too sparse for random weights to learn localisation from."""
        p, m = logits.shape[:2]
        inside = point_in_masks(points, gt)  # (P, K)
        areas = gt.flatten(1).sum(1).float().to(inside.device)
        cost = torch.where(inside, areas[None, :], torch.full_like(inside, float("inf"), dtype=torch.float32))
        best_area, k = cost.min(dim=1)
        prompts = torch.nonzero(torch.isfinite(best_area)).flatten()
        if prompts.numel() == 0:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty
        # A few prompts at a time: the float copies below are ~8 per candidate, which for a full
        # 32x32 grid at 1024 px would be gigabytes at once (memory, issue 14).
        gt_dev = gt.to(logits.device)
        dev_prompts, dev_k = prompts.to(logits.device), k[prompts].to(logits.device)
        best_m = torch.cat([
            self._best_candidate(logits[dev_prompts[s : s + POINT_PAIR_CHUNK]], gt_dev[dev_k[s : s + POINT_PAIR_CHUNK]])
            for s in range(0, prompts.numel(), POINT_PAIR_CHUNK)
        ]).cpu()
        return prompts.cpu() * m + best_m, k[prompts].cpu()

    def _best_candidate(self, cand: Tensor, gt: Tensor) -> Tensor:
        """(n,) index of the lowest focal + Dice candidate of each prompt; cand (n, M, h, w), gt (n, h, w)."""
        tgt = gt[:, None]  # one target for all M candidates of a prompt: broadcast, not copied M times
        focal = focal_per_mask(cand, tgt, self.focal_alpha, self.focal_gamma)
        return (self.weights["focal"] * focal + self.weights["dice"] * dice_per_mask(cand, tgt)).argmin(dim=1)

    @staticmethod
    @torch.no_grad()
    def _ignored(flat_logits: Tensor, fg: Tensor, ignore: Tensor | None) -> Tensor:
        """(Q,) bool: background candidates whose mask lies mostly inside the ignore region."""
        if ignore is None or not bool(ignore.any()):
            return torch.zeros_like(fg)
        # Counts from bool masks: no float copy of every candidate (memory, issue 14).
        pred = (flat_logits.detach() > 0).flatten(1)
        inside = (pred & ignore.to(pred.device).flatten()).sum(1)
        area = pred.sum(1)
        return (~fg) & (area > 0) & (inside >= 0.5 * area)

    @staticmethod
    def _assigned(match: MatchResult) -> Tensor:
        """(Q,) bool: candidates in a Hungarian pair with IoU > 0 (a zero-IoU pair is only filler)."""
        assigned = torch.zeros_like(match.fg)
        assigned[match.pred_idx[match.iou > 0]] = True
        return assigned

    def _iou_rows(self, match: MatchResult) -> Tensor:
        if self.iou_over == "all":
            return torch.ones_like(match.fg)
        if self.iou_over == "assigned":
            return self._assigned(match) | match.fg
        return match.fg.clone()

    def _cls_rows(self, match: MatchResult) -> Tensor:
        if self.cls_term == "recipe":
            return torch.ones_like(match.fg)
        if self.cls_term == "off":
            return torch.zeros_like(match.fg)
        return match.fg | (match.best_iou < self.fg_iou)

    def _iou_target(self, match: MatchResult) -> Tensor:
        if self.iou_target == "best":
            return match.best_iou
        assigned = self._assigned(match)
        if self.iou_target == "assigned_zero":
            return torch.where(assigned, match.true_iou, torch.zeros_like(match.true_iou))
        return torch.where(assigned, match.true_iou, match.best_iou)

    def _weighted_sum(self, terms: Mapping[str, Tensor]) -> Tensor:
        return sum(self.weights[name] * terms[name] for name in TERMS)

    def batch_forward(self, images: Sequence[Sequence[Any] | Mapping[str, Any]]) -> LossOutput:
        """Mean of the per-image losses over a batch.

        Each item is (logits, pred_iou, gt_lowres, points_lowres[, ignore_lowres[, prompt_weights[,
        soft_lowres]]]) or a
        dict with those keys.
        Every image weighs the same, including ones without foreground (their mask terms are 0);
        since the mean is linear, loss == sum of w * (batch-mean term) still holds.
        num_fg / num_gt are totals; mean_matched_iou is over all assigned pairs of the batch.
        """
        if len(images) == 0:
            raise ValueError("batch_forward needs at least one image")
        per_image = [self(**item) if isinstance(item, Mapping) else self(*item) for item in images]
        n = len(per_image)
        matches = [m for r in per_image for m in r.matches]
        pair_ious = torch.cat([m.iou.float().cpu() for m in matches])
        return LossOutput(
            terms={name: sum(r.terms[name] for r in per_image) / n for name in ("loss",) + TERMS}, matches=matches,
            num_fg=sum(r.num_fg for r in per_image), num_gt=sum(r.num_gt for r in per_image),
            mean_matched_iou=float(pair_ious.mean()) if pair_ious.numel() else 0.0,
        )
