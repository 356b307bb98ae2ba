"""Hand-set decoder weights whose masks have structure: a blob around each prompt point.

Random weights make SAM's decoder answer every point with nearly the same full-image mask, which
box NMS collapses to one: useless for testing the everything mode. `structured_state_dict` takes
any official-layout state dict (e.g. a perturbed random init) and rewrites the prompt encoder and
mask decoder so that

* the positional encoding uses 8 frequencies per head of the first image-to-token attention, so a
  head's attention score between an image position p and the point token is a bump kernel of
  p - point (plus an image-dependent term from the embedding at p);
* only the point token carries a value in that attention, so the keys get `A(p) * e` added, with
  A(p) the summed attention to the point: a blob around the point, shaped by the image;
* the upscaling reads the keys along `e` and the hypernetworks are constants, so mask token t gives
  `eta * (U(p) - c_t)`: three nested blobs per point (small, medium, large);
* the IoU head reads the (random, prompt-dependent) IoU token and is scaled to spread its outputs
  around `iou_center`, so the predicted-IoU filter keeps some masks and drops others.

Everything else stays as given (the encoder, the second transformer layer's token path), so the
result is still a full MobileSAM state dict that both our model and the official code load. Used by
the AMG parity test and the speed benchmark; not a trained model.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

StateDict = Dict[str, torch.Tensor]

_C = 256  # SAM's transformer width
_HEADS = 8
_HEAD_DIM_X = 16  # cross-attention head size (internal 128 / 8 heads)
_D = "mask_decoder."
_T = _D + "transformer."


def _frequencies(gen: torch.Generator, base: float, step: float) -> torch.Tensor:
    """(2, 128) Gaussian matrix: 8 frequencies per head for 8 heads, then 64 zero columns."""
    cols = []
    for h in range(_HEADS):
        f = base + step * h  # a different radius per head, so their side lobes do not line up
        rot = float(torch.rand((), generator=gen)) * math.pi / 8
        for k in range(8):
            a = rot + k * math.pi / 8
            cols.append((f * math.cos(a), f * math.sin(a)))
    g = torch.zeros(2, 128)
    g[:, :64] = torch.tensor(cols, dtype=torch.float32).t()
    return g


def _orthogonal_tokens(n: int, gen: torch.Generator) -> torch.Tensor:
    """n zero-sum vectors on channels 64..127 (free sin slots), orthogonal within each 32-channel
    self-attention head, of norm sqrt(32) per head."""
    out = torch.zeros(n, _C)
    for lo in (64, 96):
        a = torch.randn(32, n + 1, generator=gen)
        a[:, 0] = 1.0  # orthogonal to the all-ones vector, i.e. zero-sum
        q, _ = torch.linalg.qr(a)
        out[:, lo : lo + 32] = q[:, 1:].t() * math.sqrt(32.0)
    return out


def _read_channels(h: int) -> torch.Tensor:
    """The 16 PE channels of head h: sin and cos of its 8 frequencies."""
    j = torch.arange(8 * h, 8 * h + 8)
    return torch.cat([j, j + 128])


def structured_state_dict(
    sd: StateDict,
    seed: int = 0,
    score_scale: float = 0.55,
    value_scale: float = 0.05,
    mask_slope: float = 40.0,
    thresholds: Sequence[float] = (2.7, 3.0, 3.3),
    iou_center: float = 0.9,
    iou_spread: float = 0.04,
    iou_features: Optional[torch.Tensor] = None,
    image_scale: float = 0.5,
    ref_level: float = 10.0,
    freq_base: float = 0.8,
    freq_step: float = 0.12,
) -> StateDict:
    """A copy of `sd` (official layout) with the structured prompt encoder / mask decoder above.

    `thresholds` are the three multimask tokens' cut-offs on the blob strength (larger: smaller
    mask); `mask_slope` sets how sharp the logits are (so the stability score); `iou_features`,
    when given, are (n, 256) inputs of the IoU head's last layer used to calibrate its spread.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in sd.items()}

    def put(name: str, value: torch.Tensor) -> None:
        if out[name].shape != value.shape:
            raise ValueError(f"{name}: {tuple(value.shape)} vs {tuple(out[name].shape)}")
        out[name] = value.to(out[name].dtype)

    def zero(name: str) -> None:
        out[name] = torch.zeros_like(out[name])

    def layer_norm_identity(prefix: str) -> None:
        put(prefix + ".weight", torch.ones(_C))
        zero(prefix + ".bias")

    # A weaker image term, so the point kernel dominates the attention scores.
    out["image_encoder.neck.3.weight"] = out["image_encoder.neck.3.weight"] * image_scale
    out["image_encoder.neck.3.bias"] = out["image_encoder.neck.3.bias"] * image_scale

    # Prompt encoder: frequencies, and token embeddings kept off the channels the attention reads.
    put("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix", _frequencies(gen, freq_base, freq_step))
    toks = _orthogonal_tokens(7, gen)  # iou, 4 mask tokens, point, not-a-point
    put(_D + "iou_token.weight", toks[0:1])
    put(_D + "mask_tokens.weight", toks[1:5])
    put("prompt_encoder.point_embeddings.1.weight", toks[5:6])
    put("prompt_encoder.not_a_point_embed.weight", toks[6:7])
    point_dir = toks[5] / toks[5].norm()

    # Layer 0 token path: self-attention that keeps each token (orthogonal tokens, sharp softmax),
    # passing on only the free channels 64..127; cross-attention and MLP add nothing.
    l0 = _T + "layers.0."
    sa = l0 + "self_attn."
    put(sa + "q_proj.weight", torch.eye(_C) * 2.0)
    put(sa + "k_proj.weight", torch.eye(_C) * 2.0)
    keep = torch.zeros(_C)
    keep[64:128] = 1.0
    put(sa + "v_proj.weight", torch.diag(keep))
    put(sa + "out_proj.weight", torch.eye(_C))
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        zero(sa + p + ".bias")
    for n in ("norm1", "norm2", "norm3", "norm4"):
        layer_norm_identity(l0 + n)
    zero(l0 + "cross_attn_token_to_image.out_proj.weight")
    zero(l0 + "cross_attn_token_to_image.out_proj.bias")
    zero(l0 + "mlp.lin2.weight")
    zero(l0 + "mlp.lin2.bias")

    # Layer 0 image-to-token attention: head h scores PE_h(p) . PE_h(point); the point token's
    # value is `value_scale` along its own embedding, mapped to the direction e.
    i2t = l0 + "cross_attn_image_to_token."
    wq = torch.zeros(128, _C)
    wv = torch.zeros(128, _C)
    wo = torch.zeros(_C, 128)
    e = torch.randn(_C, generator=gen)
    e = e - e.mean()
    e = e / e.norm()
    g = math.sqrt(score_scale * math.sqrt(_HEAD_DIM_X))
    for h in range(_HEADS):
        rows = torch.arange(_HEAD_DIM_X * h, _HEAD_DIM_X * (h + 1))
        wq[rows, _read_channels(h)] = g
        wv[_HEAD_DIM_X * h] = point_dir * value_scale
        wo[:, _HEAD_DIM_X * h] = e
    put(i2t + "q_proj.weight", wq)
    put(i2t + "k_proj.weight", wq.clone())
    put(i2t + "v_proj.weight", wv)
    put(i2t + "out_proj.weight", wo)
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        zero(i2t + p + ".bias")

    # Layer 1 leaves the keys alone (only its token path runs, feeding the IoU head).
    l1 = _T + "layers.1."
    zero(l1 + "cross_attn_image_to_token.out_proj.weight")
    zero(l1 + "cross_attn_image_to_token.out_proj.bias")
    layer_norm_identity(l1 + "norm4")

    # Upscaling: channel 0 reads keys . e, channel 1 is a constant reference (LayerNorm keeps only
    # the ratio); the second conv passes channel 0 and a constant on channel 1.
    up0 = torch.zeros(_C, 64, 2, 2)
    up0[:, 0] = e[:, None, None]
    b0 = torch.zeros(64)
    b0[1] = ref_level
    put(_D + "output_upscaling.0.weight", up0)
    put(_D + "output_upscaling.0.bias", b0)
    w_ln = torch.zeros(64)
    w_ln[0] = 1.0
    b_ln = torch.zeros(64)
    b_ln[1] = 1.0
    put(_D + "output_upscaling.1.weight", w_ln)
    put(_D + "output_upscaling.1.bias", b_ln)
    up1 = torch.zeros(64, 32, 2, 2)
    up1[0, 0] = 1.0
    up1[1, 1] = 1.0
    put(_D + "output_upscaling.3.weight", up1)
    zero(_D + "output_upscaling.3.bias")

    # Hypernetworks: constants eta * (channel 0 - c_t * channel 1 / gelu(gelu(1))).
    ref = torch.nn.functional.gelu(torch.nn.functional.gelu(torch.tensor(1.0))).item()
    cuts = [thresholds[0]] + list(thresholds)  # token 0 (single-mask output) = the smallest cut
    for t in range(4):
        pre = f"{_D}output_hypernetworks_mlps.{t}.layers.2."
        zero(pre + "weight")
        bias = torch.zeros(32)
        bias[0] = mask_slope
        bias[1] = -mask_slope * cuts[t] / ref
        put(pre + "bias", bias)

    # IoU head: spread the last layer's outputs around iou_center.
    pre = _D + "iou_prediction_head.layers.2."
    w = out[pre + "weight"]
    if iou_features is not None:
        f = iou_features.to(torch.float32)
        proj = f @ w.t()  # (n, 4)
        std = proj.std(0).clamp_min(1e-6)
        w = w / std[:, None] * iou_spread
        b = iou_center - (f @ w.t()).mean(0)
    else:
        w = w * iou_spread
        b = torch.full((4,), iou_center)
    put(pre + "weight", w)
    put(pre + "bias", b)
    return out


def iou_head_inputs(model, image, points_per_side: int = 4) -> torch.Tensor:
    """(n, C) inputs of the IoU head's last layer for a grid of points on `image` (for calibration)."""
    from mobilesam_se.prompts import grid_points_for_model

    captured = []
    last = model.mask_decoder.iou_prediction_head.layers[-1]
    handle = last.register_forward_pre_hook(lambda mod, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            emb = model.encode(model.preprocess([image]))
            pts = grid_points_for_model(points_per_side, image.shape[:2], model.image_size).to(model.device)
            model.predict_grid(emb, pts[None])
    finally:
        handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured])
    return x.cpu()


def structured_mobilesam_state_dict(sd: StateDict, image, calibration_size: int = 256, **kwargs) -> StateDict:
    """`structured_state_dict` with the IoU head calibrated on `image` (via a small fast model)."""
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.models.checkpoint import load_official_state_dict

    first = structured_state_dict(sd, **kwargs)
    probe = build_mobilesam(calibration_size, size="mobilesam").eval()
    load_official_state_dict(probe, first, "structured weights")
    feats = iou_head_inputs(probe, image)
    return structured_state_dict(sd, iou_features=feats, **kwargs)
