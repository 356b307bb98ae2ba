"""The promptable segmenter: image encoder + prompt encoder + mask decoder, with grid prediction."""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
from typing import Any, List, Optional, Sequence, Set

import numpy as np
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mobilesam_se.models.mask_decoder import DecoderOutput, MaskDecoder
from mobilesam_se.models.prompt_encoder import PromptEncoder
from mobilesam_se.transforms import preprocess_image

Tensor = torch.Tensor


def _cat_outputs(chunks: List[DecoderOutput]) -> DecoderOutput:
    if len(chunks) == 1:
        return chunks[0]

    def cat(name: str) -> Optional[Tensor]:
        vals = [getattr(c, name) for c in chunks]
        return None if vals[0] is None else torch.cat(vals, dim=1)

    attention = {}
    for key in chunks[0].attention:
        attention[key] = [torch.cat([c.attention[key][i] for c in chunks], dim=1) for i in range(len(chunks[0].attention[key]))]
    return DecoderOutput(
        masks=cat("masks"), iou_pred=cat("iou_pred"), tokens=cat("tokens"),
        mask_token_out=cat("mask_token_out"), attention=attention,
    )


def _load_malloc_trim() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to release
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_heap(device: torch.device) -> None:
    """Hand the CPU heap's free pages back to the OS (glibc `malloc_trim`); no-op elsewhere.

    Why: the decoder's per-prompt pieces are below glibc's mmap threshold, so they live on the heap.
    Under autograd (checkpointed chunks), freed pieces are not reused across chunks: the heap grew by
    ~16 MB per prompt of freed, never-returned memory, most of the peak RSS of a 32x32 grid step.
    Trimming once per chunk keeps the reuse within a chunk (the point of the pieces) and bounds RSS.
    """
    if device.type == "cpu" and _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class _ReleaseHeapInBackward(torch.autograd.Function):
    """Identity whose backward trims the heap: on a chunk's input, it runs once that chunk's
    recomputation and backward are done, before the next chunk is recomputed."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        release_free_heap(grad.device)
        return grad


class SamModel(nn.Module):
    """MobileSAM (or a SAM teacher) with `image_size` as a real parameter.

    `image_size` S sets the input (S x S after resize + pad), the embedding grid (S/16) and the
    low-res masks (S/4). Training settings are declared by the model, as timm's models do:
    `set_grad_checkpointing` and `no_weight_decay`.
    """

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int = 1024,
    ) -> None:
        super().__init__()
        if image_size % 16:
            raise ValueError(f"model.image_size must be a multiple of 16, got {image_size}")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.grad_checkpointing = False

    # CPU: recomputed activations of one checkpointed piece of prompts, at most about this many bytes.
    # A prompt's decoder activations are ~64 x N x C bytes (N embedding positions, C channels:
    # 64 MB at 1024 px), so a 64-prompt chunk recomputed in backward took ~4 GB; 512 MB is 8
    # prompts at 1024 px, and the decoder works on pieces of 4 prompts on the CPU anyway.
    CPU_CHECKPOINT_BYTES = 512 << 20
    # Prompts per checkpointed piece; None: automatic (all of points_per_batch off the CPU).
    checkpoint_chunk: Optional[int] = None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each piece of prompts' decoder activations in backward (timm's name and use).

        The decoder is what grows with the grid: its activations are per prompt, the encoder's per
        image. Gradients are the same either way; memory falls to one piece's worth.
        """
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> Set[str]:
        """Names of the weights AdamW must not decay, beyond the biases and other 1-d parameters
        (norms) that the optimiser exempts by shape: each part's learned embeddings."""
        return {f"{name}.{key}" for name, part in self.named_children() if hasattr(part, "no_weight_decay")
                for key in part.no_weight_decay()}

    def checkpoint_prompts(self, embeddings: Tensor) -> int:
        """Prompts per checkpointed piece of `decode` (a cap on points_per_batch)."""
        if self.checkpoint_chunk:
            return max(1, self.checkpoint_chunk)
        if embeddings.device.type != "cpu":
            return 1 << 30
        per_prompt = 64 * embeddings[0, 0].numel() * embeddings.shape[1]
        return max(1, self.CPU_CHECKPOINT_BYTES // per_prompt)

    def set_image_size(self, image_size: int) -> None:
        """Run at another input side S (a multiple of 16) with the same weights: the image encoder
        has no resolution of its own, and the prompt encoder's frame and grid follow S. For the
        low-resolution epochs of a from-scratch run (`trainer.low_res_fraction`); a checkpoint is
        always described and saved at the size the model was built for."""
        if image_size <= 0 or image_size % 16:
            raise ValueError(f"image size must be a positive multiple of 16, got {image_size}")
        self.image_size = int(image_size)
        self.prompt_encoder.set_input_size(self.image_size)

    @property
    def device(self) -> torch.device:
        return self.prompt_encoder.point_embeddings[0].weight.device

    @property
    def low_res_size(self) -> int:
        return self.image_size // 4

    def lowres_coords(self, points: Tensor) -> Tensor:
        """Points of the model's input frame in the frame of its low-res mask logits."""
        return points * (self.low_res_size / self.image_size)

    # -- images ------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> Tensor:
        """HxWx3 uint8 RGB images -> (B, 3, S, S) normalised, padded model input on the model's device."""
        return torch.stack([preprocess_image(im, self.image_size) for im in images]).to(self.device)

    def encode(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) -> image embeddings (B, C, S/16, S/16)."""
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected input {self.image_size}x{self.image_size}, got {tuple(pixels.shape[-2:])}")
        return self.image_encoder(pixels)

    # -- prompts -----------------------------------------------------------------------------
    def _decode_chunk(
        self,
        embeddings: Tensor,
        coords: Optional[Tensor],
        labels: Optional[Tensor],
        boxes: Optional[Tensor],
        mask_input: Optional[Tensor],
        multimask_output: bool,
        return_features: bool,
        record_attention: bool,
    ) -> DecoderOutput:
        points = (coords, labels) if coords is not None else None
        sparse, dense = self.prompt_encoder(points, boxes, mask_input)
        return self.mask_decoder(
            embeddings,
            self.prompt_encoder.get_dense_pe(),
            sparse,
            dense,
            multimask_output,
            return_features=return_features,
            record_attention=record_attention,
        )

    def decode(
        self,
        embeddings: Tensor,
        coords: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        boxes: Optional[Tensor] = None,
        mask_input: Optional[Tensor] = None,
        multimask_output: bool = True,
        points_per_batch: Optional[int] = None,
        return_features: bool = False,
        record_attention: bool = False,
    ) -> DecoderOutput:
        """Decode P prompts per image, `points_per_batch` prompts at a time.

        embeddings (B, C, h, w); coords (B, P, K, 2) xy in the resized frame; labels (B, P, K)
        (1 positive, 0 negative, -1 padding); boxes (B, P, 4) XYXY; mask_input (B, 1, 4h, 4w).
        Each image's embedding meets only its own prompts. Differentiable; with
        `grad_checkpointing` each chunk's activations are recomputed in backward, and a chunk is at
        most `checkpoint_prompts` prompts (fewer on the CPU, to bound the recomputation).
        """
        lead = coords if coords is not None else boxes
        if lead is None:
            raise ValueError("decode needs point coords or boxes")
        P = lead.shape[1]
        step = P if not points_per_batch or points_per_batch <= 0 else points_per_batch
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        if checkpointed:
            step = min(step, self.checkpoint_prompts(embeddings))
        outs = []
        for s in range(0, P, step):
            sl = slice(s, s + step)
            args = (
                embeddings,
                None if coords is None else coords[:, sl],
                None if labels is None else labels[:, sl],
                None if boxes is None else boxes[:, sl],
                mask_input,
            )
            if checkpointed:
                cpu = embeddings.device.type == "cpu"
                if cpu and embeddings.requires_grad:
                    args = (_ReleaseHeapInBackward.apply(embeddings),) + args[1:]
                outs.append(
                    checkpoint(
                        self._decode_chunk, *args, multimask_output, return_features, record_attention,
                        use_reentrant=False,
                    )
                )
                if cpu:
                    release_free_heap(embeddings.device)
            else:
                outs.append(self._decode_chunk(*args, multimask_output, return_features, record_attention))
        return _cat_outputs(outs)

    def predict_grid(
        self,
        embeddings: Tensor,
        points: Tensor,
        multimask_output: bool = True,
        points_per_batch: Optional[int] = 64,
        return_features: bool = False,
        record_attention: bool = False,
    ) -> DecoderOutput:
        """Everything mode: every point of (B, P, 2) is its own single-point positive prompt.

        Returns logits (B, P, M, S/4, S/4) and predicted IoUs (B, P, M); M = 3 with multimask
        (tokens 1-3), 1 without (token 0).
        """
        if points.dim() != 3 or points.shape[-1] != 2:
            raise ValueError(f"points must be (B, P, 2), got {tuple(points.shape)}")
        coords = points.unsqueeze(2)  # one point per prompt, never one prompt of many points
        labels = torch.ones(coords.shape[:3], dtype=torch.long, device=points.device)
        return self.decode(
            embeddings, coords, labels, multimask_output=multimask_output, points_per_batch=points_per_batch,
            return_features=return_features, record_attention=record_attention,
        )

    def forward(
        self,
        pixels: Tensor,
        points: Tensor,
        multimask_output: bool = True,
        points_per_batch: Optional[int] = 64,
        return_features: bool = False,
        record_attention: bool = False,
    ) -> DecoderOutput:
        """Encode images and decode their grids in one call: `predict_grid`'s output with the
        `embeddings` (B, C, h, w) it decoded from (the prompted loss and distillation reuse them)."""
        embeddings = self.encode(pixels)
        out = self.predict_grid(embeddings, points, multimask_output, points_per_batch, return_features,
                                record_attention)
        return dataclasses.replace(out, embeddings=embeddings)
