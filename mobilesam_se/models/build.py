"""Builders: MobileSAM (full size or a tiny test size) with any `image_size`."""
from __future__ import annotations

from typing import Optional

from mobilesam_se.models.image_encoder import MOBILESAM_TINYVIT, SMALL_TINYVIT, TINY_TINYVIT, TinyVitImageEncoder
from mobilesam_se.models.mask_decoder import MaskDecoder
from mobilesam_se.models.prompt_encoder import PromptEncoder
from mobilesam_se.models.sam import SamModel
from mobilesam_se.models.transformer import TwoWayTransformer

# Decoder sizes: SAM's, and a tiny one for tests / CPU smoke runs.
DECODER_SIZES = {
    "sam": dict(dim=256, depth=2, heads=8, mlp_dim=2048, iou_hidden=256, mask_in_chans=16),
    "small": dict(dim=64, depth=2, heads=4, mlp_dim=256, iou_hidden=64, mask_in_chans=16),
    "tiny": dict(dim=32, depth=2, heads=2, mlp_dim=64, iou_hidden=32, mask_in_chans=16),
}


def build_sam_head(encoder, image_size: int, decoder_size: str = "sam") -> SamModel:
    """Wrap an image encoder with SAM's prompt encoder and mask decoder."""
    cfg = DECODER_SIZES[decoder_size]
    grid = image_size // 16
    prompt_encoder = PromptEncoder(
        embed_dim=cfg["dim"], image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
        mask_in_chans=cfg["mask_in_chans"],
    )
    decoder = MaskDecoder(
        transformer_dim=cfg["dim"],
        transformer=TwoWayTransformer(depth=cfg["depth"], embedding_dim=cfg["dim"], num_heads=cfg["heads"], mlp_dim=cfg["mlp_dim"]),
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=cfg["iou_hidden"],
    )
    return SamModel(encoder, prompt_encoder, decoder, image_size=image_size)


def build_mobilesam(
    image_size: int = 1024,
    size: str = "full",
    checkpoint: Optional[str] = None,
    drop_path_rate: float = 0.0,
    grad_checkpointing: bool = False,
) -> SamModel:
    """MobileSAM. `size='full'` is the official architecture; `size='tiny'` is for tests.

    `checkpoint`, when given, is an official-layout file (`mobile_sam.pt`, our `best.pt`) or our
    `last.ckpt`, loaded strictly. `grad_checkpointing` sets the model's flag
    (`model.activation_checkpointing` in the config).
    """
    if size == "full":
        model = build_sam_head(TinyVitImageEncoder(MOBILESAM_TINYVIT, drop_path_rate), image_size, "sam")
    elif size == "small":
        model = build_sam_head(TinyVitImageEncoder(SMALL_TINYVIT, drop_path_rate), image_size, "small")
    elif size == "tiny":
        model = build_sam_head(TinyVitImageEncoder(TINY_TINYVIT, drop_path_rate), image_size, "tiny")
    else:
        raise ValueError(f"model.size must be 'full', 'small' or 'tiny', got {size!r}")
    model.set_grad_checkpointing(grad_checkpointing)
    if checkpoint:
        from mobilesam_se.models.checkpoint import load_model_weights

        load_model_weights(model, checkpoint)
    return model
