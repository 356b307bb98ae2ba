"""Builders: MobileSAM (its own size, or a small / tiny one) with any `image_size`, and the model of a checkpoint."""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Collection, Dict, Optional, Union

import torch
from omegaconf import DictConfig

from mobilesam_se.models.image_encoder import MOBILESAM_TINYVIT, SMALL_TINYVIT, TINY_TINYVIT, TinyVitImageEncoder
from mobilesam_se.models.mask_decoder import MaskDecoder
from mobilesam_se.models.prompt_encoder import PromptEncoder
from mobilesam_se.models.sam import SamModel
from mobilesam_se.models.transformer import TwoWayTransformer, tie_query_key_init

log = logging.getLogger(__name__)

# One vocabulary for sizes, the `model=` options' names: `model.size`, the decoder sizes below and
# the teachers' `mobilesam` / `tiny` all say mobilesam | small | tiny.
SIZES = ("mobilesam", "small", "tiny")
# Descriptions written before sizes took the `model=` names say "full" for mobilesam.
_OLD_SIZE_NAMES = {"full": "mobilesam"}


def size_name(size: str) -> str:
    """`size` in the one vocabulary (an older file's "full" is "mobilesam")."""
    return _OLD_SIZE_NAMES.get(str(size), str(size))


# Decoder sizes. mobilesam's is SAM's own decoder (MobileSAM kept it; the SAM ViT teachers have it).
DECODER_SIZES = {
    "mobilesam": dict(dim=256, depth=2, heads=8, mlp_dim=2048, iou_hidden=256, mask_in_chans=16),
    "small": dict(dim=64, depth=2, heads=4, mlp_dim=256, iou_hidden=64, mask_in_chans=16),
    "tiny": dict(dim=32, depth=2, heads=2, mlp_dim=64, iou_hidden=32, mask_in_chans=16),
}
# MobileSAM's TinyViT encoder at each size.
ENCODER_SIZES = {"mobilesam": MOBILESAM_TINYVIT, "small": SMALL_TINYVIT, "tiny": TINY_TINYVIT}


def build_sam_head(encoder, image_size: int, decoder_size: str = "mobilesam", pe_scale: float = 1.0) -> SamModel:
    """Wrap an image encoder with SAM's prompt encoder and mask decoder. `pe_scale`: the spread of the
    positional encoding's random frequencies (SAM's 1.0; a buffer that a checkpoint overwrites)."""
    cfg = DECODER_SIZES[decoder_size]
    grid = image_size // 16
    prompt_encoder = PromptEncoder(
        embed_dim=cfg["dim"], image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
        mask_in_chans=cfg["mask_in_chans"], pe_scale=pe_scale,
    )
    decoder = MaskDecoder(
        transformer_dim=cfg["dim"],
        transformer=TwoWayTransformer(depth=cfg["depth"], embedding_dim=cfg["dim"], num_heads=cfg["heads"], mlp_dim=cfg["mlp_dim"]),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg["iou_hidden"],
    )
    return SamModel(encoder, prompt_encoder, decoder, image_size=image_size)


ATTENTION_INITS = ("default", "tied_qk")


def build_mobilesam(
    image_size: int = 1024,
    size: str = "mobilesam",
    checkpoint: Optional[str] = None,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
    attention_init: str = "default",
    pe_scale: float = 1.0,
) -> SamModel:
    """MobileSAM. `size='mobilesam'` is the official architecture; `small` and `tiny` (tests, CPU runs)
    are the same topology, narrower.

    `checkpoint`, when given, is an official-layout file (`mobile_sam.pt`, our `best.pt`) or our
    `last.ckpt`, loaded strictly. `grad_checkpointing` sets the model's flag
    (`model.activation_checkpointing` in the config). `attention_init`: "default" (PyTorch's init,
    as the reference) or "tied_qk" (the decoder's attention starts as a positional kernel, see
    `tie_query_key_init`; what random-init training wants, overwritten by a checkpoint). `pe_scale`:
    the standard deviation of the positional encoding's Gaussian frequencies (SAM's 1.0; a buffer in
    the state dict, so a checkpoint overwrites it too).
    """
    if attention_init not in ATTENTION_INITS:
        raise ValueError(f"model.attention_init must be one of {ATTENTION_INITS}, got {attention_init!r}")
    if not pe_scale > 0:
        raise ValueError(f"model.pe_scale must be > 0 (SAM's is 1.0), got {pe_scale!r}")
    size = size_name(size)
    if size not in ENCODER_SIZES:
        raise ValueError(f"model.size must be one of {SIZES}, got {size!r}")
    model = build_sam_head(TinyVitImageEncoder(ENCODER_SIZES[size], drop_path_rate), image_size, size, pe_scale)
    model.set_grad_checkpointing(grad_checkpointing)
    if attention_init == "tied_qk":
        tie_query_key_init(model.mask_decoder)
    if checkpoint:
        from mobilesam_se.models.checkpoint import load_model_weights

        load_model_weights(model, checkpoint)
    return model


# -- the model of a checkpoint ------------------------------------------------------------------------
OFFICIAL_IMAGE_SIZE = 1024  # what mobile_sam.pt was trained and is run at


