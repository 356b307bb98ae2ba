"""SAM's prompt encoder: random-Fourier positional encoding of points and boxes, mask embedding.

Parameter names follow SAM's so official checkpoints load by name. Unlike SAM, prompts carry an
explicit prompt axis: points are (B, P, K, 2) for B images with P prompts of K points each, so a
whole grid of single-point prompts is embedded in one call.
"""
from __future__ import annotations

import math
from typing import Optional, Set, Tuple

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Fourier features of normalised coordinates with a fixed Gaussian projection."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        # coords in [0, 1] -> [-1, 1] -> 2*pi*(xy @ G) -> [sin, cos]
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an h x w grid of cell centres: (C, h, w)."""
        h, w = size
        dev = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """Encoding of (..., 2) pixel xy coordinates in an image of `image_size` (h, w)."""
        coords = coords.to(torch.float32).clone()
        coords[..., 0] = coords[..., 0] / image_size[1]
        coords[..., 1] = coords[..., 1] / image_size[0]
        return self._pe_encoding(coords)


class PromptEncoder(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Tuple[int, int],
        input_image_size: Tuple[int, int],
        mask_in_chans: int = 16,
        pe_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2, pe_scale)
        # 0: negative point, 1: positive point, 2/3: box corners.
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def set_input_size(self, image_size: int, stride: int = 16) -> None:
        """Frame of an S x S input (embedding grid S/stride, mask prompts 4x that): no weight depends on it."""
        self.input_image_size = (image_size, image_size)
        self.image_embedding_size = (image_size // stride, image_size // stride)
        self.mask_input_size = (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

    def no_weight_decay(self) -> Set[str]:
        """The learned prompt embeddings (point labels, box corners, padding, no mask): tokens like a
        ViT's class token, which weight decay would only pull toward zero."""
        return {f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Embedding)}

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, h, w) positional encoding of the image embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """points (..., K, 2) in the resized frame, labels (..., K) in {-1, 0, 1} -> (..., K[+1], C)."""
        points = points + 0.5  # pixel centres
        if pad:
            # Without a box SAM appends one "not a point" token; keep that so outputs match.
            points = torch.cat([points, torch.zeros_like(points[..., :1, :])], dim=-2)
            labels = torch.cat([labels, -torch.ones_like(labels[..., :1])], dim=-1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = torch.where(lab == -1, torch.zeros_like(emb), emb)
        emb = emb + (lab == -1) * self.not_a_point_embed.weight[0]
        emb = emb + (lab == 0) * self.point_embeddings[0].weight[0]
        emb = emb + (lab == 1) * self.point_embeddings[1].weight[0]
        return emb

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """boxes (..., 4) XYXY in the resized frame -> (..., 2, C) corner tokens."""
        corners = boxes.reshape(*boxes.shape[:-1], 2, 2) + 0.5
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_w = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return emb + corner_w

    def embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        return self.mask_downscaling(masks)

    def forward(
        self,
        points: Optional[Tuple[torch.Tensor, torch.Tensor]],
        boxes: Optional[torch.Tensor],
        masks: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sparse tokens (..., T, C) for prompts with leading dims (...), and dense (B, C, h, w).

        `masks`, when given, is one low-res mask prompt per image, (B, 1, 4h, 4w): it is shared by
        all of that image's prompts (the everything mode never uses mask prompts).
        """
        parts = []
        if points is not None:
            coords, labels = points
            parts.append(self.embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            parts.append(self.embed_boxes(boxes))
        if not parts:
            raise ValueError("a prompt needs points or a box")
        sparse = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
        if masks is not None:
            dense = self.embed_masks(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
                1, -1, self.image_embedding_size[0], self.image_embedding_size[1]
            )
        return sparse, dense
