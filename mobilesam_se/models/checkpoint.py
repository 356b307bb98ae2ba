"""Checkpoint I/O in the official layout (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`).

Our model uses timm's TinyViT, whose key names differ from MobileSAM's; everything that leaves or
enters this package goes through the official names, so `mobile_sam.build_sam_vit_t(checkpoint=...)`
loads our files strictly and we load `mobile_sam.pt` strictly.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Union

import torch
import torch.nn as nn

from mobilesam_se.errors import CheckpointError
from mobilesam_se.models.image_encoder import (
    TinyVitImageEncoder,
    clear_attention_bias_cache,
    tinyvit_official_to_ours,
    tinyvit_ours_to_official,
)

StateDict = Dict[str, torch.Tensor]


def _encoder_maps(encoder: nn.Module):
    if isinstance(encoder, TinyVitImageEncoder):
        return tinyvit_ours_to_official, tinyvit_official_to_ours
    to_off = getattr(encoder, "state_dict_to_official", None)
    from_off = getattr(encoder, "state_dict_from_official", None)
    if to_off is None or from_off is None:
        return (lambda sd: dict(sd)), (lambda sd: dict(sd))
    return to_off, from_off


def official_state_dict(model: nn.Module) -> StateDict:
    """The model's weights under the official MobileSAM / SAM key names (CPU tensors)."""
    to_off, _ = _encoder_maps(model.image_encoder)
    out: StateDict = {}
    enc = {k: v.detach().cpu() for k, v in model.image_encoder.state_dict().items()}
    for k, v in to_off(enc).items():
        out["image_encoder." + k] = v
    for part in ("prompt_encoder", "mask_decoder"):
        for k, v in getattr(model, part).state_dict().items():
            out[f"{part}.{k}"] = v.detach().cpu()
    return out


def _format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_official_state_dict(model: nn.Module, sd: StateDict, source: str = "<state dict>") -> None:
    """Load an official-layout state dict strictly; a mismatch names the file and the keys."""
    _, from_off = _encoder_maps(model.image_encoder)
    parts: Dict[str, StateDict] = {"image_encoder": {}, "prompt_encoder": {}, "mask_decoder": {}}
    unexpected = []
    for k, v in sd.items():
        head, _, rest = k.partition(".")
        if head in parts:
            parts[head][rest] = v
        else:
            unexpected.append(k)
    parts["image_encoder"] = from_off(parts["image_encoder"])
    missing = []
    shape_errors = []
    for name, part_sd in parts.items():
        module = getattr(model, name)
        own = module.state_dict()
        missing += [f"{name}.{k}" for k in own if k not in part_sd]
        unexpected += [f"{name}.{k}" for k in part_sd if k not in own]
        shape_errors += [
            f"{name}.{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in part_sd.items() if k in own and own[k].shape != v.shape
        ]
    if missing or unexpected or shape_errors:
        msg = [f"checkpoint {source} does not match the model (model.size / model.image_size / teacher type?)"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if shape_errors:
            msg.append(f"shape mismatches ({len(shape_errors)}): {_format_keys(shape_errors)}")
        raise CheckpointError("\n  ".join(msg))
    for name, part_sd in parts.items():
        getattr(model, name).load_state_dict(part_sd, strict=True)
    clear_attention_bias_cache(model)


def read_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """torch.load a file with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (check the path, or download mobile_sam.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def model_state_from_file(obj: Dict[str, Any]) -> StateDict:
    """The official-layout weights inside any of our files: `mobile_sam.pt`, `best.pt`, `last.ckpt`."""
    if "model" in obj and isinstance(obj["model"], dict):  # our training checkpoint
        return obj["model"]
    return obj


def load_model_weights(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    load_official_state_dict(model, model_state_from_file(read_checkpoint(path)), str(path))


def atomic_save(obj: Any, path: Union[str, os.PathLike]) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`.

    A run killed mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_official(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write weights only, in the official layout (drops into `build_sam_vit_t(checkpoint=...)`)."""
    atomic_save(official_state_dict(model), path)
