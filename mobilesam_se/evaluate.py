"""Evaluate a checkpoint at segmenting everything.

    python -m mobilesam_se.evaluate checkpoint=outputs/train/.../checkpoints/best.pt
    python -m mobilesam_se.evaluate checkpoint=mobile_sam.pt dataset=coco_sample     # the official model, at 1024
    python -m mobilesam_se.evaluate allow_random=true model=tiny max_images=2     # a demo, no weights

The model is the one the checkpoint describes (`models.build.build_from_checkpoint`), and the
dataset is read at its image size.

Prints a table and writes `metrics.json` and `calibration.png` to `output` (default: the Hydra
run directory): the recipe's Hungarian dice / IoU / recall and filtered precision (as in training
validation), class-agnostic COCO mask AP / AR@10/100/1000 of the raw candidates and of the stock
AMG output, and the calibration of the IoU head. See docs/evaluate.md.
"""

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

log = logging.getLogger("evaluate")


@dataclass
class GeneratorConfig:
    """`EverythingGenerator` options for the AMG-filtered evaluation; null: the generator's default."""

    enabled: bool = True
    tuned: bool = True  # use <checkpoint stem>.amg.yaml beside the checkpoint when present (python -m mobilesam_se.tune)
    points_per_side: Optional[int] = "${dataset.grid_points}"  # type: ignore[assignment]  # the same grid as (a)
    points_per_batch: Optional[int] = "${model.points_per_batch}"  # type: ignore[assignment]
    pred_iou_thresh: Optional[float] = 0.88
    stability_score_thresh: Optional[float] = 0.95
    extra: Dict[str, Any] = field(default_factory=dict)  # any other EverythingGenerator keyword


@dataclass
class CalibrationConfig:
    bins: int = 10
    survive: List[float] = field(default_factory=lambda: [0.88, 0.95])


@dataclass
class EvaluateConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    checkpoint: Optional[str] = None  # mobile_sam.pt, our best.pt or last.ckpt, or a name (mobile_sam)
    paths: PathsConfig = field(default_factory=PathsConfig)  # paths.weights_dir: where names download
    allow_random: bool = False  # evaluate a randomly initialised model (demos, tests)
    split: str = "val"  # val | train
    output: Optional[str] = None  # default: Hydra's run directory
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 | auto (bf16 on CUDA)
    batch_size: Optional[int] = None  # images per forward; default dataset.val_batch_size
    max_images: Optional[int] = None  # default dataset.val_max_images (all when null)
    all_gt: bool = True  # score against every gt object, ignoring dataset.max_masks_per_image
    max_dets: List[int] = field(default_factory=lambda: [10, 100, 1000])
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    progress: bool = True
    seed: int = 0
    task_name: str = "evaluate"


def register_evaluate_schema() -> None:
    register_resolvers()
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


register_evaluate_schema()


def generator_kwargs(gcfg: Any) -> Optional[Dict[str, Any]]:
    """EverythingGenerator keywords from the `generator` config, None when disabled."""
    g = OmegaConf.to_container(gcfg, resolve=True) if isinstance(gcfg, DictConfig) else dict(gcfg)
    if not g.pop("enabled", True):
        return None
    g.pop("tuned", None)
    extra = g.pop("extra", None) or {}
    g = {k: v for k, v in g.items() if v is not None}
    g.update(extra)
    return g


