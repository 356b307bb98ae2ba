"""Segment everything in an image or a folder of images.

    python -m mobilesam_se.segment checkpoint=<mobile_sam.pt|best.pt|last.ckpt> input=<image|folder> output=<dir> \
        [generator.points_per_side=32] [device=cpu|cuda|auto]

For every image writes `<output>/<stem>.json` in SA-1B's per-image format ({"image": {image_id,
width, height, file_name}, "annotations": [{id, segmentation (COCO RLE, counts as str), area,
bbox (XYWH), predicted_iou, stability_score, point_coords, crop_box}]}) and `<output>/<stem>.png`,
the masks overlaid on the image. Relative paths are taken from the current directory (the config
keeps Hydra from changing it or writing its own files). The model is the one the checkpoint
describes (`models.build.build_from_checkpoint`). Config: conf/segment.yaml.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mobilesam_se.config import ModelConfig, PathsConfig

log = logging.getLogger("segment")


@dataclass
class SegmentConfig:
    """Types of conf/segment.yaml, which holds the defaults."""

    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: Optional[str] = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)  # paths.weights_dir: where names download
    input: Optional[str] = MISSING
    output: Optional[str] = MISSING
    device: str = MISSING
    recursive: bool = MISSING
    overlay: bool = MISSING
    progress: bool = MISSING
    image_batch: int = MISSING
    generator: Any = MISSING  # EverythingGenerator keywords, plus `tuned`


ConfigStore.instance().store(name="segment_schema", node=SegmentConfig)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def find_images(path: Path, recursive: bool = False) -> List[Path]:
    """The image files of `path` (a file, or a folder's images sorted by name)."""
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if path.is_file():
        return [path]
    pattern = "**/*" if recursive else "*"
    files = sorted(p for p in path.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return files


def output_stems(files: List[Path], root: Path) -> Dict[Path, str]:
    """File -> output stem: the file's stem, or its relative path with '_' when stems collide."""
    stems = [f.stem for f in files]
    out = {}
    for f, s in zip(files, stems):
        if stems.count(s) > 1:
            rel = f.relative_to(root) if root.is_dir() else Path(f.name)
            s = "_".join(rel.with_suffix("").parts) + "_" + f.suffix.lower().lstrip(".")
        out[f] = s
    return out


def run(cfg, overrides: Optional[Sequence[str]] = None) -> List[Path]:
    """Segment every input image; returns the JSON files written. `overrides`: what was typed
    (default: this process's Hydra command line), so typed values win over the checkpoint's files."""
    import torch
    from omegaconf import OmegaConf
    from tqdm import tqdm

    from mobilesam_se.data.image_io import load_image_rgb
    from mobilesam_se.inference.amg import EverythingGenerator
    from mobilesam_se.inference.outputs import sa1b_record, write_json, write_overlay
    from mobilesam_se.models.build import build_from_checkpoint
    from mobilesam_se.overrides import command_line_overrides, typed_keys, typed_model_keys

    for key in ("checkpoint", "input", "output"):
        if not cfg.get(key):
            raise ValueError(f"{key}=... is required: python -m mobilesam_se.segment checkpoint=<file> input=<image|folder> output=<dir>")
    from mobilesam_se.weights import resolve

    ckpt, src, out_dir = Path(resolve(cfg.checkpoint, cfg.paths.weights_dir)), Path(cfg.input), Path(cfg.output)
    files = find_images(src, bool(cfg.get("recursive", False)))
    overrides = command_line_overrides() if overrides is None else list(overrides)
    gen_kwargs = OmegaConf.to_container(cfg.generator, resolve=True)
    from mobilesam_se.inference.thresholds import apply_tuned

    # Thresholds tuned for this checkpoint (best.amg.yaml) unless generator.tuned=false; typed values win.
    gen_kwargs, tuned_file = apply_tuned(gen_kwargs, ckpt, bool(gen_kwargs.pop("tuned", True)),
                                         typed_keys("generator", overrides))
    if tuned_file is not None:
        log.info("AMG thresholds from %s: %s", tuned_file,
                 {k: gen_kwargs[k] for k in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")})
    if gen_kwargs.get("output_mode", "coco_rle") != "coco_rle":
        raise ValueError("generator.output_mode must be coco_rle (the JSON holds COCO RLEs)")
    from mobilesam_se.precision import resolve_device

    device = resolve_device(cfg.device)

    model = build_from_checkpoint(ckpt, cfg, typed_model_keys(overrides)).eval().to(device)
    # One mask per point from a model trained single-mask (its description); 3, as the reference, otherwise.
    generator = EverythingGenerator(model, multimask_output=bool(cfg.model.multimask_output), **gen_kwargs)

    out_dir.mkdir(parents=True, exist_ok=True)
    stems = output_stems(files, src)
    written = []
    # Images go through the encoder `image_batch` at a time (their whole-image crops; crop layers
    # are encoded per crop): on a GPU one batched encoder pass is cheaper than several.
    batch = max(1, int(cfg.get("image_batch", 1)))
    bar = tqdm(total=len(files), desc="segment", unit="img", disable=not cfg.get("progress", True))
    for start in range(0, len(files), batch):
        group = files[start : start + batch]
        images = [load_image_rgb(p) for p in group]
        if len(images) > 1 and generator.crop_n_layers == 0:
            results = generator.generate_batch(images)
        else:
            results = [generator.generate(im) for im in images]
        for offset, (path, image, records) in enumerate(zip(group, images, results)):
            stem = stems[path]
            name = str(path.relative_to(src)) if src.is_dir() else path.name
            write_json(sa1b_record(records, image.shape[:2], name, start + offset), out_dir / f"{stem}.json")
            if cfg.get("overlay", True):
                write_overlay(image, records, out_dir / f"{stem}.png")
            written.append(out_dir / f"{stem}.json")
        bar.update(len(group))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    return written


def _main() -> None:
    import hydra

    from mobilesam_se.errors import report_user_errors

    @hydra.main(config_path="../conf", config_name="segment", version_base="1.3")
    @report_user_errors(extra=(FileNotFoundError, ValueError))
    def main(cfg) -> None:
        files = run(cfg)
        print(f"wrote {len(files)} JSON file(s) and overlays to {cfg.output}")

    main()


if __name__ == "__main__":
    import sys

    from mobilesam_se.config import check_moved_keys

    check_moved_keys(sys.argv[1:])  # an old key name: its new name, not just "unknown key"
    _main()
