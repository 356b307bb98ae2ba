"""The whole training objective as one module: the student, the everything-mode loss, the prompted
loss (single / mixed mode) and distillation behind a single `forward(batch)`.

The trainer wraps this module (not the bare model) in DDP, as sam2 wraps `SAM2Train`: every decode
of a step, the grid's and the prompted one's, happens inside the wrapped forward, so DDP's hooks
see every gradient in every mode and no gradient is averaged by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from mobilesam_se.data.sample import Batch
from mobilesam_se.matching import MatchResult, point_in_masks
from mobilesam_se.models.mask_decoder import DecoderOutput
from mobilesam_se.precision import autocast
from mobilesam_se.prompts import PROMPT_SAMPLING, balanced_inclusion, balanced_subsample, subsample_prompts

Tensor = torch.Tensor
MODES = ("everything", "single", "mixed")


@dataclass
class EverythingOutput:
    """One everything-mode decode of a batch and its loss, for the parts that build on it (the
    prompted loss reuses the embeddings, distillation the outputs and the matches)."""

    terms: Dict[str, Tensor]  # "loss" (optimised) + every named term, and the match counts
    pixels: Tensor
    points: Tensor  # (B, P, 2) the prompts decoded, in the model's input frame
    lowres_points: Tensor  # the same in the frame of the low-res logits
    outputs: DecoderOutput  # the model's forward output (masks, iou_pred, embeddings, ...)
    matches: List[MatchResult]  # per image, indices into `targets`
    targets: List[Tensor]  # per image, the visible low-res ground truth


def select_prompts(points: Tensor, k: Optional[int], generator: torch.Generator) -> Tensor:
    """Sub-sample the same number of grid prompts uniformly for every image of the batch."""
    if k is None or k <= 0 or k >= points.shape[1]:
        return points
    return torch.stack([p[subsample_prompts(p.shape[0], k, generator).to(p.device)] for p in points])


def select_balanced_prompts(points: Tensor, k: Optional[int], generator: torch.Generator,
                            groups: List[Tensor]) -> tuple[Tensor, Optional[List[Tensor]]]:
    """`k` prompts per image balanced over `groups` (per image, the object under each grid point),
    and per image the prompts' weights for the IoU head's terms: the uniform inclusion probability
    over the balanced one, so that those terms still average over the whole grid (None: all 1)."""
    n = points.shape[1]
    if k is None or k <= 0 or k >= n:
        return points, None
    picks, weights = [], []
    for g in groups:
        g = g.cpu()
        idx = balanced_subsample(g, k, generator)
        picks.append(idx)
        weights.append(((k / n) / balanced_inclusion(g, k, generator)[idx]).float())
    return torch.stack([p[i.to(p.device)] for p, i in zip(points, picks)]), weights


def point_groups(lowres_points: Tensor, targets: Tensor) -> Tensor:
    """(P,) long: for each point (low-res frame) the first target mask under it, -1 on background."""
    if targets.shape[0] == 0:
        return torch.full((lowres_points.shape[0],), -1, dtype=torch.long)
    inside = point_in_masks(lowres_points, targets)
    return torch.where(inside.any(1), inside.long().argmax(1), torch.full_like(inside[:, 0], -1, dtype=torch.long))


def _visible_targets(masks_lowres: Tensor) -> Tensor:
    """Objects too small to cover a low-res cell cannot be matched (the dataset made them ignore regions)."""
    return masks_lowres[masks_lowres.flatten(1).any(1)]


def _ignore(batch: Batch, b: int) -> Optional[Tensor]:
    return batch.ignore_lowres[b] if b < len(batch.ignore_lowres) else None


def _visible_coverage(batch: Batch, b: int) -> Optional[Tensor]:
    """The soft targets of `_visible_targets`' rows (float), or None when the dataset made none."""
    if b >= len(batch.coverage_lowres) or batch.coverage_lowres[b] is None:
        return None
    return batch.coverage_lowres[b][batch.masks_lowres[b].flatten(1).any(1)].float()