def run_evaluation(cfg: DictConfig, overrides: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Build the model and dataset from a composed `evaluate` config, evaluate, write the outputs.
    `overrides`: what was typed (default: this process's Hydra command line)."""
    from hydra.utils import instantiate

    from mobilesam_se.precision import resolve_autocast, resolve_device
    from mobilesam_se.evaluation.evaluator import evaluate_everything
    from mobilesam_se.models.build import build_from_checkpoint
    from mobilesam_se.overrides import command_line_overrides, typed_keys, typed_model_keys
    from mobilesam_se.assembly import seed_rngs
    from mobilesam_se.weights import resolve

    overrides = command_line_overrides() if overrides is None else list(overrides)

    checkpoint = cfg.checkpoint or cfg.model.get("checkpoint")
    if not checkpoint and not cfg.allow_random:
        raise UserError("checkpoint=<file or name> is required (mobile_sam, mobile_sam.pt, best.pt or last.ckpt); "
                        "allow_random=true evaluates a randomly initialised model")
    if cfg.split not in ("val", "train"):
        raise UserError(f"split must be val or train, got split={cfg.split}")
    from mobilesam_se.assembly import resolve_val_split

    val_is_train = resolve_val_split(cfg) if cfg.split == "val" else False
    ds_cfg = cfg.dataset.get(cfg.split)
    if ds_cfg is None:
        raise UserError(f"dataset {cfg.dataset.name} has no {cfg.split} split (set split=train or another dataset=)")
    checkpoint = resolve(checkpoint, cfg.paths.weights_dir) if checkpoint else None

    seed_rngs(cfg.seed)
    device = resolve_device(cfg.device)
    # Before the dataset: it is read at the image size of the model the checkpoint describes.
    model = build_from_checkpoint(checkpoint, cfg, typed_model_keys(overrides))
    model.to(device).eval()
    # The AMG needs the original pixels; the gt is every object unless all_gt=false (the cap is a training aid).
    dataset_kwargs: Dict[str, Any] = {"keep_original": True}
    if cfg.all_gt:
        dataset_kwargs["max_masks_per_image"] = None
    dataset = instantiate(ds_cfg, **dataset_kwargs)
    if len(dataset) == 0:
        raise UserError(f"the {cfg.split} split of dataset {cfg.dataset.name} is empty")

    if cfg.output:
        out_dir = Path(cfg.output)
    else:
        from hydra.core.hydra_config import HydraConfig

        out_dir = Path(HydraConfig.get().runtime.output_dir)
    max_images = cfg.max_images if cfg.max_images is not None else cfg.dataset.get("val_max_images")
    info = {
        "checkpoint": str(checkpoint) if checkpoint else None,
        "dataset": cfg.dataset.name,
        "split": cfg.split,
        "val_is_train": val_is_train,
        "model": cfg.model.name,
        "device": str(device),
    }
    gen_kwargs = generator_kwargs(cfg.generator)
    if gen_kwargs is not None:
        from mobilesam_se.inference.thresholds import apply_tuned

        gen_kwargs, tuned_file = apply_tuned(gen_kwargs, checkpoint, bool(cfg.generator.get("tuned", True)),
                                             typed_keys("generator", overrides))
        info["amg_thresholds"] = f"tuned ({tuned_file.name})" if tuned_file else "stock"
        info["amg_params"] = {k: gen_kwargs.get(k) for k in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh")}
    report = evaluate_everything(
        model, dataset, device,
        multimask_output=cfg.model.multimask_output,
        points_per_batch=cfg.model.points_per_batch,
        batch_size=cfg.batch_size or cfg.dataset.val_batch_size,
        num_workers=cfg.dataset.num_workers,
        autocast_dtype=resolve_autocast(cfg.precision, device),
        max_images=max_images,
        generator=gen_kwargs,
        calibration_bins=cfg.calibration.bins,
        survive=list(cfg.calibration.survive),
        max_dets=list(cfg.max_dets),
        progress=cfg.progress,
        info=info,
    )
    path = report.save(out_dir)
    print(report.table(), flush=True)
    log.info("wrote %s and %s", path, out_dir / "calibration.png")
    return report.to_json()


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
@report_user_errors(extra=(FileNotFoundError,))
def main(cfg: DictConfig) -> Dict[str, Any]:
    return run_evaluation(cfg)


if __name__ == "__main__":
    import sys

    from mobilesam_se.config import check_moved_keys

    check_moved_keys(sys.argv[1:])  # an old key name: its new name, not just "unknown key"
    main()
