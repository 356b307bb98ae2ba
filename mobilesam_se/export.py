"""Export a checkpoint: official MobileSAM weights, or the prompt side (encoder + decoder) as ONNX.

    python -m mobilesam_se.export checkpoint=<mobile_sam.pt|best.pt|last.ckpt> format=mobile_sam out=<file.pt>
    python -m mobilesam_se.export checkpoint=<file> format=onnx out=<file.onnx>

The model is the one the checkpoint describes (`models.build.build_from_checkpoint`).

`mobile_sam`: weights only, official layout; `mobile_sam.build_sam_vit_t(checkpoint=out)` loads it
strictly. Beside it, `<out stem>.model.yaml` describes the model, as `best.model.yaml` does `best.pt`.

`onnx`: the prompt encoder + mask decoder for one image embedding, many prompts:
  inputs   image_embeddings (1, C, S/16, S/16) float32   (from the image encoder, run separately)
           point_coords     (P, K, 2) float32            xy in the resized S x S input frame
           point_labels     (P, K) float32               1 positive, 0 negative, -1 padding
  outputs  low_res_masks    (P, M, S/4, S/4) float32     logits; M = 3 with model.multimask_output, else 1
           iou_predictions  (P, M) float32
P (prompts) and K (points per prompt) are dynamic. As in our `SamModel.decode` without boxes, one
"not a point" token is appended to every prompt inside the graph, so pass only real points.
Upsampling the low-res logits to the image (`transforms.postprocess_masks`) is left to the caller.

The graph is traced from a plain (SAM-style, unchunked) forward over the model's own modules and
weights (`PromptDecoder`), so it has no Python loops over prompts and does not depend on how the
model's own batched decoder is organised; `onnx.check=true` compares it with the PyTorch model
(`SamModel.decode`) through onnxruntime. Exporter: with torch 2.14 both work and match to ~1e-7;
the default is the TorchScript exporter (`dynamo=False`: about a second, `dynamic_axes` for P and
K); `onnx.dynamo=true` uses the torch.export-based one (needs onnxscript, opset >= 18, ~15 s).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mobilesam_se.config import ModelConfig, PathsConfig

Tensor = torch.Tensor


@dataclass
class ExportConfig:
    """Types of conf/export.yaml, which holds the defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: Optional[str] = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)  # paths.weights_dir: where names download
    format: str = MISSING
    out: Optional[str] = MISSING
    onnx: Any = MISSING  # opset, dynamo, check


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


