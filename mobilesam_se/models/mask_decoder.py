"""SAM's mask decoder, batched over prompts: (B images) x (P prompts) in one pass.

Parameter names are SAM's. The output upscaling (two 2x2/stride-2 transposed convs with a channel
LayerNorm and GELUs) is done channels-last as per-pixel matmuls: a 2x2/stride-2 transposed conv is
a linear map C -> 4C' per input pixel, so the sub-pixel layout is only resolved once, on the final
low-res masks, which are far smaller than the upscaling activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from mobilesam_se.models.common import MLP, LayerNorm2d
from mobilesam_se.models.transformer import TwoWayTransformer

Tensor = torch.Tensor


@dataclass
class DecoderOutput:
    masks: Tensor  # (B, P, M, 4h, 4w) low-res logits
    iou_pred: Tensor  # (B, P, M) predicted IoU (an IoU estimate, no sigmoid)
    tokens: Optional[Tensor] = None  # (B, P, T, C) transformer query outputs (prompt-conditioned)
    mask_token_out: Optional[Tensor] = None  # (B, P, M, C') hypernetwork outputs of the used tokens
    attention: Dict[str, List[Tensor]] = field(default_factory=dict)


class MaskDecoder(nn.Module):
    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: Type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)

    def mask_slice(self, multimask_output: bool) -> slice:
        # Token 0 answers an ambiguous single prompt; tokens 1..3 are the multimask candidates.
        return slice(1, None) if multimask_output else slice(0, 1)

    def _upscale(self, src: Tensor) -> Tensor:
        """(BP, N, C) per-prompt keys -> (BP, N, 16, C/8): the two transposed convs, channels-last."""
        conv1, ln, act1, conv2, act2 = self.output_upscaling
        BP, N, C = src.shape
        c1, c2 = conv1.out_channels, conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(C, 4 * c1)  # (Cin, a, b, Cout)
        x = torch.addmm(conv1.bias.repeat(4), src.reshape(BP * N, C), w1).view(BP * N * 4, c1)
        x = act1(F.layer_norm(x, (c1,), ln.weight, ln.bias, ln.eps))
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        x = act2(torch.addmm(conv2.bias.repeat(4), x, w2))
        return x.view(BP, N * 16, c2)

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
        return_features: bool = False,
        record_attention: bool = False,
    ) -> DecoderOutput:
        """image_embeddings (B, C, h, w); image_pe (1, C, h, w); sparse (B, P, S, C); dense (B|1, C, h, w)."""
        B, C, h, w = image_embeddings.shape
        P, S = sparse_prompt_embeddings.shape[1:3]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [out_tokens.to(sparse_prompt_embeddings.dtype).expand(B, P, -1, -1), sparse_prompt_embeddings], dim=2
        )
        # The dense prompt is per image (no per-prompt mask inputs), so the image side stays shared.
        image = (image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2)  # (B, N, C)
        pe = image_pe.flatten(2).transpose(1, 2).to(image.dtype)
        record: Optional[Dict[str, List[Tensor]]] = {} if record_attention else None
        hs, keys = self.transformer(image, pe, tokens, record)

        sl = self.mask_slice(multimask_output)
        idx = range(self.num_mask_tokens)[sl]
        mask_tokens_out = hs[:, :, 1 : 1 + self.num_mask_tokens, :]
        hyper = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, :, i, :]) for i in idx], dim=2)
        up = self._upscale(keys.reshape(B * P, h * w, C))  # (BP, 16N, C/8)
        masks = torch.bmm(hyper.reshape(B * P, len(idx), -1), up.transpose(1, 2))
        # (i, j, a1, b1, a2, b2) -> row 4i + 2a1 + a2, col 4j + 2b1 + b2
        masks = masks.view(B, P, len(idx), h, w, 2, 2, 2, 2).permute(0, 1, 2, 3, 5, 7, 4, 6, 8)
        masks = masks.reshape(B, P, len(idx), 4 * h, 4 * w)
        iou_pred = self.iou_prediction_head(hs[:, :, 0, :])[..., sl]
        return DecoderOutput(
            masks=masks,
            iou_pred=iou_pred,
            tokens=hs if return_features else None,
            mask_token_out=mask_tokens_out[:, :, sl] if return_features else None,
            attention=record or {},
        )
