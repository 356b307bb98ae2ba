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
  drops out exactly; a value bias passes through attention unchanged since rows sum to one (so the
  output bias is folded into V Wo as bo / h per head, and the residual is the GEMM's accumulator).

Execution, for the CPU's sake (where the per-prompt N x C tensors are memory bound):
- token-side work (projections, per-head factors, MLP, norms) runs for all prompts at once;
- the per-prompt image-sized work runs on `chunk`-prompt pieces (`spans`), layer by layer, and the
  per-prompt keys travel as a list of (n, N, C) pieces. A piece is a few MB, so it stays in cache
  and the allocator recycles its buffers; a 64-prompt tensor would be page-faulted afresh by every
  op, which costs more than the op. On GPU one piece holds every prompt of an image;
- image-to-token scores are T-major, (.., h, T, N): the softmax over the 7 tokens runs along a
  strided axis with N contiguous, which vectorises (over a contiguous axis of 7 it is ~8x slower),
  and the output GEMM reads the scores transposed for free;
- softmax scales are folded into the small token-side factors, never applied to an N-sized tensor;
- keys + pe is never materialised per prompt: (X + pe) W^T splits into the keys term above and a
  pe term, with pe projected once per image (`pe_heads`), which costs a (h, T, d) x (d, N) product.
Every product is a (batched) matmul with equal batch dims. Parameter names are SAM's, so official
checkpoints load by name. The result equals SAM's to fp32 rounding.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from mobilesam_se.models.common import MLPBlock

Tensor = torch.Tensor
Span = Tuple[int, slice]  # (image index, prompt slice)


def _store(record: Optional[List], pieces: List[Tensor], B: int) -> None:
    """Per-span attention pieces (image-major, equal P per image) -> one (B, P, ...) tensor."""
    if record is not None:
        t = torch.cat(pieces)
        record.append(t.view(B, -1, *t.shape[1:]))


def tie_query_key_init(module: nn.Module) -> int:
    """Start every `Attention` in `module` with its key projection equal to its query projection.

    Prompt tokens and image positions both carry SAM's random Fourier positional encoding, whose
    inner product peaks where two positions coincide. With W_k = W_q every score form W_q^T W_k
    starts symmetric positive semi-definite: the positional part of a score is already that
    kernel (weak at init), and training only has to sharpen it instead of first turning a random
    form into it. From random weights the default run's masks left their all-empty first phase
    after 3 epochs instead of 12 (experiments/learning). Only an init: a checkpoint loaded
    afterwards replaces it. Returns the number of layers changed.
    """
    n = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, Attention):
                m.k_proj.weight.copy_(m.q_proj.weight)
                m.k_proj.bias.copy_(m.q_proj.bias)
                n += 1
    return n


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

    def _per_head(self, x: Tensor, w: Tensor) -> Tensor:
        """x (B, P, T, h*d) head-major channels, w (h, d, K) -> (B, P, h*T, K): x_h @ w_h per head."""
        B, P, T, _ = x.shape
        h = self.num_heads
        xh = x.reshape(B * P * T, h, -1).transpose(0, 1)  # (h, R, d)
        y = torch.bmm(xh, w.to(x.dtype))  # (h, R, K): batch over heads, no broadcast copies
        return y.view(h, B, P, T, -1).permute(1, 2, 0, 3, 4).reshape(B, P, h * T, -1)

    def _w(self, linear: nn.Linear) -> Tensor:
        """(c, C) weight viewed per head: (h, d, C)."""
        return linear.weight.view(self.num_heads, self.head_dim, self.embedding_dim)

    def _value_out(self, v_tok: Tensor) -> Tensor:
        """V Wo per head plus bo / h for token-side values: (B, P, T, C) -> (B, P, h*T, C).

        Each head's attention rows sum to one, so attn @ (V Wo + bo/h) = attn @ V Wo + bo.
        """
        wo = self.out_proj.weight.view(self.embedding_dim, self.num_heads, self.head_dim).permute(1, 2, 0)
        vw = self._per_head(self.v_proj(v_tok), wo)
        return vw + (self.out_proj.bias / self.num_heads).to(vw.dtype)

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
            attn = torch.softmax((qh * self.scale) @ kh.transpose(-1, -2), dim=-1)
            out = attn @ vh
            record.append(attn.unflatten(2, (P, T)).permute(0, 2, 1, 3, 4))  # (B, P, h, T, N)
        else:
            out = F.scaled_dot_product_attention(qh, kh, vh)
        return self.out_proj(out.transpose(1, 2).reshape(B, P, T, self.internal_dim))

    def shared_image_to_token(
        self, image: Tensor, q: Tensor, k: Tensor, v: Tensor, spans: List[Span],
        post: Callable[[Tensor], Tensor], record: Optional[List] = None,
    ) -> List[Tensor]:
        """image (B, N, C) residual and q (B, N, C) queries per image; k, v (B, P, T, C) tokens.

        Returns post(image + attention output) per span: a list of (n, N, C).
        """
        B, N, _ = q.shape
        T = k.shape[2]
        h, d = self.num_heads, self.head_dim
        qT = self.q_proj(q).view(B, N, h, d).permute(0, 2, 3, 1).contiguous()  # (B, h, d, N) once per image
        kh = self.k_proj(k) * self.scale  # (B, P, T, c)
        vwo = self._value_out(v)  # (B, P, hT, C)
        out, rec = [], []
        for b, sl in spans:
            kb = kh[b, sl]
            n = kb.shape[0]
            scores = torch.matmul(kb.reshape(1, n * T, h, d).transpose(1, 2), qT[b : b + 1])  # (1, h, nT, N)
            attn = torch.softmax(scores.view(h, n, T, N), dim=2)
            if record is not None:
                rec.append(attn.permute(1, 0, 3, 2))  # (n, h, N, T)
            attn = attn.transpose(0, 1).reshape(n, h * T, N)  # a copy only when n > 1 (N*h*T per prompt)
            out.append(post(torch.baddbmm(image[b : b + 1], attn.transpose(1, 2), vwo[b, sl])))
        _store(record, rec, B)
        return out

    # -- keys that differ per prompt -----------------------------------------------------------
    def pe_heads(self, pe: Tensor, linear: nn.Linear) -> Tensor:
        """Positional encodings projected per head, once per image: (B, N, C) -> (B, h, d, N), no bias."""
        B, N, _ = pe.shape
        y = F.linear(pe, linear.weight.to(pe.dtype))
        return y.view(B, N, self.num_heads, self.head_dim).permute(0, 2, 3, 1).contiguous()

    def _scores(self, f: Tensor, x: Tensor, tok_h: Tensor, pe_h: Tensor, T: int, bias: Optional[Tensor] = None) -> Tensor:
        """Scores (n, h, T, N) of one span against keys + pe, without materialising keys + pe.

        f (n, hT, C): token factors against the keys x (n, N, C); tok_h (h, nT, d) and pe_h (h, d, N):
        per-head token projections against the projected pe, a cheap (h, nT, N) term.
        """
        n, N, _ = x.shape
        h = self.num_heads
        s = torch.bmm(f, x.transpose(1, 2)) if bias is None else torch.baddbmm(bias, f, x.transpose(1, 2))
        s = s.view(n, h, T, N)
        return s.add_(torch.bmm(tok_h, pe_h.to(tok_h.dtype)).view(h, n, T, N).transpose(0, 1))

    @staticmethod
    def _of(t: Tensor, b: int) -> Tensor:
        """Image b's entry of a per-image tensor whose batch is B or 1 (shared)."""
        return t[b if t.shape[0] > 1 else 0]

    def token_to_image(
        self, q: Tensor, keys: List[Tensor], pe_h: Tensor, spans: List[Span], record: Optional[List] = None,
    ) -> Tensor:
        """q (B, P, T, C) tokens; per-span keys (n, N, C), attended at keys + pe -> (B, P, T, C).

        pe_h (B or 1, h, d, N) = `pe_heads(pe, k_proj)`: (keys + pe) Wk_h^T q_h splits into a keys term,
        with Wk moved to the token side, and a pe term; the key bias cancels in the softmax.
        """
        B, P, T, C = q.shape
        h, d = self.num_heads, self.head_dim
        qh = self.q_proj(q) * self.scale  # (B, P, T, c)
        a = self._per_head(qh, self._w(self.k_proj))  # (q Wk_h) per head: (B, P, hT, C)
        qhh = qh.view(B, P * T, h, d).transpose(1, 2)  # (B, h, PT, d)
        rs, rec = [], []
        for (b, sl), x in zip(spans, keys):
            s = self._scores(a[b, sl], x, qhh[b, :, sl.start * T : sl.stop * T], self._of(pe_h, b), T)
            attn = torch.softmax(s.view(x.shape[0], h * T, -1), dim=-1)  # (n, hT, N)
            if record is not None:
                rec.append(attn.view(attn.shape[0], h, T, -1))
            rs.append(torch.bmm(attn, x))  # (n, hT, C)
        _store(record, rec, B)
        # (attn X) Wv_h^T + bv per head: (h, BPT, C) @ (h, C, d) -> (B, P, T, h*d)
        r = torch.cat(rs).view(B * P, h, T, C).transpose(0, 1).reshape(h, B * P * T, C)
        out = torch.bmm(r, self._w(self.v_proj).transpose(1, 2).to(r.dtype))
        out = out.view(h, B, P, T, -1).permute(1, 2, 3, 0, 4).reshape(B, P, T, self.internal_dim)
        return self.out_proj(out + self.v_proj.bias.to(out.dtype))

    def image_to_token(
        self, keys: List[Tensor], pe_h: Tensor, k: Tensor, v: Tensor, spans: List[Span],
        post: Callable[[Tensor], Tensor], record: Optional[List] = None,
    ) -> List[Tensor]:
        """Per-span keys (n, N, C), the residual and, + pe, the queries; k, v (B, P, T, C) tokens.

        pe_h (B or 1, h, d, N) = `pe_heads(pe, q_proj)`. Returns post(keys + attention output) per span.
        Consumes (clears) the `keys` list.
        """
        B, P, T, _ = k.shape
        h, d = self.num_heads, self.head_dim
        kh = self.k_proj(k) * self.scale  # (B, P, T, c)
        # scores^T = (k_h Wq_h) X^T + k_h . (pe Wq_h^T) + k_h . bq_h: the query-side bias varies per token.
        g = self._per_head(kh, self._w(self.q_proj))  # (B, P, hT, C)
        beta = self._per_head(kh, self.q_proj.bias.view(h, d, 1))  # (B, P, hT, 1)
        khh = kh.view(B, P * T, h, d).transpose(1, 2)  # (B, h, PT, d)
        vwo = self._value_out(v)
        inplace = not torch.is_grad_enabled()
        out, rec = [], []
        for i, (b, sl) in enumerate(spans):
            x = keys[i]
            keys[i] = None  # type: ignore[call-overload]  # let the allocator recycle it
            n, N, _ = x.shape
            s = self._scores(g[b, sl], x, khh[b, :, sl.start * T : sl.stop * T], self._of(pe_h, b), T, beta[b, sl])
            attn = torch.softmax(s, dim=2)  # over the T tokens: strided axis, N contiguous
            if record is not None:
                rec.append(attn.transpose(2, 3))  # (n, h, N, T)
            attn = attn.view(n, h * T, N).transpose(1, 2)
            # Without autograd the residual piece is dead after this: accumulate into it in place.
            same = x.dtype == attn.dtype == vwo.dtype  # not under autocast
            y = x.baddbmm_(attn, vwo[b, sl]) if inplace and same else torch.baddbmm(x, attn, vwo[b, sl])
            out.append(post(y))
            del x, y
        _store(record, rec, B)
        return out


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

    def _self_attn(self, queries: Tensor, query_pe: Tensor) -> Tensor:
        if self.skip_first_layer_pe:
            queries = self.self_attn.tokens(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn.tokens(q, q, queries)
        return self.norm1(queries)

    def shared(
        self, queries: Tensor, image: Tensor, query_pe: Tensor, image_pe: Tensor, spans: List[Span],
        rec_t2i: Optional[List] = None, rec_i2t: Optional[List] = None,
    ) -> Tuple[Tensor, List[Tensor]]:
        """Block whose keys are the image, shared by its prompts: queries (B, P, T, C); image (B, N, C),
        image_pe (B or 1, N, C). Returns queries and per-span keys (n, N, C)."""
        queries = self._self_attn(queries, query_pe)
        kp = image + image_pe  # one x + pos per layer, per image
        t2i = self.cross_attn_token_to_image.token_to_shared_image(queries + query_pe, kp, image, rec_t2i)
        queries = self.norm2(queries + t2i)
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.cross_attn_image_to_token.shared_image_to_token(
            image, kp, queries + query_pe, queries, spans, self.norm4, rec_i2t
        )
        return queries, keys

    def forward(
        self, queries: Tensor, keys: List[Tensor], query_pe: Tensor, key_pe: Tensor, spans: List[Span],
        rec_t2i: Optional[List] = None, rec_i2t: Optional[List] = None,
    ) -> Tuple[Tensor, List[Tensor]]:
        """Block with per-prompt keys: queries, query_pe (B, P, T, C); keys per span (n, N, C);
        key_pe (B or 1, N, C). Consumes (clears) the `keys` list, freeing each old piece once replaced."""
        queries = self._self_attn(queries, query_pe)
        t2i, i2t = self.cross_attn_token_to_image, self.cross_attn_image_to_token
        q = queries + query_pe
        queries = self.norm2(queries + t2i.token_to_image(q, keys, t2i.pe_heads(key_pe, t2i.k_proj), spans, rec_t2i))
        queries = self.norm3(queries + self.mlp(queries))
        keys = i2t.image_to_token(
            keys, i2t.pe_heads(key_pe, i2t.q_proj), queries + query_pe, queries, spans, self.norm4, rec_i2t
        )
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

    def run(
        self, image: Tensor, image_pe: Tensor, tokens: Tensor, chunk: int,
        record: Optional[Dict[str, List[Tensor]]] = None,
    ) -> Tuple[Tensor, List[Tensor], List[Span]]:
        """Like `forward`, but the keys come back as per-span pieces: (queries, [keys (n, N, C)], spans).

        Spans are (image, prompt slice) of at most `chunk` prompts, image-major.
        """
        B, P = tokens.shape[:2]
        image = image.contiguous()
        chunk = max(1, chunk)
        spans = [(b, slice(s, min(s + chunk, P))) for b in range(B) for s in range(0, P, chunk)]
        t2i: Optional[List] = [] if record is not None else None
        i2t: Optional[List] = [] if record is not None else None

        queries, keys = self.layers[0].shared(tokens, image, tokens, image_pe, spans, t2i, i2t)
        for layer in self.layers[1:]:
            queries, keys = layer(queries, keys, tokens, image_pe, spans, t2i, i2t)
        fin = self.final_attn_token_to_image
        final = fin.token_to_image(queries + tokens, keys, fin.pe_heads(image_pe, fin.k_proj), spans, t2i)
        queries = self.norm_final_attn(queries + final)
        if record is not None:
            record.setdefault("token_to_image", []).extend(t2i)
            record.setdefault("image_to_token", []).extend(i2t)
        return queries, keys, spans

    def forward(
        self, image: Tensor, image_pe: Tensor, tokens: Tensor, record: Optional[Dict[str, List[Tensor]]] = None,
        chunk: Optional[int] = None,
    ) -> Tuple[Tensor, Tensor]:
        """image (B, N, C) with dense prompt added; image_pe (B or 1, N, C); tokens (B, P, T, C).

        Returns queries (B, P, T, C) and per-prompt keys (B, P, N, C). `record`, when given, collects
        attention probabilities as {"token_to_image": [...], "image_to_token": [...]}, each
        (B, P, heads, T, N) or (B, P, heads, N, T).
        """
        B, P = tokens.shape[:2]
        queries, keys, _ = self.run(image, image_pe, tokens, chunk or P, record)
        return queries, torch.cat(keys).view(B, P, *keys[0].shape[1:])
