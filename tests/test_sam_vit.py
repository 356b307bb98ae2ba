"""SAM ViT teacher encoders (timm) against segment_anything's ImageEncoderViT, with random weights."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Dict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mobilesam_se.errors import CheckpointError
from mobilesam_se.models.checkpoint import load_model_weights, official_state_dict
from mobilesam_se.models.sam_vit import (
    SAM_VIT_CONFIGS,
    SamViTConfig,
    build_sam_vit_encoder,
    sam_encoder_state_dict_to_timm,
    sam_vit_variant_from_checkpoint,
    timm_encoder_state_dict_to_sam,
)
from mobilesam_se.models.teachers import TeacherSpec, build_sam_vit_teacher, build_teacher_model
from mobilesam_se.transforms import preprocess_image

segment_anything = pytest.importorskip("segment_anything")
skimage_data = pytest.importorskip("skimage.data")
from segment_anything.modeling import ImageEncoderViT  # noqa: E402

# vit_b's width and heads at two blocks (one windowed, one global): the real per-block shapes, fast.
VIT_B_DEPTH2 = SamViTConfig(embed_dim=768, depth=2, num_heads=12, global_attn_indexes=(1,))
CASES = [
    pytest.param(SAM_VIT_CONFIGS["tiny"], 256, id="tiny-256"),
    pytest.param(VIT_B_DEPTH2, 256, id="vit_b_depth2-256"),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def make_reference(cfg: SamViTConfig, img_size: int, seed: int = 0) -> ImageEncoderViT:
    """SAM's encoder as build_sam makes it, with every tensor random (SAM zero-inits the pos tables,
    which would hide a wrong pos_embed / rel_pos mapping)."""
    torch.manual_seed(seed)
    ref = ImageEncoderViT(
        img_size=img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.neck_chans,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "pos" in name:
                p.normal_(0.0, 0.2)
            elif p.ndim == 1:  # norm weights / biases and linear biases
                p.add_(0.1 * torch.randn_like(p))
    return ref.eval()


def save_official(ref: ImageEncoderViT, path: Path, cfg: SamViTConfig) -> Path:
    """A full SAM checkpoint: the reference's encoder under `image_encoder.`, a random prompt
    encoder and mask decoder beside it (the teacher loads the whole file strictly)."""
    head = official_state_dict(build_sam_vit_teacher(cfg, 256))
    sd: Dict[str, torch.Tensor] = {k: v for k, v in head.items() if not k.startswith("image_encoder.")}
    sd.update({f"image_encoder.{k}": v for k, v in ref.state_dict().items()})
    torch.save(sd, path)
    return path


def load_encoder(cfg: SamViTConfig, path: Path, img_size: int = 1024) -> nn.Module:
    """The teacher's one loading path (models.checkpoint), then its timm trunk."""
    model = build_sam_vit_teacher(cfg, img_size)
    load_model_weights(model, path)
    return model.image_encoder.trunk.eval()


@pytest.fixture(scope="module")
def coffee() -> torch.Tensor:
    return preprocess_image(skimage_data.coffee(), 256)[None]


@pytest.mark.parametrize("cfg,img_size", CASES)
def test_matches_segment_anything(
    cfg: SamViTConfig, img_size: int, coffee: torch.Tensor, tmp_path: Path
) -> None:
    ref = make_reference(cfg, img_size)
    ours = load_encoder(cfg, save_official(ref, tmp_path / "sam.pth", cfg), img_size=img_size)
    with torch.no_grad():
        expected = ref(coffee)
        got = ours(coffee)
    grid = img_size // 16
    assert got.shape == expected.shape == (1, 256, grid, grid)
    assert rel_err(got, expected) < 1e-4
    # timm defaults to eps 1e-5; with random weights that shifts the output by only ~2e-5
    # relative, under the tolerance, so check SAM's 1e-6 directly (LayerNorm2d subclasses LayerNorm).
    assert all(m.eps == 1e-6 for m in ours.modules() if isinstance(m, nn.LayerNorm))

    # Round trip: ours -> SAM names -> the reference loads strictly and computes the same embedding.
    back = timm_encoder_state_dict_to_sam(ours.state_dict())
    assert back.keys() == ref.state_dict().keys()
    ref2 = ImageEncoderViT(
        img_size=img_size, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    ).eval()
    ref2.load_state_dict(back, strict=True)
    with torch.no_grad():
        assert rel_err(ref2(coffee), got) < 1e-4


