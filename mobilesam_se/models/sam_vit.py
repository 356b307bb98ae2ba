"""SAM's ViT-B/L/H image encoders (the frozen distillation teachers), built on timm.

The trunk is timm's `VisionTransformerSAM` built directly from its class: `timm.create_model`
names are avoided because the official `mobile_sam` package re-registers some timm names on import.
Given the same weights, the output equals `segment_anything.modeling.ImageEncoderViT`'s image
embedding, (B, 256, img_size / 16, img_size / 16).

Differences from SAM's own encoder that matter here:

* Names: timm's MLP is `mlp.fc1` / `mlp.fc2`, SAM's is `mlp.lin1` / `mlp.lin2`; every other key
  (patch_embed, pos_embed, attn.qkv/proj/rel_pos_h/rel_pos_w, norm1/2, neck.0-3) is the same, and
  both store `pos_embed` as (1, H, W, C).
* LayerNorm eps: SAM builds its blocks with eps 1e-6; timm's class defaults to `nn.LayerNorm`
  (eps 1e-5), and so do its registered `samvit_*` models. We pass eps 1e-6 explicitly.
* Input size: timm's patch embed is not strict and its forward bicubic-resamples `pos_embed` to the
  input grid on every call; SAM requires the exact size. Global-attention `rel_pos` tables are
  linearly interpolated on the fly by both when they do not fit the grid.
* Attention: timm uses `F.scaled_dot_product_attention` (rel-pos bias passed as a float mask) when
  its fused-attention flag is on; we turn it on per module so a global `TIMM_FUSED_ATTN=0` does not
  silently fall back to materialising the attention matrix for the teacher.

Lower resolutions (256 / 512): the official checkpoints are 1024 px (64x64 grid, global `rel_pos`
of length 127). Loading at another `img_size` interpolates, as SAM fine-tuning at a lower
resolution does: `pos_embed` bicubically (antialiased, timm's `resample_abs_pos_embed_nhwc`) and the
global blocks' `rel_pos` linearly (SAM's `get_rel_pos`). These are exactly the resamplings both
models would otherwise do at run time, so a model loaded at 256 computes what the 1024 model does on
a 256 input. Windowed blocks' `rel_pos` (2 * window - 1) does not depend on `img_size`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import partial
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import VisionTransformerSAM

__all__ = [
    "SAM_VIT_CONFIGS",
    "SAM_PRETRAIN_IMG_SIZE",
    "SamViTConfig",
    "build_sam_vit_encoder",
    "sam_encoder_state_dict_to_timm",
    "timm_encoder_state_dict_to_sam",
    "sam_vit_variant_from_checkpoint",
]

SAM_PRETRAIN_IMG_SIZE = 1024  # resolution the official checkpoints' pos_embed / rel_pos were trained at
_SAM_PREFIX = "image_encoder."


@dataclass(frozen=True)
class SamViTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    neck_chans: int = 256  # SAM's prompt embedding width


SAM_VIT_CONFIGS: Dict[str, SamViTConfig] = {
    "vit_b": SamViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": SamViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # Same topology (windowed + global blocks, rel-pos, neck) at toy size: for tests and CPU smoke runs.
    "tiny": SamViTConfig(embed_dim=64, depth=2, num_heads=2, global_attn_indexes=(1,), window_size=4),
}


def _resolve_config(variant: Union[str, SamViTConfig]) -> SamViTConfig:
    if isinstance(variant, SamViTConfig):
        return variant
    if variant not in SAM_VIT_CONFIGS:
        raise ValueError(f"unknown SAM ViT variant {variant!r}; expected one of {sorted(SAM_VIT_CONFIGS)}")
    return SAM_VIT_CONFIGS[variant]


def _grid_size(img_size: int, patch_size: int) -> int:
    if img_size <= 0 or img_size % patch_size:
        raise ValueError(f"img_size must be a positive multiple of patch_size={patch_size}, got {img_size}")
    return img_size // patch_size


def build_sam_vit_encoder(
    variant: Union[str, SamViTConfig],
    img_size: int = SAM_PRETRAIN_IMG_SIZE,
    fused_attn: bool = True,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
) -> VisionTransformerSAM:
    """Randomly initialised SAM image encoder: (B, 3, S, S) -> (B, 256, S/16, S/16), S = img_size.

    `variant` is a key of `SAM_VIT_CONFIGS` or a `SamViTConfig` (e.g. a reduced-depth one).
    `device='meta'` builds the structure without allocating weights.
    """
    cfg = _resolve_config(variant)
    _grid_size(img_size, cfg.patch_size)
    model = VisionTransformerSAM(
        img_size=img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        # SAM's blocks use eps 1e-6; timm's default here is nn.LayerNorm's 1e-5.
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        use_rope=False,  # ref_feat_shape only configures RoPE, so it stays unset
        window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
        neck_chans=cfg.neck_chans,  # conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d, as SAM
        # No classifier: with num_classes=0 and no pooling the head is an identity, so forward()
        # returns the neck's (B, 256, H, W) embedding and the state dict has no head entries.
        num_classes=0,
        global_pool="",
        device=device,
        dtype=dtype,
    )
    for module in model.modules():
        if isinstance(module, SamAttention):
            # timm reads its global flag at construction; force SDPA (rel-pos bias as float mask).
            module.fused_attn = fused_attn
    return model


# -- state-dict mapping -------------------------------------------------------------------------

_SAM_MLP = re.compile(r"^(blocks\.\d+\.mlp\.)lin([12])\.")
_TIMM_MLP = re.compile(r"^(blocks\.\d+\.mlp\.)fc([12])\.")
_REL_POS = re.compile(r"^blocks\.(\d+)\.attn\.rel_pos_[hw]$")


def _encoder_entries(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The image-encoder part of `sd`, without the `image_encoder.` prefix.

    A full SAM checkpoint also holds the prompt encoder and mask decoder; those are dropped. A dict
    with no prefixed key is taken to be an encoder dict already.
    """
    if any(k.startswith(_SAM_PREFIX) for k in sd):
        return {k[len(_SAM_PREFIX):]: v for k, v in sd.items() if k.startswith(_SAM_PREFIX)}
    return dict(sd)


