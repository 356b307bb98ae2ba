"""MobileSAM's image encoder: timm's TinyViT-5M as MobileSAM uses it, plus SAM's 256-channel neck.

MobileSAM's TinyViT differs from the ImageNet one in two places: the last patch merging keeps the
resolution (depthwise conv stride 1), so features are 1/16 of the input, and a neck maps 320
channels to SAM's 256. We build timm's classes directly (not through `timm.create_model` names,
which the official `mobile_sam` package re-registers with its own classes on import).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Set, Tuple

import torch
import torch.nn as nn
from timm.layers import LayerNorm2d
from timm.models.tiny_vit import Attention as TinyVitAttention
from timm.models.tiny_vit import TinyVit


@dataclass(frozen=True)
class TinyVitConfig:
    embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
    num_classes: int = 1000  # the unused ImageNet head, kept so official checkpoints load strictly
    out_chans: int = 256


MOBILESAM_TINYVIT = TinyVitConfig()
# Same topology at a fraction of the width and depth: for tests and CPU smoke runs.
TINY_TINYVIT = TinyVitConfig(
    embed_dims=(16, 32, 48, 64), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 2), num_classes=10, out_chans=32
)
# Between the two: a CPU-trainable model that learns a domain from scratch in minutes.
SMALL_TINYVIT = TinyVitConfig(
    embed_dims=(32, 64, 96, 128), depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4), num_classes=10, out_chans=64
)


def clear_attention_bias_cache(module: nn.Module) -> None:
    """Drop TinyViT's eval-mode attention-bias caches so they are rebuilt from current weights."""
    for m in module.modules():
        if isinstance(m, TinyVitAttention):
            m.attention_bias_cache = {}


class TinyVitImageEncoder(nn.Module):
    """TinyViT trunk (timm) + neck; (B, 3, S, S) -> (B, out_chans, S/16, S/16)."""

    def __init__(self, config: TinyVitConfig = MOBILESAM_TINYVIT, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.config = config
        self.trunk = TinyVit(
            in_chans=3,
            num_classes=config.num_classes,
            embed_dims=config.embed_dims,
            depths=config.depths,
            num_heads=config.num_heads,
            window_sizes=config.window_sizes,
            drop_path_rate=drop_path_rate,
        )
        # MobileSAM: the last merge keeps the resolution, so the output stride is 16, not 32.
        self.trunk.stages[-1].downsample.conv2.conv.stride = (1, 1)
        c = config.out_chans
        self.neck = nn.Sequential(
            nn.Conv2d(config.embed_dims[-1], c, kernel_size=1, bias=False),
            LayerNorm2d(c),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(c),
        )
        # Loading weights in eval mode must not leave biases cached from the previous weights.
        self.register_load_state_dict_post_hook(lambda module, _keys: clear_attention_bias_cache(module))

    @property
    def out_chans(self) -> int:
        return self.config.out_chans

    def no_weight_decay(self) -> Set[str]:
        """timm's TinyViT declares its attention biases (learned relative-position tables)."""
        return {f"trunk.{name}" for name in self.trunk.no_weight_decay()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.trunk.forward_features(x))


# --- key names: official MobileSAM (`image_encoder.*` without the prefix) <-> ours ---------------

_OFFICIAL_TO_OURS = [
    (r"^patch_embed\.seq\.0\.", "trunk.patch_embed.conv1."),
    (r"^patch_embed\.seq\.2\.", "trunk.patch_embed.conv2."),
    (r"^norm_head\.", "trunk.head.norm."),
    (r"^head\.", "trunk.head.fc."),
    (r"^neck\.", "neck."),
]


def _rename_conv_bn(key: str, official: bool) -> str:
    # MobileSAM's Conv2d_BN names its conv `c`; timm's ConvNorm names it `conv`.
    return re.sub(r"\.conv\.(weight)$", r".c.\1", key) if official else re.sub(r"\.c\.(weight)$", r".conv.\1", key)


def tinyvit_official_to_ours(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a prefix-stripped official MobileSAM encoder state dict to our key names."""
    out = {}
    for k, v in sd.items():
        nk = k
        for pat, rep in _OFFICIAL_TO_OURS:
            if re.match(pat, nk):
                nk = re.sub(pat, rep, nk)
                break
        else:
            m = re.match(r"^layers\.(\d+)\.(blocks|downsample)\.(.*)$", nk)
            if m is None:
                nk = "unknown." + nk  # surfaces as an unexpected key in strict loading
            else:
                i, part, rest = int(m.group(1)), m.group(2), m.group(3)
                # Official: a layer's downsample sits at its end; timm: at the start of the next stage.
                stage = i + 1 if part == "downsample" else i
                nk = f"trunk.stages.{stage}.{part}.{rest}"
        out[_rename_conv_bn(nk, official=False)] = v
    return out


def tinyvit_ours_to_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Inverse of `tinyvit_official_to_ours`."""
    out = {}
    for k, v in sd.items():
        nk = _rename_conv_bn(k, official=True)
        if nk.startswith("trunk.patch_embed.conv1."):
            nk = "patch_embed.seq.0." + nk[len("trunk.patch_embed.conv1.") :]
        elif nk.startswith("trunk.patch_embed.conv2."):
            nk = "patch_embed.seq.2." + nk[len("trunk.patch_embed.conv2.") :]
        elif nk.startswith("trunk.head.norm."):
            nk = "norm_head." + nk[len("trunk.head.norm.") :]
        elif nk.startswith("trunk.head.fc."):
            nk = "head." + nk[len("trunk.head.fc.") :]
        elif nk.startswith("trunk.stages."):
            m = re.match(r"^trunk\.stages\.(\d+)\.(blocks|downsample)\.(.*)$", nk)
            assert m is not None, k
            i, part, rest = int(m.group(1)), m.group(2), m.group(3)
            layer = i - 1 if part == "downsample" else i
            nk = f"layers.{layer}.{part}.{rest}"
        out[nk] = v
    return out
