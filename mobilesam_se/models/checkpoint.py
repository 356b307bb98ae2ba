"""Checkpoint I/O in the official layout (`image_encoder.*`, `prompt_encoder.*`, `mask_decoder.*`).

Our model uses timm's TinyViT, whose key names differ from MobileSAM's; everything that leaves or
enters this package goes through the official names, so `mobile_sam.build_sam_vit_t(checkpoint=...)`
loads our files strictly and we load `mobile_sam.pt` strictly.

Every checkpoint we write also says which model wrote it (its *description*: the `model` group's
name, size, image_size, multimask_output and the `net` config that rebuilds it): `last.ckpt` in
the resolved config it carries, weights-only files (`best.pt`, `export format=mobile_sam`) in a
side file beside them (`best.pt` -> `best.model.yaml`), because the official loader takes the
state dict strictly and an extra key would break it. `models.build.build_from_checkpoint` reads it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
import yaml
from omegaconf import DictConfig, OmegaConf

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


def _official_items(model: nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    """(official key, tensor) for every entry of the model's state dict, tensors as they are."""
    to_off, _ = _encoder_maps(model.image_encoder)
    for k, v in to_off(model.image_encoder.state_dict()).items():
        yield "image_encoder." + k, v
    for part in ("prompt_encoder", "mask_decoder"):
        for k, v in getattr(model, part).state_dict().items():
            yield f"{part}.{k}", v


def official_state_dict(model: nn.Module) -> StateDict:
    """The model's weights under the official MobileSAM / SAM key names (CPU tensors)."""
    return {k: v.detach().cpu() for k, v in _official_items(model)}


def official_shapes(model: nn.Module) -> Dict[str, torch.Size]:
    """The shapes of `official_state_dict(model)`; works on a model built on the meta device."""
    return {k: v.shape for k, v in _official_items(model)}


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


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write a small text file beside a checkpoint the way `atomic_save` writes the checkpoint."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of a shared run directory
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- what built a checkpoint --------------------------------------------------------------------------
# The `model` group keys a description records besides `net` (those that say what the weights are).
DESCRIBED_KEYS = ("name", "size", "image_size", "multimask_output")
DESCRIPTION_SUFFIX = ".model.yaml"


def describe_model(model_cfg: Union[DictConfig, Mapping[str, Any]]) -> Dict[str, Any]:
    """The description of the model a `model` group config builds: its identifying keys and its
    `net` (the `_target_` and arguments that rebuild it), resolved, without the net's start-up
    checkpoint (the described file holds the weights)."""
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    missing = [k for k in (*DESCRIBED_KEYS, "net") if k not in cfg]
    if missing:
        raise CheckpointError(f"a model description needs the model keys {missing}")
    net = dict(cfg["net"])
    if "checkpoint" in net:
        net["checkpoint"] = None
    return {**{k: cfg[k] for k in DESCRIBED_KEYS}, "net": net}


def description_path(checkpoint: Union[str, os.PathLike]) -> Path:
    """best.pt -> best.model.yaml, beside the checkpoint."""
    path = Path(checkpoint)
    return path.with_name(path.stem + DESCRIPTION_SUFFIX)


def write_description(checkpoint: Union[str, os.PathLike], description: Mapping[str, Any]) -> Path:
    path = description_path(checkpoint)
    header = (f"# The model that wrote {Path(checkpoint).name}; python -m mobilesam_se.segment / evaluate / export /"
              " tune build it from here.\n")
    atomic_write_text(path, header + yaml.safe_dump({"model": dict(description)}, sort_keys=False))
    return path


def _read_description_file(path: Path) -> Dict[str, Any]:
    fix = "delete it to have the architecture inferred from the weights, or re-export the checkpoint"
    try:
        body = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{path}: unreadable model description ({exc}); {fix}") from exc
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("net"), dict) or "_target_" not in model["net"]:
        raise CheckpointError(f"{path}: a model description needs a `model:` mapping with a `net:` that has a "
                              f"`_target_`; {fix}")
    missing = [k for k in DESCRIBED_KEYS if k not in model]
    if missing:
        raise CheckpointError(f"{path}: the model description lacks {', '.join(missing)}; {fix}")
    return describe_model(model)


def read_description(checkpoint: Union[str, os.PathLike],
                     obj: Mapping[str, Any]) -> Optional[Tuple[Dict[str, Any], str]]:
    """(description, where it was found) of a checkpoint whose loaded content is `obj`: the config a
    training checkpoint carries, else the side file; None for a bare file such as `mobile_sam.pt`."""
    config = obj.get("config") if isinstance(obj.get("model"), dict) else None
    if isinstance(config, dict) and isinstance(config.get("model"), dict):
        return describe_model(config["model"]), f"the config inside {Path(checkpoint).name}"
    side = description_path(checkpoint)
    if side.is_file():
        return _read_description_file(side), side.name
    return None


def export_official(model: nn.Module, path: Union[str, os.PathLike],
                    model_cfg: Optional[Union[DictConfig, Mapping[str, Any]]] = None) -> None:
    """Write weights only, in the official layout (drops into `build_sam_vit_t(checkpoint=...)`), and,
    given the `model` config that built `model`, its description beside them (best.model.yaml).

    Without `model_cfg` the file is bare, like `mobile_sam.pt`, and a description left there by an
    earlier file of that name is removed: it would describe other weights."""
    atomic_save(official_state_dict(model), path)
    if model_cfg is None:
        description_path(path).unlink(missing_ok=True)
    else:
        write_description(path, describe_model(model_cfg))