# -- a plain forward of the prompt side ---------------------------------------------------------------
def _attend(attn: nn.Module, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Multi-head attention with the module's projections: (B, Lq, C), (B, Lk, C) -> (B, Lq, C)."""
    heads = attn.num_heads

    def split(x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, heads, c // heads).transpose(1, 2)

    qh, kh, vh = split(attn.q_proj(q)), split(attn.k_proj(k)), split(attn.v_proj(v))
    w = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(qh.shape[-1]), dim=-1)
    out = (w @ vh).transpose(1, 2)
    return attn.out_proj(out.reshape(out.shape[0], out.shape[1], -1))


class PromptDecoder(nn.Module):
    """Prompt encoder + mask decoder of a `SamModel` for one embedding and P prompts, export-friendly."""

    def __init__(self, model: nn.Module, multimask_output: bool = True) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.mask_decoder = model.mask_decoder
        self.multimask_output = multimask_output
        # The upscaling's channel LayerNorm is applied here with a constant normalised shape (the
        # TorchScript exporter cannot export one read from an activation's shape).
        self._ln_channels = int(model.mask_decoder.output_upscaling[1].weight.shape[0])

    def _upscale(self, src: Tensor) -> Tensor:
        conv1, ln, act1, conv2, act2 = self.mask_decoder.output_upscaling
        x = conv1(src).permute(0, 2, 3, 1)
        x = F.layer_norm(x, (self._ln_channels,), ln.weight, ln.bias, ln.eps).permute(0, 3, 1, 2)
        return act2(conv2(act1(x)))

    def forward(self, image_embeddings: Tensor, point_coords: Tensor, point_labels: Tensor) -> Tuple[Tensor, Tensor]:
        pe_mod, dec = self.prompt_encoder, self.mask_decoder
        tr = dec.transformer
        sparse = pe_mod.embed_points(point_coords, point_labels, pad=True)  # (P, K+1, C)
        P = sparse.shape[0]
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat([out_tokens[None].expand(P, -1, -1), sparse], dim=1)  # (P, T, C)
        _, C, h, w = image_embeddings.shape
        dense = pe_mod.no_mask_embed.weight.reshape(1, C, 1, 1)
        image = (image_embeddings + dense).flatten(2).transpose(1, 2)  # (1, N, C)
        keys = image.expand(P, -1, -1)
        key_pe = pe_mod.get_dense_pe().flatten(2).transpose(1, 2).expand(P, -1, -1)

        queries = tokens
        for layer in tr.layers:
            if layer.skip_first_layer_pe:
                queries = _attend(layer.self_attn, queries, queries, queries)
            else:
                q = queries + tokens
                queries = queries + _attend(layer.self_attn, q, q, queries)
            queries = layer.norm1(queries)
            q, k = queries + tokens, keys + key_pe
            queries = layer.norm2(queries + _attend(layer.cross_attn_token_to_image, q, k, keys))
            queries = layer.norm3(queries + layer.mlp(queries))
            q, k = queries + tokens, keys + key_pe
            keys = layer.norm4(keys + _attend(layer.cross_attn_image_to_token, k, q, queries))
        q, k = queries + tokens, keys + key_pe
        queries = tr.norm_final_attn(queries + _attend(tr.final_attn_token_to_image, q, k, keys))

        idx = list(range(dec.num_mask_tokens))[dec.mask_slice(self.multimask_output)]
        src = keys.transpose(1, 2).reshape(P, C, h, w)
        up = self._upscale(src)  # (P, C/8, 4h, 4w)
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in idx], dim=1)  # (P, M, C/8)
        masks = (hyper @ up.flatten(2)).reshape(P, len(idx), 4 * h, 4 * w)
        iou = dec.iou_prediction_head(queries[:, 0])[:, idx]
        return masks, iou