class SegmentEverythingObjective(nn.Module):
    """`forward(batch, generator) -> {"loss", **named terms}`: what one micro-batch optimises.

    - model: the student (`models.sam.Sam`); criterion: `losses.everything.EverythingLoss`.
    - mode: "everything" (the grid), "single" (the prompted loss alone) or "mixed" (both).
    - prompted: `prompted.step.PromptedLoss` for single / mixed mode.
    - distiller: `distill.distiller.Distiller` or None. It is not a submodule: its teachers are frozen
      and DDP must neither broadcast nor watch them.
    - autocast_dtype: the model's autocast precision (None: fp32); losses are computed in fp32.
    Activation checkpointing is the model's own flag (`set_grad_checkpointing`, model.activation_checkpointing).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        *,
        mode: str = "everything",
        prompted: Optional[Any] = None,
        distiller: Optional[Any] = None,
        multimask_output: bool = True,
        points_per_batch: Optional[int] = 64,
        prompts_per_step: Optional[int] = None,
        prompt_sampling: str = "uniform",
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"prompted.mode must be one of {MODES}, got {mode!r}")
        if prompt_sampling not in PROMPT_SAMPLING:
            raise ValueError(f"dataset.prompt_sampling must be one of {'|'.join(PROMPT_SAMPLING)}, got {prompt_sampling!r}")
        if mode != "everything" and prompted is None:
            raise ValueError(f"prompted.mode={mode} needs the prompted loss")
        self.model = model
        self.criterion = criterion
        self.mode = mode
        self.prompted = prompted
        self.distiller = distiller  # not an nn.Module, so never a registered submodule
        self.multimask_output = multimask_output
        self.points_per_batch = points_per_batch
        self.prompts_per_step = prompts_per_step
        self.prompt_sampling = prompt_sampling
        self.autocast_dtype = autocast_dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def everything(self, batch: Batch, generator: Optional[torch.Generator] = None,
                   return_features: bool = False, record_attention: bool = False) -> EverythingOutput:
        """Encode each image once, decode its grid (each point its own prompt), match and score every candidate."""
        device = self.device
        batch = batch.to(device, non_blocking=True)  # a no-op for a batch `forward` has moved
        pixels = batch.image
        targets = [_visible_targets(batch.masks_lowres[b]) for b in range(len(batch))]
        generator = generator or torch.Generator()
        weights: Optional[List[Tensor]] = None
        if self.prompt_sampling == "balanced":
            groups = [point_groups(self.model.lowres_coords(batch.points[b]), targets[b]) for b in range(len(batch))]
            points, weights = select_balanced_prompts(batch.points, self.prompts_per_step, generator, groups)
        else:
            points = select_prompts(batch.points, self.prompts_per_step, generator)
        with autocast(device, self.autocast_dtype):
            out = self.model(
                pixels, points, multimask_output=self.multimask_output, points_per_batch=self.points_per_batch,
                return_features=return_features, record_attention=record_attention,
            )
        lowres_points = self.model.lowres_coords(points)  # the logits' frame (4x coarser than the input)
        res = self.criterion.batch_forward([
            (out.masks[b].float(), out.iou_pred[b].float(), targets[b], lowres_points[b], _ignore(batch, b),
             None if weights is None else weights[b].to(device), _visible_coverage(batch, b))
            for b in range(len(batch))
        ])
        terms = dict(res.terms)
        terms.update({k: torch.as_tensor(float(getattr(res, k))) for k in ("num_fg", "num_gt", "mean_matched_iou")})
        return EverythingOutput(terms=terms, pixels=pixels, points=points, lowres_points=lowres_points, outputs=out,
                                matches=res.matches, targets=targets)

    def forward(self, batch: Batch, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        device = self.device
        # Once for every part: they all see the same tensors (the distiller recognises the batch's image).
        batch = batch.to(device, non_blocking=True)
        generator = generator if generator is not None else torch.Generator()
        distiller = self.distiller
        terms: Dict[str, Tensor] = {}
        grid: Optional[EverythingOutput] = None
        if self.mode != "single":
            if distiller is not None:
                # A mask teacher may add its own masks to the targets (distillation.mask_teacher.method=replace_gt).
                batch = distiller.prepare_targets(batch, device, self.autocast_dtype)
            features = distiller is not None and distiller.needs_features
            grid = self.everything(batch, generator, return_features=features,
                                   record_attention=features and distiller.needs_attention)
            terms.update(grid.terms)
        if self.prompted is not None:
            # Single mode encodes here; mixed mode reuses the grid's embeddings (still on the graph).
            embeddings = grid.outputs.embeddings if grid is not None else None
            extra = self.prompted(self.model, batch, embeddings, device, self.autocast_dtype, generator)
            terms["loss"] = terms["loss"] + extra["loss"] if "loss" in terms else extra["loss"]
            terms.update({k: v for k, v in extra.items() if k != "loss"})
        if distiller is not None and grid is not None:
            distilled = distiller(batch, grid)
            terms["loss"] = terms["loss"] + distilled["distill/total"]
            terms.update(distilled)
        return terms