def test_attention_goes_through_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_sam_vit_encoder("tiny", img_size=256).eval()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(torch.randn(1, 3, 256, 256))
    assert calls == [True] * SAM_VIT_CONFIGS["tiny"].depth  # one call per block, rel-pos bias as mask


@pytest.mark.parametrize("img_size", [256, 512])
def test_lower_resolution_load_equals_runtime_resampling(img_size: int, tmp_path: Path) -> None:
    """Loading a (here 1024-px) checkpoint at a lower img_size interpolates pos_embed and the global
    rel_pos tables exactly as the full-size model resamples them at run time for that input size."""
    tiny = SAM_VIT_CONFIGS["tiny"]
    path = save_official(make_reference(tiny, 1024), tmp_path / "sam.pth", tiny)
    full = load_encoder(tiny, path)
    small = load_encoder(tiny, path, img_size=img_size)
    grid = img_size // 16
    assert small.pos_embed.shape == (1, grid, grid, tiny.embed_dim)
    assert small.blocks[1].attn.rel_pos_h.shape[0] == 2 * grid - 1  # global block resized
    assert small.blocks[0].attn.rel_pos_h.shape[0] == 2 * tiny.window_size - 1  # windowed block kept
    x = torch.randn(1, 3, img_size, img_size)
    with torch.no_grad():
        out = small(x)
        assert out.shape == (1, 256, grid, grid)
        assert rel_err(out, full(x)) < 1e-5


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "sam_vit_h_4b8939.pth"
    with pytest.raises(FileNotFoundError, match="sam_vit_h_4b8939.pth"):
        load_encoder(SAM_VIT_CONFIGS["tiny"], path)


def test_key_mismatch_names_keys_and_file(tmp_path: Path) -> None:
    tiny = SAM_VIT_CONFIGS["tiny"]
    path = save_official(make_reference(tiny, 256), tmp_path / "broken_sam.pth", tiny)
    sd = torch.load(path)
    sd["image_encoder.blocks.0.bogus"] = sd.pop("image_encoder.blocks.1.attn.qkv.weight")
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(tiny, path, img_size=256)
    message = str(info.value)
    assert "broken_sam.pth" in message
    assert "blocks.1.attn.qkv.weight" in message and "blocks.0.bogus" in message


def test_wrong_variant_is_reported(tmp_path: Path) -> None:
    tiny = SAM_VIT_CONFIGS["tiny"]
    path = save_official(make_reference(tiny, 256), tmp_path / "tiny.pth", tiny)
    spec = TeacherSpec(name="sam", model="sam_vit_b", checkpoint=str(path))
    with pytest.raises(CheckpointError, match=r"(?s)tiny\.pth.*shape mismatches.*looks like 'tiny'"):
        build_teacher_model(spec, 256)


@pytest.mark.parametrize("variant", ["vit_b", "vit_l", "vit_h", "tiny"])
def test_variant_from_shapes(variant: str) -> None:
    # Meta tensors: the real ViT-H layout without allocating its weights.
    timm_sd = build_sam_vit_encoder(variant, device="meta").state_dict()
    official = timm_encoder_state_dict_to_sam(timm_sd, prefix="image_encoder.")
    assert sam_vit_variant_from_checkpoint(official) == variant
    assert sam_vit_variant_from_checkpoint(timm_sd) == variant
    assert sam_encoder_state_dict_to_timm(official).keys() == timm_sd.keys()
    with pytest.raises(ValueError, match="no SAM ViT variant"):
        last = f"blocks.{SAM_VIT_CONFIGS[variant].depth - 1}."
        sam_vit_variant_from_checkpoint({k: v for k, v in timm_sd.items() if not k.startswith(last)})