@functools.lru_cache(maxsize=None)
def _official_shapes_of(size: str) -> Dict[str, tuple]:
    from mobilesam_se.models.checkpoint import official_shapes

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_mobilesam(OFFICIAL_IMAGE_SIZE, size=size)  # the weights' shapes do not depend on image_size
    return {k: tuple(v) for k, v in official_shapes(model).items()}


def infer_size(state: Dict[str, torch.Tensor], source: str) -> str:
    """The MobileSAM size (`model.size`) whose official-layout weights have exactly these keys and shapes."""
    from mobilesam_se.models.checkpoint import CheckpointError

    shapes = {k: tuple(v.shape) for k, v in state.items()}
    differing = {}
    for size in SIZES:
        expected = _official_shapes_of(size)
        if shapes == expected:
            return size
        differing[size] = len(set(shapes.items()) ^ set(expected.items()))
    counts = ", ".join(f"{size}: {n} keys or shapes differ" for size, n in differing.items())
    raise CheckpointError(f"checkpoint {source} is no MobileSAM of a known size ({counts}); the CLIs take "
                          "mobile_sam.pt and the best.pt / last.ckpt / exports of this project")


def _bare_file_description(model_cfg: DictConfig, state: Dict[str, torch.Tensor], typed: Collection[str],
                           source: str) -> Dict[str, Any]:
    """What a file without a description is: the size its weights' shapes say, at 1024 px when that is
    the official architecture (mobile_sam.pt), else at the configured model.image_size."""
    size = infer_size(state, source)
    if "image_size" in typed or size != "mobilesam":
        image_size = int(model_cfg.image_size)
    else:
        image_size = OFFICIAL_IMAGE_SIZE
    target = f"{build_mobilesam.__module__}.{build_mobilesam.__qualname__}"
    return {"name": size, "size": size, "image_size": image_size,
            "multimask_output": bool(model_cfg.multimask_output),
            "net": {"_target_": target, "image_size": image_size, "size": size, "checkpoint": None,
                    "drop_path_rate": 0.0}}


def _settle_model_config(model_cfg: DictConfig, description: Dict[str, Any], typed: Collection[str],
                         checkpoint: str, source: str) -> None:
    """Set `model_cfg` to the described model. The architecture is the checkpoint's: a typed one that
    differs is an error. image_size / multimask_output are how to run it: a typed value wins, with a
    warning when it differs from the description."""
    from mobilesam_se.errors import ConfigError

    if typed_arch := {"name", "size"} & set(typed):
        if size_name(model_cfg.size) != size_name(description["size"]):
            flags = "model=" + str(model_cfg.name) if "name" in typed_arch else "model.size=" + str(model_cfg.size)
            raise ConfigError(f"{flags} does not fit checkpoint {checkpoint}: it is a model.size={description['size']} "
                              f"model ({source}); drop the flag, the checkpoint decides its architecture")
    for key in ("image_size", "multimask_output"):
        if key not in typed:
            model_cfg[key] = description[key]
        elif model_cfg[key] != description[key]:
            log.warning("model.%s=%s (typed) overrides %s recorded for %s (%s)", key, model_cfg[key],
                        description[key], checkpoint, source)
    model_cfg.name, model_cfg.size = description["name"], size_name(description["size"])
    net = dict(description["net"])
    if "size" in net:
        net["size"] = size_name(net["size"])
    if "image_size" in net:
        net["image_size"] = int(model_cfg.image_size)
    model_cfg.net = net


def build_from_checkpoint(checkpoint: Optional[Union[str, os.PathLike]], cfg: DictConfig,
                          typed: Collection[str] = ()) -> SamModel:
    """The model of a checkpoint, as the CLIs (segment, evaluate, export, tune) get it: built as the
    checkpoint describes it, its weights loaded strictly, and `cfg.model` set in place to what was
    built, so that what reads it afterwards (the dataset's image_size, multimask_output, the report)
    agrees.

    `cfg`: a composed config with a `model` group (a CLI's); `typed`: the
    `model` keys typed on the command line (`overrides.typed_model_keys`). Where the values come from:
      - described files (best.pt + best.model.yaml, last.ckpt, our exports): their description;
      - bare files (mobile_sam.pt): the size their weights' shapes say, 1024 px for the official one;
      - a typed model.image_size / model.multimask_output wins (a warning when it differs from the
        description); a typed model= / model.size= that differs is an error (`_settle_model_config`);
      - every other key (points_per_batch, ...): the config.
    Without a checkpoint (evaluate allow_random=true): the configured model, randomly initialised.
    """
    from hydra.utils import instantiate

    from mobilesam_se.models.checkpoint import (
        load_official_state_dict,
        model_state_from_file,
        read_checkpoint,
        read_description,
    )

    if not checkpoint:
        return instantiate(cfg.model.net, checkpoint=None)
    obj = read_checkpoint(checkpoint)
    state = model_state_from_file(obj)
    found = read_description(checkpoint, obj)
    if found is None:
        description = _bare_file_description(cfg.model, state, typed, str(checkpoint))
        source = "inferred from its weights"
    else:
        description, source = found
    _settle_model_config(cfg.model, description, typed, str(checkpoint), source)
    model = instantiate(cfg.model.net)
    load_official_state_dict(model, state, f"{checkpoint} ({source})")
    log.info("model: %s (model.size=%s) at %d px, multimask_output=%s, from %s (%s)", cfg.model.name, cfg.model.size,
             cfg.model.image_size, cfg.model.multimask_output, checkpoint, source)
    return model
