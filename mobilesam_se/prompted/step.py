"""The prompted loss of one micro-batch (single and mixed modes), a part of the objective.

Single mode: this is the whole step. The batch's images are encoded in one `encode` call and each
image's embedding then serves all of its sampled objects, since the encoder costs far more than
the decoder. Mixed mode: the everything step has already encoded the batch, and its embeddings
(still on the graph) are reused, so the encoder runs once
per image for both losses and receives the gradients of both.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from mobilesam_se.data.sample import Batch
from mobilesam_se.precision import autocast
from mobilesam_se.prompted.loss import PromptedLossWeights, best_candidate_loss
from mobilesam_se.prompted.sampling import ObjectPrompts, PromptSampling, sample_prompts

Tensor = torch.Tensor


class PromptedLoss:
    """Callable `(model, batch, embeddings, device, autocast_dtype, generator) -> {"loss", "prompted/..."}`.

    `loss` is multiplied by `weight` (prompted.mixed_weight in mixed mode, 1 in single mode); the
    logged `prompted/*` terms are unweighted so runs with different weights compare directly.
    """

    def __init__(
        self,
        sampling: PromptSampling,
        weights: PromptedLossWeights,
        multimask_output: bool = True,
        points_per_batch: Optional[int] = 64,
        weight: float = 1.0,
    ) -> None:
        self.sampling = sampling
        self.weights = weights
        self.multimask_output = multimask_output
        self.points_per_batch = points_per_batch
        self.weight = weight

    def _embeddings(self, model: nn.Module, batch: Batch, embeddings: Optional[Tensor], device: torch.device,
                    autocast_dtype: Optional[torch.dtype]) -> Tensor:
        if embeddings is not None:
            return embeddings
        pixels = batch.image.to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            return model.encode(pixels)

    def _decode(self, model: nn.Module, embedding: Tensor, prompts: ObjectPrompts, rows: Tensor,
                boxes: bool, device: torch.device):
        """Decode the objects `rows` of one image, all by box or all by points (one decode call:
        a call's prompts share one kind, since a box drops SAM's padding token)."""
        kw: Dict[str, Any] = {}
        if boxes:
            kw["boxes"] = prompts.boxes[rows][None].to(device)
        else:
            kw["coords"] = prompts.coords[rows][None].to(device)
            kw["labels"] = prompts.labels[rows][None].to(device)
        # Checkpointed or not as the model's grad_checkpointing flag says (model.activation_checkpointing).
        out = model.decode(embedding, multimask_output=self.multimask_output, points_per_batch=self.points_per_batch, **kw)
        return out.masks[0], out.iou_pred[0]

    def __call__(
        self,
        model: nn.Module,
        batch: Batch,
        embeddings: Optional[Tensor],
        device: torch.device,
        autocast_dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Dict[str, Tensor]:
        """`model`: the bare student; `embeddings`: the batch's image embeddings when the everything
        step already made them (mixed mode), else None (they are computed here)."""
        generator = generator if generator is not None else torch.Generator()
        embeddings = self._embeddings(model, batch, embeddings, device, autocast_dtype)
        logits: List[Tensor] = []
        iou_pred: List[Tensor] = []
        targets: List[Tensor] = []
        for b in range(embeddings.shape[0]):
            masks_lowres = batch.masks_lowres[b]
            prompts = sample_prompts(masks_lowres, tuple(batch.input_size[b]), model.image_size,
                                     self.sampling, generator)
            for by_box in (True, False):
                rows = torch.nonzero(prompts.use_box == by_box).flatten()
                if len(rows) == 0:
                    continue
                with autocast(device, autocast_dtype):
                    m, s = self._decode(model, embeddings[b : b + 1], prompts, rows, by_box, device)
                logits.append(m)
                iou_pred.append(s)
                targets.append(masks_lowres[prompts.index[rows]].to(device, non_blocking=True))
        if logits:
            terms = best_candidate_loss(torch.cat(logits), torch.cat(iou_pred), torch.cat(targets), self.weights)
            num = sum(len(t) for t in targets)
        else:
            # No visible object in the batch: a zero on the encoder's graph keeps backward() valid.
            zero = embeddings.sum().float() * 0.0
            terms, num = {"loss": zero, "focal": zero, "dice": zero, "iou": zero}, 0
        return {
            "loss": terms["loss"] * self.weight,
            "prompted/focal": terms["focal"].detach(),
            "prompted/dice": terms["dice"].detach(),
            "prompted/iou": terms["iou"].detach(),
            "prompted/num_objects": torch.tensor(float(num)),
        }


def build_prompted_loss(
    *, mode: str, mixed_weight: float, prompt_mode: str, objects_per_image: int, max_bbox_shift: int,
    min_points: int, max_points: int, negative_points: int, w_focal: float, w_dice: float, w_iou: float,
    focal_alpha: float, focal_gamma: float, multimask_output: bool, points_per_batch: Optional[int],
) -> PromptedLoss:
    """The `prompted` group's `_target_`: the objective's prompted loss for `prompted.mode` single
    (weight 1) or mixed (prompted.mixed_weight)."""
    if mode not in ("single", "mixed"):
        raise ValueError(f"the prompted loss is for prompted.mode single|mixed, got {mode!r}")
    sampling = PromptSampling(
        prompt_mode=prompt_mode, max_objects=objects_per_image, min_points=min_points,
        max_points=max_points, negative_points=negative_points, max_bbox_shift=max_bbox_shift,
    )
    weights = PromptedLossWeights(focal=w_focal, dice=w_dice, iou=w_iou, focal_alpha=focal_alpha, focal_gamma=focal_gamma)
    return PromptedLoss(
        sampling, weights, multimask_output=multimask_output, points_per_batch=points_per_batch,
        weight=float(mixed_weight) if mode == "mixed" else 1.0,
    )
