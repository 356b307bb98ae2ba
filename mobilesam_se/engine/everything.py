"""One everything-mode step: encode each image once, decode its grid, match and score every candidate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn as nn

from mobilesam_se.prompts import subsample_prompts


@dataclass
class StepOutput:
    losses: Dict[str, torch.Tensor]  # "loss" (optimised) + every named term
    stats: Dict[str, float]  # counts for logging
    context: Dict[str, Any]  # what distillation needs: embeddings, points, outputs, matches


def select_prompts(points: torch.Tensor, k: Optional[int], generator: torch.Generator) -> torch.Tensor:
    """Sub-sample the same number of grid prompts for every image of the batch."""
    if k is None or k <= 0 or k >= points.shape[1]:
        return points
    return torch.stack([p[subsample_prompts(p.shape[0], k, generator).to(p.device)] for p in points])


def _visible_targets(masks_lowres: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Objects too small to cover a low-res cell cannot be matched; leave them out of the targets."""
    masks_lowres = masks_lowres.to(device, non_blocking=True)
    return masks_lowres[masks_lowres.flatten(1).any(1)]


def _ignore(batch: Dict[str, Any], b: int, device: torch.device) -> Optional[torch.Tensor]:
    ignore = batch.get("ignore_lowres")
    return None if ignore is None or ignore[b] is None else ignore[b].to(device)


def everything_step(
    model: nn.Module,
    criterion: nn.Module,
    batch: Dict[str, Any],
    device: torch.device,
    multimask_output: bool,
    points_per_batch: int,
    activation_checkpointing: bool = False,
    prompts_per_step: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    return_features: bool = False,
    record_attention: bool = False,
) -> StepOutput:
    """`model` may be a DDP wrapper: everything goes through its forward."""
    pixels = batch["image"].to(device, non_blocking=True)
    points = select_prompts(batch["points"], prompts_per_step, generator or torch.Generator()).to(device)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(
            pixels, points, multimask_output=multimask_output, points_per_batch=points_per_batch,
            activation_checkpointing=activation_checkpointing, return_features=return_features,
            record_attention=record_attention,
        )
    # Points live in the resized input frame; the logits' frame is 4x coarser. Losses in fp32.
    targets = [_visible_targets(batch["masks_lowres"][b], device) for b in range(pixels.shape[0])]
    res = criterion.batch_forward(
        [
            (out["masks"][b].float(), out["iou_pred"][b].float(), targets[b], points[b] / 4.0, _ignore(batch, b, device))
            for b in range(pixels.shape[0])
        ]
    )
    losses = {k: v for k, v in res.items() if isinstance(v, torch.Tensor) and v.dim() == 0}
    stats = {"num_fg": float(res["num_fg"]), "num_gt": float(res["num_gt"]), "mean_matched_iou": float(res["mean_matched_iou"])}
    # matches index into `targets` (the visible ground truth), not into batch["masks_lowres"].
    context = {"pixels": pixels, "points": points, "outputs": out, "matches": res["matches"], "targets": targets}
    return StepOutput(losses=losses, stats=stats, context=context)
