"""SAM's two-way transformer, batched over prompts and reassociated so image-side work is shared.

Shapes: B images, P prompts per image, T tokens per prompt (iou + 4 mask + sparse prompt tokens),
N = h*w image positions, C channels, h heads of size d (cross attention uses C/2 channels).

SAM runs the decoder on `repeat_interleave(image_embedding, P)`, so every projection of the 4096
image positions is done once per prompt. Here:
- until the first image-to-token attention, keys are the same for all prompts of an image: their
  projections are computed once per image and all prompts attend in one matmul;
- afterwards keys differ per prompt, but each attention has only T (~7) tokens on the other side, so
  we move the projection matrices onto the token side: (q Wk_h) X^T instead of q (X Wk_h)^T, and
  attn (V Wo_h) instead of (attn V) Wo. A query-side key bias is constant along the softmax axis and
  drops out exactly; a value bias passes through attention unchanged since rows sum to one.
Every product is a plain batched matmul (broadcast matmuls are slow on CPU). Parameter names are
SAM's, so official checkpoints load by name. The result equals SAM's to fp32 rounding.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from mobilesam_se.models.common import MLPBlock

Tensor = torch.Tensor


class Attention(nn.Module):
    """Multi-head attention with SAM's projections (`q_proj`, `k_proj`, `v_proj`, `out_proj`)."""

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.head_dim = self.internal_dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    # -- helpers -------------------------------------------------------------------------------
    def _heads(self, x: Tensor) -> Tensor:
        """(..., L, c) -> (..., h, L, d)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def _w(self, linear: nn.Linear) -> Tensor:
        """(c, C) weight viewed per head: (h, d, C)."""
        return linear.weight.view(self.num_heads, self.head_dim, self.embedding_dim)

    def _value_out(self, v_tok: Tensor) -> Tensor:
        """V Wo per head for token-side values: (B, P, T, C) -> (B*P, h*T, C)."""
        v = self.v_proj(v_tok)  # (B, P, T, c)
        wo = self.out_proj.weight.view(self.embedding_dim, self.num_heads, self.head_dim)
        B, P, T, _ = v.shape
        v = v.view(B * P, T, self.num_heads, self.head_dim).transpose(1, 2)  # (BP, h, T, d)
        # (BP, h, T, d) @ (h, d, C) -> (BP, h, T, C)
        vw = torch.matmul(v, wo.permute(1, 2, 0))
        return vw.reshape(B * P, self.num_heads * T, self.embedding_dim)

    # -- token <-> token -----------------------------------------------------------------------
    def tokens(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Plain attention among the tokens of each prompt: (..., T, C) -> (..., T, C)."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        return self.out_proj(out.transpose(-3, -2).flatten(-2))

    # -- keys shared by all prompts of an image ------------------------------------------------
    def token_to_shared_image(self, q: Tensor, k: Tensor, v: Tensor, record: Optional[List] = None) -> Tensor:
        """q (B, P, T, C) tokens; k, v (B, N, C) per image -> (B, P, T, C)."""
        B, P, T, _ = q.shape
        qh = self._heads(self.q_proj(q).reshape(B, P * T, -1))  # (B, h, PT, d)
        kh = self._heads(self.k_proj(k))  # (B, h, N, d) once per image
        vh = self._heads(self.v_proj(v))
        if record is not None:
            attn = torch.softmax((qh @ kh.transpose(-1, -2)) * self.scale, dim=-1)
            out = attn @ vh
            record.append(attn.unflatten(2, (P, T)).permute(0, 2, 1, 3, 4))  # (B, P, h, T, N)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        out = out.transpose(1, 2).reshape(B, P, T, self.internal_dim)
        return self.out_proj(out)

    def shared_image_to_token(self, q: Tensor, k: Tensor, v: Tensor, record: Optional[List] = None) -> Tensor:
        """q (B, N, C) per image; k, v (B, P, T, C) tokens -> (B, P, N, C)."""
        B, P, T, _ = k.shape
        N = q.shape[1]
        qh = self._heads(self.q_proj(q))  # (B, h, N, d) once per image
        kh = self.k_proj(k).view(B, P * T, self.num_heads, self.head_dim).permute(0, 2, 3, 1)  # (B, h, d, PT)
        scores = torch.matmul(qh, kh) * self.scale  # (B, h, N, PT): one matmul for all prompts
        attn = torch.softmax(scores.view(B, self.num_heads, N, P, T), dim=-1)
        if record is not None:
            record.append(attn.permute(0, 3, 1, 2, 4))  # (B, P, h, N, T)
        attn = attn.permute(0, 3, 2, 1, 4).reshape(B * P, N, self.num_heads * T)
        out = torch.baddbmm(self.out_proj.bias.expand(B * P, 1, -1), attn, self._value_out(v))
        return out.view(B, P, N, self.embedding_dim)

    # -- keys that differ per prompt -----------------------------------------------------------
    def token_to_image(self, q: Tensor, k: Tensor, v: Tensor, record: Optional[List] = None) -> Tensor:
        """q (B, P, T, C) tokens; k, v (B, P, N, C) per prompt -> (B, P, T, C)."""
        B, P, T, C = q.shape
        N = k.shape[2]
        qh = self.q_proj(q).view(B * P, T, self.num_heads, self.head_dim).transpose(1, 2)  # (BP, h, T, d)
        # (q Wk_h): (BP, h, T, d) @ (h, d, C) -> (BP, h*T, C); the key bias cancels in the softmax.
        a = torch.matmul(qh, self._w(self.k_proj)).reshape(B * P, self.num_heads * T, C)
        scores = torch.bmm(a, k.reshape(B * P, N, C).transpose(1, 2)) * self.scale  # (BP, hT, N)
        attn = torch.softmax(scores, dim=-1)
        if record is not None:
            record.append(attn.view(B, P, self.num_heads, T, N))
        r = torch.bmm(attn, v.reshape(B * P, N, C)).view(B * P, self.num_heads, T, C)
        # (attn X) Wv_h^T + bv: (BP, h, T, C) @ (h, C, d) -> (BP, h, T, d)
        out = torch.matmul(r, self._w(self.v_proj).transpose(1, 2))
        out = out.transpose(1, 2).reshape(B, P, T, self.internal_dim) + self.v_proj.bias
        return self.out_proj(out)

    def image_to_token(self, q: Tensor, k: Tensor, v: Tensor, record: Optional[List] = None) -> Tensor:
        """q (B, P, N, C) per prompt; k, v (B, P, T, C) tokens -> (B, P, N, C)."""
        B, P, N, C = q.shape
        T = k.shape[2]
        kh = self.k_proj(k).view(B * P, T, self.num_heads, self.head_dim).transpose(1, 2)  # (BP, h, T, d)
        # X (Wq_h^T k_h) + bq_h . k_h: the query-side bias varies per token, so it stays.
        g = torch.matmul(kh, self._w(self.q_proj)).reshape(B * P, self.num_heads * T, C)
        beta = torch.matmul(kh, self.q_proj.bias.view(self.num_heads, self.head_dim, 1))
        scores = torch.baddbmm(beta.reshape(B * P, 1, self.num_heads * T), q.reshape(B * P, N, C), g.transpose(1, 2))
        attn = torch.softmax((scores * self.scale).view(B * P, N, self.num_heads, T), dim=-1)
        if record is not None:
            record.append(attn.view(B, P, N, self.num_heads, T).permute(0, 1, 3, 2, 4))  # (B, P, h, N, T)
        attn = attn.view(B * P, N, self.num_heads * T)
        out = torch.baddbmm(self.out_proj.bias.expand(B * P, 1, -1), attn, self._value_out(v))
        return out.view(B, P, N, C)


class TwoWayAttentionBlock(nn.Module):
    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, record: Optional[List] = None
    ) -> Tuple[Tensor, Tensor]:
        """queries (B, P, T, C); keys (B, N, C) shared per image or (B, P, N, C); key_pe (B, N, C)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn.tokens(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn.tokens(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        shared = keys.dim() == 3
        kp = keys + (key_pe if shared else key_pe.unsqueeze(1))  # one x + pos per layer
        t2i = self.cross_attn_token_to_image.token_to_shared_image if shared else self.cross_attn_token_to_image.token_to_image
        queries = self.norm2(queries + t2i(q, kp, keys, record))
        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        i2t = self.cross_attn_image_to_token.shared_image_to_token if shared else self.cross_attn_image_to_token.image_to_token
        delta = i2t(kp, q, queries, record)
        keys = self.norm4((keys.unsqueeze(1) if shared else keys) + delta)
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: Type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("the two-way transformer needs depth >= 1")
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim, num_heads, mlp_dim, activation, attention_downsample_rate, skip_first_layer_pe=(i == 0)
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(embedding_dim, num_heads, attention_downsample_rate)
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image: Tensor, image_pe: Tensor, tokens: Tensor, record: Optional[Dict[str, List[Tensor]]] = None
    ) -> Tuple[Tensor, Tensor]:
        """image (B, N, C) with dense prompt added; image_pe (B or 1, N, C); tokens (B, P, T, C).

        Returns queries (B, P, T, C) and per-prompt keys (B, P, N, C). `record`, when given, collects
        attention probabilities as {"token_to_image": [...], "image_to_token": [...]}, each
        (B, P, heads, T, N) or (B, P, heads, N, T).
        """
        key_pe = image_pe.expand(image.shape[0], -1, -1)
        queries, keys = tokens, image
        for layer in self.layers:
            rec: Optional[List] = [] if record is not None else None
            queries, keys = layer(queries, keys, tokens, key_pe, rec)
            if record is not None:
                record.setdefault("token_to_image", []).append(rec[0])
                record.setdefault("image_to_token", []).append(rec[1])
        q = queries + tokens
        kp = keys + key_pe.unsqueeze(1)
        rec = [] if record is not None else None
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image.token_to_image(q, kp, keys, rec))
        if record is not None:
            record.setdefault("token_to_image", []).append(rec[0])
        return queries, keys
