"""Tune the AMG thresholds for a checkpoint on a val split, and store them beside it.

    python -m mobilesam_se.tune checkpoint=outputs/train/<run>/checkpoints/best.pt
    python -m mobilesam_se.tune checkpoint=best.pt dataset=folder dataset.root=... dataset.val_root=/data/val

Searches pred_iou_thresh x stability_score_thresh x box_nms_thresh (conf/tune.yaml `grid`) for the
best COCO AR@100 of the AMG output (or F1 at IoU 0.5: objective=f1), prints stock against tuned,
and writes `<checkpoint stem>.amg.yaml` (best.pt -> best.amg.yaml), which `segment` and `evaluate`
then use; `generator.tuned=false` there gives the stock values. The model is the one the checkpoint
describes (`models.build.build_from_checkpoint`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from mobilesam_se.config import DatasetConfig, ModelConfig, PathsConfig
from mobilesam_se.errors import UserError, report_user_errors
from mobilesam_se.assembly import register_resolvers

log = logging.getLogger("tune")


@dataclass
class TuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    checkpoint: Optional[str] = None  # required: mobile_sam.pt, best.pt or last.ckpt, or a name (mobile_sam)
    paths: PathsConfig = field(default_factory=PathsConfig)  # paths.weights_dir: where names download
    split: str = "val"
    device: str = "auto"
    max_images: Optional[int] = None  # default: every image of the split
    objective: str = "AR_100"  # AR_100 | f1
    search: str = "coordinate"  # coordinate (ascent from the stock values) | grid (every combination)
    grid: Dict[str, List[float]] = field(default_factory=dict)
    write: bool = True  # write <stem>.amg.yaml beside the checkpoint
    progress: bool = True
    seed: int = 0
    task_name: str = "tune"


ConfigStore.instance().store(name="tune_schema", node=TuneConfig)


def resolve_checkpoint(cfg: DictConfig) -> Path:
    """The checkpoint file: `checkpoint` itself, or the cached official file of a name (mobile_sam)."""
    from mobilesam_se.weights import resolve

    return Path(resolve(cfg.checkpoint, cfg.paths.weights_dir))


def load_for_tuning(cfg: DictConfig, overrides: Optional[Sequence[str]] = None):
    """(model, dataset) of a tune / evaluate style config; `overrides`: what was typed (default: this
    process's Hydra command line)."""
    from hydra.utils import instantiate

    from mobilesam_se.models.build import build_from_checkpoint
    from mobilesam_se.overrides import command_line_overrides, typed_model_keys
    from mobilesam_se.assembly import resolve_val_split, seed_rngs

    if not cfg.checkpoint:
        raise UserError("checkpoint=<file or name> is required (mobile_sam, mobile_sam.pt, best.pt or last.ckpt)")
    if cfg.split == "val":
        resolve_val_split(cfg)
    ds_cfg = cfg.dataset.get(cfg.split)
    if ds_cfg is None:
        raise UserError(f"dataset {cfg.dataset.name} has no {cfg.split} split")
    seed_rngs(cfg.seed)
    overrides = command_line_overrides() if overrides is None else list(overrides)
    # Before the dataset: it is read at the image size of the model the checkpoint describes.
    model = build_from_checkpoint(resolve_checkpoint(cfg), cfg, typed_model_keys(overrides))
    dataset = instantiate(ds_cfg, max_masks_per_image=None)  # every object counts
    return model, dataset


def run_tune(cfg: DictConfig, overrides: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    from mobilesam_se.precision import resolve_device
    from mobilesam_se.evaluation.tuning import tune_amg_thresholds
    from mobilesam_se.inference.thresholds import write_tuned

    model, dataset = load_for_tuning(cfg, overrides)
    result = tune_amg_thresholds(
        model, dataset, resolve_device(cfg.device), multimask_output=cfg.model.multimask_output,
        points_per_batch=cfg.model.points_per_batch, grid=OmegaConf.to_container(cfg.grid, resolve=True) or None,
        objective=cfg.objective, search=cfg.search, max_images=cfg.max_images, progress=cfg.progress,
    )
    print(result.summary(), flush=True)
    out: Dict[str, Any] = {"thresholds": result.best, "stock": result.stock, "tuned": result.tuned}
    if cfg.write:
        info = {"objective": cfg.objective, "dataset": cfg.dataset.name, "split": cfg.split,
                "num_images": result.num_images, "stock": result.stock, "tuned": result.tuned}
        path = write_tuned(resolve_checkpoint(cfg), result.best, info)
        print(f"wrote {path}", flush=True)
        out["path"] = str(path)
    return out


@hydra.main(config_path="../conf", config_name="tune", version_base="1.3")
@report_user_errors(extra=(FileNotFoundError,))
def main(cfg: DictConfig) -> Dict[str, Any]:
    return run_tune(cfg)


register_resolvers()

if __name__ == "__main__":
    import sys

    from mobilesam_se.config import check_moved_keys

    check_moved_keys(sys.argv[1:])  # an old key name: its new name, not just "unknown key"
    main()