def export_onnx(
    model: nn.Module,
    path,
    multimask_output: bool = True,
    opset: int = 17,
    dynamo: bool = False,
) -> Path:
    """Write the prompt side of `model` as ONNX (see the module docstring); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    wrapper = PromptDecoder(model, multimask_output).eval()
    C = model.prompt_encoder.embed_dim
    g = model.image_size // 16
    emb = torch.randn(1, C, g, g)
    coords = torch.rand(3, 2, 2) * model.image_size
    labels = torch.tensor([[1.0, 0.0], [1.0, -1.0], [1.0, 1.0]])
    names_in = ["image_embeddings", "point_coords", "point_labels"]
    names_out = ["low_res_masks", "iou_predictions"]
    with torch.no_grad():
        if dynamo:
            P, K = torch.export.Dim("num_prompts", min=1), torch.export.Dim("num_points", min=1)
            prog = torch.onnx.export(
                wrapper, (emb, coords, labels), input_names=names_in, output_names=names_out, dynamo=True,
                dynamic_shapes={"image_embeddings": None, "point_coords": {0: P, 1: K}, "point_labels": {0: P, 1: K}},
                opset_version=max(opset, 18),
            )
            prog.save(str(path), external_data=False)
        else:
            torch.onnx.export(
                wrapper, (emb, coords, labels), str(path), input_names=names_in, output_names=names_out,
                dynamic_axes={"point_coords": {0: "num_prompts", 1: "num_points"},
                              "point_labels": {0: "num_prompts", 1: "num_points"},
                              "low_res_masks": {0: "num_prompts"}, "iou_predictions": {0: "num_prompts"}},
                opset_version=opset, dynamo=False, do_constant_folding=True,
            )
    return path


def check_onnx(model: nn.Module, path, multimask_output: bool = True, num_prompts: int = 5, num_points: int = 3,
               seed: int = 0) -> Tuple[float, float]:
    """Run the ONNX file with onnxruntime and the PyTorch model on random inputs: max abs errors."""
    import numpy as np
    import onnxruntime as ort

    g = torch.Generator().manual_seed(seed)
    C = model.prompt_encoder.embed_dim
    grid = model.image_size // 16
    emb = torch.randn(1, C, grid, grid, generator=g)
    coords = torch.rand(num_prompts, num_points, 2, generator=g) * model.image_size
    labels = torch.randint(-1, 2, (num_prompts, num_points), generator=g).float()
    labels[:, 0] = 1.0
    with torch.no_grad():
        ref = model.decode(emb, coords[None], labels[None].long(), multimask_output=multimask_output)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    masks, iou = sess.run(None, {"image_embeddings": emb.numpy(), "point_coords": coords.numpy(),
                                 "point_labels": labels.numpy()})
    return (float(np.abs(masks - ref.masks[0].numpy()).max()), float(np.abs(iou - ref.iou_pred[0].numpy()).max()))


# -- command line -------------------------------------------------------------------------------------
def run(cfg, overrides: Optional[Sequence[str]] = None) -> Path:
    """Export `cfg.checkpoint` as `cfg.format`; `overrides`: what was typed (default: this process's
    Hydra command line)."""
    from mobilesam_se.models.build import OFFICIAL_IMAGE_SIZE, build_from_checkpoint
    from mobilesam_se.models.checkpoint import export_official
    from mobilesam_se.overrides import command_line_overrides, typed_model_keys
    from mobilesam_se.weights import resolve

    if not cfg.checkpoint:
        raise ValueError("checkpoint=<file> is required (mobile_sam.pt, best.pt or last.ckpt)")
    if not cfg.out:
        raise ValueError("out=<file> is required")
    ckpt = Path(resolve(cfg.checkpoint, cfg.paths.weights_dir))  # a file, or a name such as mobile_sam
    fmt = str(cfg.format)
    if fmt not in ("mobile_sam", "onnx"):
        raise ValueError(f"format must be mobile_sam or onnx, got {fmt!r}")
    overrides = command_line_overrides() if overrides is None else list(overrides)
    model = build_from_checkpoint(ckpt, cfg, typed_model_keys(overrides)).eval()
    out = Path(cfg.out)
    if fmt == "mobile_sam":
        if cfg.model.size != "mobilesam" or int(cfg.model.image_size) != OFFICIAL_IMAGE_SIZE:
            print(f"note: the official code builds the full model at {OFFICIAL_IMAGE_SIZE} px; this file "
                  f"(model.size={cfg.model.size}, {cfg.model.image_size} px) loads there only if it matches; "
                  "mobilesam_se reads its .model.yaml", file=sys.stderr)
        if not bool(cfg.model.multimask_output):
            # The official SamAutomaticMaskGenerator always decodes tokens 1-3, which this model never trained.
            print("note: this model was trained with model.multimask_output=false (mask token 0 only); the "
                  "official SamAutomaticMaskGenerator always decodes tokens 1-3 and will return poor or no "
                  "masks. Use SamPredictor.predict(..., multimask_output=False), or "
                  "`python -m mobilesam_se.segment`, which reads the model description beside the file",
                  file=sys.stderr)
        export_official(model, out, cfg.model)
        print(f"wrote {out} (official MobileSAM layout) and its model description")
        return out
    multimask = bool(cfg.model.multimask_output)
    o = cfg.onnx
    export_onnx(model, out, multimask_output=multimask, opset=int(o.opset), dynamo=bool(o.dynamo))
    print(f"wrote {out} (prompt encoder + mask decoder, multimask={multimask})")
    if o.check:
        dm, di = check_onnx(model, out, multimask_output=multimask)
        print(f"onnxruntime vs PyTorch: max |masks| diff {dm:.2e}, max |iou| diff {di:.2e}")
        if dm > 1e-2 or di > 1e-3:  # fp32 reassociation gives ~1e-6; anything near these is a real mismatch
            raise RuntimeError(f"ONNX output differs from PyTorch (masks {dm:.2e}, iou {di:.2e})")
    return out


def _main() -> None:
    import hydra

    from mobilesam_se.errors import report_user_errors

    @hydra.main(config_path="../conf", config_name="export", version_base="1.3")
    @report_user_errors(extra=(FileNotFoundError, ValueError))
    def main(cfg) -> None:
        run(cfg)

    main()


if __name__ == "__main__":
    import sys

    from mobilesam_se.config import check_moved_keys

    check_moved_keys(sys.argv[1:])  # an old key name: its new name, not just "unknown key"
    _main()
