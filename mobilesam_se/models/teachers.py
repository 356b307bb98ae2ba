"""Frozen distillation teachers: SAM ViT-H/L/B, the original MobileSAM, or a random tiny one.

A teacher is a `SamModel` built at the *student's* image_size, so its embedding grid (S/16), its
low-res masks (S/4) and its decoder tokens line up with the student's one to one. SAM ViT
checkpoints are 1024 px; loading them at another size interpolates pos_embed / rel_pos as
`sam_vit` documents. Teachers are in eval mode with requires_grad off; the distiller runs them
under `torch.no_grad()` (bf16 autocast on CUDA).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from mobilesam_se.errors import CheckpointError, UserError
from mobilesam_se.models.build import DECODER_SIZES, build_mobilesam, build_sam_head
from mobilesam_se.models.checkpoint import load_official_state_dict, model_state_from_file, read_checkpoint
from mobilesam_se.models.sam import SamModel
from mobilesam_se.models.sam_vit import (
    SAM_VIT_CONFIGS,
    SamViTConfig,
    build_sam_vit_encoder,
    sam_encoder_state_dict_to_timm,
    sam_vit_variant_from_checkpoint,
    timm_encoder_state_dict_to_sam,
)

SAM_VIT_MODELS = {"sam_vit_h": "vit_h", "sam_vit_l": "vit_l", "sam_vit_b": "vit_b"}
TEACHER_MODELS = (*SAM_VIT_MODELS, "mobilesam", "tiny")
NATIVE_SIZE = 1024  # the input size every official teacher (SAM ViT-B/L/H, MobileSAM) was trained at


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    model: str
    checkpoint: Optional[str] = None
    weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in TEACHER_MODELS:
            raise ValueError(f"teacher {self.name!r}: model must be one of {TEACHER_MODELS}, got {self.model!r}")
        if self.model != "tiny" and not self.checkpoint:
            raise ValueError(f"teacher {self.name!r} ({self.model}) needs a checkpoint")


class SamVitImageEncoder(nn.Module):
    """timm's SAM ViT trunk with the official-layout mapping `checkpoint.py` dispatches on.

    `state_dict_from_official` takes SAM's `image_encoder.*` names (prefix stripped) at any
    resolution and interpolates pos_embed / global rel_pos to this encoder's `img_size`.
    """

    def __init__(self, config: SamViTConfig, img_size: int) -> None:
        super().__init__()
        self.config = config
        self.img_size = img_size
        self.trunk = build_sam_vit_encoder(config, img_size=img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def state_dict_from_official(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        # Without a pos_embed there is nothing to resize from; the strict key check reports it.
        size = self.img_size if "pos_embed" in sd else None
        mapped = sam_encoder_state_dict_to_timm(
            sd, img_size=size, patch_size=self.config.patch_size, global_attn_indexes=self.config.global_attn_indexes
        )
        return {"trunk." + k: v for k, v in mapped.items()}

    def state_dict_to_official(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        own = {k[len("trunk."):]: v for k, v in sd.items() if k.startswith("trunk.")}
        return timm_encoder_state_dict_to_sam(own)


def _decoder_size_for(dim: int) -> str:
    for name, cfg in DECODER_SIZES.items():
        if cfg["dim"] == dim:
            return name
    raise ValueError(f"no decoder size has dim {dim}; known: { {k: v['dim'] for k, v in DECODER_SIZES.items()} }")


def _variant_hint(state: Dict[str, torch.Tensor]) -> str:
    """Which SAM ViT the file's encoder is, for the error of a teacher model that does not fit it
    (a ViT-H file given as sam_vit_b would otherwise read as hundreds of shape mismatches)."""
    try:
        variant = sam_vit_variant_from_checkpoint(state)
    except ValueError:
        return ""
    name = next((m for m, v in SAM_VIT_MODELS.items() if v == variant), variant)
    return f"\n  its image encoder looks like {name!r} (distillation.teachers[i].model)"


def build_sam_vit_teacher(config: SamViTConfig, image_size: int, decoder_size: str = "mobilesam") -> SamModel:
    """A SAM ViT encoder + SAM prompt encoder / mask decoder at `image_size`, randomly initialised."""
    return build_sam_head(SamVitImageEncoder(config, image_size), image_size, decoder_size)


def build_teacher_model(spec: TeacherSpec, image_size: int, tiny_dim: int = 32) -> SamModel:
    """Build (and load) one teacher, frozen and in eval mode, on the CPU.

    `tiny_dim` is the tiny teacher's embedding / decoder width: the student's, so the terms that
    compare tensors channel by channel apply (32 for the tiny student, 256 for MobileSAM).
    """
    if spec.model == "tiny":
        with torch.random.fork_rng(devices=[]):  # seeded without disturbing the run's RNG stream
            torch.manual_seed(spec.seed)
            config = dataclasses.replace(SAM_VIT_CONFIGS["tiny"], neck_chans=tiny_dim)
            model = build_sam_vit_teacher(config, image_size, _decoder_size_for(tiny_dim))
    elif spec.model == "mobilesam":
        model = build_mobilesam(image_size, size="mobilesam", checkpoint=spec.checkpoint)
    else:
        model = build_sam_vit_teacher(SAM_VIT_CONFIGS[SAM_VIT_MODELS[spec.model]], image_size, "mobilesam")
        # Full SAM checkpoint: image_encoder.* through the sam_vit mapping, the rest by name; strict.
        state = model_state_from_file(read_checkpoint(spec.checkpoint))
        try:
            load_official_state_dict(model, state, str(spec.checkpoint))
        except CheckpointError as err:
            raise CheckpointError(f"{err}{_variant_hint(state)}") from None
    return freeze_teacher(model)


class EncoderNotLoaded(nn.Module):
    """Stands in for a teacher's image encoder while its cache serves every image (nothing to load)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this teacher was built without its image encoder (the cache held every image)")

    def state_dict_from_official(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {}

    def state_dict_to_official(self, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {}


def _read_without_encoder(path: str) -> Dict[str, torch.Tensor]:
    # mmap: the encoder's tensors (2.4 GB for ViT-H) are never read from disk, only the ~16 MB rest.
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be mapped
        sd = read_checkpoint(path)
    sd = model_state_from_file(sd)
    return {k: v.clone() for k, v in sd.items() if not k.startswith("image_encoder.")}


def build_teacher_decoder_only(spec: TeacherSpec, image_size: int) -> SamModel:
    """A checkpointed teacher's prompt encoder and mask decoder (strictly loaded), no image encoder."""
    if spec.model == "tiny":
        raise ValueError("the tiny teacher is built whole (its decoder's init depends on its encoder's)")
    model = build_sam_head(EncoderNotLoaded(), image_size, "mobilesam")
    load_official_state_dict(model, _read_without_encoder(str(spec.checkpoint)), str(spec.checkpoint))
    return freeze_teacher(model)


def has_encoder(model: SamModel) -> bool:
    return not isinstance(getattr(model, "image_encoder", None), EncoderNotLoaded)


def freeze_teacher(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_teacher_files(specs: Iterable[TeacherSpec]) -> None:
    """Fail at start-up, naming every missing checkpoint, before any (multi-GB) file is loaded."""
    missing = [f"{s.name}: {s.checkpoint}" for s in specs if s.model != "tiny" and not os.path.isfile(str(s.checkpoint))]
    if missing:
        raise UserError(
            "distillation teacher checkpoint(s) not found: " + "; ".join(missing)
            + " (fix distillation.teachers[i].checkpoint: a file, or a name such as sam_vit_h / mobile_sam that "
            "downloads the official weights)"
        )


def teacher_fingerprint(spec: TeacherSpec, tiny_dim: int = 32) -> str:
    """Identifies the teacher's weights for the embedding cache: file path + size + mtime, or tiny + seed."""
    if spec.model == "tiny":
        return f"tiny:seed={spec.seed}:dim={tiny_dim}"
    st = os.stat(str(spec.checkpoint))
    return f"{spec.model}:{os.path.abspath(str(spec.checkpoint))}:{st.st_size}:{st.st_mtime_ns}"


def teacher_dim(model: SamModel) -> int:
    return int(model.mask_decoder.transformer_dim)


def expected_teacher_dim(spec: TeacherSpec, tiny_dim: int = 32) -> int:
    """The teacher's embedding / decoder width, known before building it: SAM's 256, or tiny's."""
    return tiny_dim if spec.model == "tiny" else DECODER_SIZES["mobilesam"]["dim"]


__all__: List[str] = [
    "TEACHER_MODELS", "TeacherSpec", "SamVitImageEncoder", "build_sam_vit_teacher", "build_teacher_model",
    "freeze_teacher", "check_teacher_files", "build_teacher_decoder_only", "has_encoder", "NATIVE_SIZE", "teacher_fingerprint", "teacher_dim", "expected_teacher_dim",
]
