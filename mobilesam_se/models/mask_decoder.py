"""SAM's mask decoder, batched over prompts: (B images) x (P prompts) in one pass.

Parameter names are SAM's. The output upscaling (two 2x2/stride-2 transposed convs with a channel
LayerNorm and GELUs) is done channels-last as per-pixel matmuls: a 2x2/stride-2 transposed conv is
a linear map C -> 4C' per input pixel, so the sub-pixel layout is only resolved once, on the final
low-res masks, which are far smaller than the upscaling activations.

Token-side work runs for all prompts at once; image-sized per-prompt work (transformer from the
first image-to-token attention on, upscaling, mask product) runs on pieces of a few prompts (see
`chunk_sizes`). On CPU a piece's activations are a few MB: they stay in cache and the allocator
recycles them, whereas with 64 prompts every elementwise op would write a fresh 256 MB buffer, and
the page faults cost more than the op. On GPU all prompts of an image go at once. Without autograd
the GELUs run in place and the masks are written straight into their final layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from mobilesam_se.models.common import MLP
from mobilesam_se.models.transformer import TwoWayTransformer

Tensor = torch.Tensor


@dataclass
class DecoderOutput:
    """What the model returns, from `decode` / `predict_grid` and from `SamModel.forward` (which adds
    the image embeddings)."""

    masks: Tensor  # (B, P, M, 4h, 4w) low-res logits
    iou_pred: Tensor  # (B, P, M) predicted IoU (an IoU estimate, no sigmoid)
    tokens: Optional[Tensor] = None  # (B, P, T, C) transformer query outputs (prompt-conditioned)
    mask_token_out: Optional[Tensor] = None  # (B, P, M, C') hypernetwork outputs of the used tokens
    attention: Dict[str, List[Tensor]] = field(default_factory=dict)
    embeddings: Optional[Tensor] = None  # (B, C, h, w) the image embeddings decoded from (SamModel.forward)


class MaskDecoder(nn.Module):
    # On CPU, per-prompt activations are processed in pieces of about this many bytes: small enough
    # for the last-level cache and below glibc's largest mmap threshold (32 MB), so their buffers
    # are recycled by the heap instead of being page-faulted afresh by every op.
    CPU_CHUNK_BYTES = 16 << 20

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
        # Prompts per piece of the per-prompt work; None: automatic (see `chunk_sizes`).
        self.prompt_chunk: Optional[int] = None

    def no_weight_decay(self) -> Set[str]:
        """The learned output tokens (IoU and mask tokens), like a ViT's class token."""
        return {"iou_token.weight", "mask_tokens.weight"}

    def mask_slice(self, multimask_output: bool) -> slice:
        # Token 0 answers an ambiguous single prompt; tokens 1..3 are the multimask candidates.
        return slice(1, None) if multimask_output else slice(0, 1)

    # -- per-chunk pieces ----------------------------------------------------------------------
    def chunk_sizes(self, num_prompts: int, num_positions: int, device: torch.device) -> Tuple[int, int]:
        """(prompts per transformer piece, prompts per upscaling piece).

        `prompt_chunk` if set; all prompts off-CPU; on CPU about CPU_CHUNK_BYTES per piece of keys
        (n x N x C) and of the final upscaling activation (n x 16N x C/8).
        """
        if self.prompt_chunk:
            n = max(1, min(num_prompts, self.prompt_chunk))
            return n, n
        if device.type != "cpu":
            return max(1, num_prompts), max(1, num_prompts)
        keys = num_positions * self.transformer_dim * 4
        up = 16 * num_positions * (self.transformer_dim // 8) * 4
        return (max(1, min(num_prompts, self.CPU_CHUNK_BYTES // keys)),
                max(1, min(num_prompts, self.CPU_CHUNK_BYTES // up)))

    def _hyper(self, x: Tensor, idx: Sequence[int]) -> Tensor:
        """(B, P, M, C) mask tokens -> (B, P, M, C/8): the M used MLPs as batched matmuls."""
        mlps = [self.output_hypernetworks_mlps[i] for i in idx]
        B, P, M, C = x.shape
        y = x.reshape(B * P, M, C).transpose(0, 1)  # (M, BP, C)
        depth = len(mlps[0].layers)
        for j in range(depth):
            w = torch.stack([m.layers[j].weight.t() for m in mlps])  # (M, in, out)
            b = torch.stack([m.layers[j].bias[None] for m in mlps])  # (M, 1, out)
            y = torch.baddbmm(b.to(y.dtype), y, w.to(y.dtype))
            if j < depth - 1:
                y = F.relu(y)
        return y.transpose(0, 1).reshape(B, P, M, -1)

    def _upscale_weights(self) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        conv1, _, _, conv2, _ = self.output_upscaling
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * conv1.out_channels)  # (Cin, a, b, Cout)
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.in_channels, 4 * conv2.out_channels)
        return w1, conv1.bias.repeat(4), w2, conv2.bias.repeat(4)

    def _masks(self, keys: Tensor, hyper: Tensor, weights: Tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        """keys (n, N, C), hyper (n, M, C/8) -> (n, 16N, M) masks, rows in sub-pixel order (i, j, a1, b1, a2, b2).

        Pixels-major output, so that the backward's gradient for the big upscaled activation is a
        plain matmul (no transposed copy of it)."""
        _, ln, act1, _, act2 = self.output_upscaling
        w1, b1, w2, b2 = weights
        n, N, C = keys.shape
        c1 = ln.weight.shape[0]
        inplace = not torch.is_grad_enabled()
        x = torch.addmm(b1, keys.reshape(n * N, C), w1).view(n * N * 4, c1)
        x = _act(act1, F.layer_norm(x, (c1,), ln.weight, ln.bias, ln.eps), inplace)
        x = torch.addmm(b2, x, w2).view(n, 16 * N, -1)
        if type(act2) is nn.GELU and torch.is_grad_enabled() and (x.requires_grad or hyper.requires_grad):
            return _GeluMasks.apply(x, hyper, act2.approximate)
        return torch.bmm(_act(act2, x, inplace), hyper.to(x.dtype).transpose(1, 2))

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
        P = sparse_prompt_embeddings.shape[1]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat(
            [out_tokens.to(sparse_prompt_embeddings.dtype).expand(B, P, -1, -1), sparse_prompt_embeddings], dim=2
        )
        # The dense prompt is per image (no per-prompt mask inputs), so the image side stays shared.
        image = (image_embeddings + dense_prompt_embeddings).flatten(2).transpose(1, 2)  # (B, N, C)
        pe = image_pe.flatten(2).transpose(1, 2).to(image.dtype)
        record: Optional[Dict[str, List[Tensor]]] = {} if record_attention else None
        chunk, up_chunk = self.chunk_sizes(P, h * w, image.device)
        hs, keys, spans = self.transformer.run(image, pe, tokens, chunk, record)

        sl = self.mask_slice(multimask_output)
        idx = list(range(self.num_mask_tokens))[sl]
        M = len(idx)
        mask_tokens_out = hs[:, :, 1 : 1 + self.num_mask_tokens]
        hyper = self._hyper(mask_tokens_out[:, :, sl], idx)  # (B, P, M, C/8)
        up_w = self._upscale_weights()
        keep_graph = torch.is_grad_enabled()
        pieces: List[Tensor] = []
        masks: Optional[Tensor] = None
        for i, (b, span) in enumerate(spans):
            k = keys[i]
            keys[i] = None  # type: ignore[call-overload]  # free each piece once upscaled
            for s in range(0, k.shape[0], up_chunk):
                n = min(up_chunk, k.shape[0] - s)
                m = self._masks(k[s : s + n], hyper[b, span][s : s + n], up_w)
                # (i, j, a1, b1, a2, b2) -> row 4i + 2a1 + a2, col 4j + 2b1 + b2
                m = m.view(n, h, w, 2, 2, 2, 2, M).permute(0, 7, 1, 3, 5, 2, 4, 6)
                if keep_graph:
                    pieces.append(m.reshape(n, M, 4 * h, 4 * w))
                else:  # written straight into the output, in its final layout
                    if masks is None:
                        masks = torch.empty(B, P, M, 4 * h, 4 * w, dtype=m.dtype, device=m.device)
                    p0 = span.start + s
                    masks[b, p0 : p0 + n].view(n, M, h, 2, 2, w, 2, 2).copy_(m)
        if keep_graph:
            masks = torch.cat(pieces).view(B, P, M, 4 * h, 4 * w)
        iou_pred = self.iou_prediction_head(hs[:, :, 0, :])[..., sl]
        return DecoderOutput(
            masks=masks,
            iou_pred=iou_pred,
            tokens=hs if return_features else None,
            mask_token_out=mask_tokens_out[:, :, sl] if return_features else None,
            attention=record or {},
        )


def _act(module: nn.Module, x: Tensor, inplace: bool) -> Tensor:
    """Apply an activation module, in place on a fresh buffer when no graph is kept."""
    if inplace:
        if type(module) is nn.GELU:
            return torch.ops.aten.gelu_(x, approximate=module.approximate)
        if type(module) is nn.ReLU:
            return x.relu_()
    return module(x)


class _GeluMasks(torch.autograd.Function):
    """masks = gelu(x) @ hyper^T per prompt: x (n, L, c), hyper (n, M, c) -> (n, L, M).

    Autograd would keep both x and gelu(x) (the biggest activations, 16N x C/8 per prompt) and get
    hyper's gradient as x^T @ grad, a (c x M) product with a 16N-long reduction that BLAS runs
    ~5x slower than grad^T @ x. Here only x is kept, gelu(x) is recomputed in backward and the
    gradients are taken in their fast orientation.
    """

    @staticmethod
    def forward(ctx, x: Tensor, hyper: Tensor, approximate: str) -> Tensor:
        hyper = hyper.to(x.dtype)
        ctx.save_for_backward(x, hyper)
        ctx.approximate = approximate
        return torch.bmm(F.gelu(x, approximate=approximate), hyper.transpose(1, 2)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, hyper = ctx.saved_tensors
        grad = grad.to(x.dtype)
        gx = gh = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.gelu_backward(torch.bmm(grad, hyper), x, approximate=ctx.approximate)
        if ctx.needs_input_grad[1]:
            gh = torch.bmm(grad.transpose(1, 2), F.gelu(x, approximate=ctx.approximate))
        return gx, gh, None