def _resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    # Same linear interpolation as SAM's / timm's get_rel_pos, so a resized table equals the one
    # the source model would interpolate at run time.
    resized = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear")
    return resized[0].t().to(rel_pos.dtype).contiguous()


def _resize_to_img_size(
    sd: Dict[str, torch.Tensor],
    img_size: int,
    patch_size: int,
    global_attn_indexes: Optional[Sequence[int]],
) -> Dict[str, torch.Tensor]:
    """Interpolate pos_embed and the global blocks' rel_pos tables of an encoder dict to img_size."""
    if "pos_embed" not in sd:
        raise KeyError("cannot resize to a new img_size: the state dict has no 'pos_embed'")
    grid = _grid_size(img_size, patch_size)
    src_h, src_w = sd["pos_embed"].shape[1:3]
    if (src_h, src_w) == (grid, grid):
        return sd
    if global_attn_indexes is None:
        # Global blocks are the ones whose table spans the whole source grid; windowed blocks' span
        # a window. Ambiguous only if the source grid is itself one window wide.
        lengths = {v.shape[0] for k, v in sd.items() if _REL_POS.match(k)}
        if lengths == {2 * src_h - 1}:
            raise ValueError(
                "cannot tell global from windowed blocks by rel_pos length; pass global_attn_indexes"
            )
    out = dict(sd)
    out["pos_embed"] = resample_abs_pos_embed_nhwc(sd["pos_embed"], [grid, grid])
    for key, value in sd.items():
        match = _REL_POS.match(key)
        if match is None:
            continue
        src_len = 2 * (src_h if key.endswith("_h") else src_w) - 1
        if global_attn_indexes is None:
            is_global = value.shape[0] == src_len
        else:
            is_global = int(match.group(1)) in global_attn_indexes
        if is_global:
            out[key] = _resize_rel_pos(value, 2 * grid - 1)
    return out


def _n_blocks(sd: Mapping[str, torch.Tensor]) -> int:
    indexes = [int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))]
    return max(indexes) + 1 if indexes else 0


def sam_encoder_state_dict_to_timm(
    sd: Mapping[str, torch.Tensor],
    img_size: Optional[int] = None,
    patch_size: int = 16,
    global_attn_indexes: Optional[Sequence[int]] = None,
) -> Dict[str, torch.Tensor]:
    """SAM image-encoder weights -> our (timm) encoder's state dict.

    Accepts a full SAM checkpoint (only `image_encoder.*` is kept, prefix stripped) or an encoder
    dict without the prefix. With `img_size`, pos_embed and the global-attention rel_pos tables are
    interpolated to that resolution (see the module docstring); global blocks are told apart by
    `global_attn_indexes` or, if not given, by their table length (2 * source grid - 1).
    """
    out = {_SAM_MLP.sub(r"\1fc\2.", k): v for k, v in _encoder_entries(sd).items()}
    if img_size is not None:
        out = _resize_to_img_size(out, img_size, patch_size, global_attn_indexes)
    return out


def timm_encoder_state_dict_to_sam(
    sd: Mapping[str, torch.Tensor],
    img_size: Optional[int] = None,
    patch_size: int = 16,
    global_attn_indexes: Optional[Sequence[int]] = None,
    prefix: str = "",
) -> Dict[str, torch.Tensor]:
    """Our (timm) encoder's state dict -> SAM `ImageEncoderViT` names (inverse of the above).

    `prefix=_SAM_PREFIX` gives a full-checkpoint layout. `img_size` resizes as in the forward
    mapping, e.g. back to 1024 to export a lower-resolution fine-tune (interpolation, so lossy).
    """
    out = {_TIMM_MLP.sub(r"\1lin\2.", k): v for k, v in sd.items()}
    if img_size is not None:
        out = _resize_to_img_size(out, img_size, patch_size, global_attn_indexes)
    return {prefix + k: v for k, v in out.items()}


def sam_vit_variant_from_checkpoint(sd: Mapping[str, torch.Tensor]) -> str:
    """Name in `SAM_VIT_CONFIGS` whose shapes the encoder weights in `sd` have.

    Works on full SAM checkpoints, prefix-stripped SAM encoder dicts and our timm dicts. Width comes
    from the patch embedding, depth from the block indexes, heads from the rel_pos head dim.
    """
    enc = _encoder_entries(sd)
    try:
        proj = enc["patch_embed.proj.weight"]
        head_dim = enc["blocks.0.attn.rel_pos_h"].shape[1]
    except KeyError as err:
        raise ValueError(f"not a SAM ViT image-encoder state dict: no {err.args[0]!r}") from None
    embed_dim, patch_size, depth = proj.shape[0], proj.shape[-1], _n_blocks(enc)
    for name, cfg in SAM_VIT_CONFIGS.items():
        if (cfg.embed_dim, cfg.depth, cfg.embed_dim // cfg.num_heads, cfg.patch_size) == (
            embed_dim, depth, head_dim, patch_size
        ):
            return name
    raise ValueError(
        f"no SAM ViT variant has embed_dim={embed_dim}, depth={depth}, head_dim={head_dim}, "
        f"patch_size={patch_size}; known: {sorted(SAM_VIT_CONFIGS)}"
    )
