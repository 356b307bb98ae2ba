"""From a composed Hydra config to a ready Trainer: instantiate the parts, check the data, seed."""
from __future__ import annotations

import logging
import random
import secrets
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from mobilesam_se.config import register_configs

log = logging.getLogger(__name__)


def register_resolvers() -> None:
    """Schemas and resolvers, registered once per process before Hydra composes."""
    register_configs()
    if not OmegaConf.has_resolver("sweep_uid"):
        # One token per launching process: sweeps started in the same second differ. Jobs get the
        # launcher's value through Hydra's resolver cache (load_sweep_config copies it; submitit
        # pickles it with the config), so it is deliberately not passed on through the environment
        # (a parent that resolved once would hand the same token to every sweep it starts).
        token = secrets.token_hex(3)
        OmegaConf.register_new_resolver("sweep_uid", lambda: token, use_cache=True)
    if not OmegaConf.has_resolver("repo_root"):
        # The checkout's root, so configs can name files beside it whatever the working directory.
        OmegaConf.register_new_resolver("repo_root", lambda: str(Path(__file__).resolve().parents[1]))


def seed_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (seed_everything is the recipe's name,
    conf/experiment/seed_everything.yaml)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def output_dir(cfg: DictConfig) -> Path:
    if cfg.get("output_dir"):
        return Path(cfg.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


# A dataset group's validation keys and the training keys they fall back to.
VAL_FALLBACK = {"val_root": "root", "val_image_dir": "image_dir", "val_annotation_file": "annotation_file"}


def resolve_val_split(cfg: DictConfig) -> bool:
    """Fill unset validation paths (dataset.val_root, ...) with the training ones, loudly.

    Validating on the training data hides overfitting, so it is never silent: a warning at
    start-up, and `dataset.val_is_train: true` in the config (config_resolved.yaml, W&B). Setting
    the val keys to the training paths on purpose (dataset.val_root=${dataset.root}) gives no
    warning but is recorded the same way. Returns whether val is the training data.
    """
    def is_set(key: str) -> bool:
        return key in cfg.dataset and not OmegaConf.is_missing(cfg.dataset, key) and cfg.dataset[key] is not None

    keys = [k for k in VAL_FALLBACK if k in cfg.dataset and is_set(VAL_FALLBACK[k])]
    if not keys:
        return bool(cfg.dataset.get("val_is_train", False))
    unset = [k for k in keys if cfg.dataset[k] is None]
    with open_dict(cfg):
        for k in unset:
            cfg.dataset[k] = cfg.dataset[VAL_FALLBACK[k]]
        same = all(str(cfg.dataset[k]) == str(cfg.dataset[VAL_FALLBACK[k]]) for k in keys)
        cfg.dataset.val_is_train = same
    if unset:
        log.warning(
            "dataset=%s has no validation split (%s not set): validating on the TRAINING data, so val/* "
            "measure memorisation, not generalisation. Pass %s, or %s to do this on purpose.",
            cfg.dataset.get("name", "?"), ", ".join(f"dataset.{k}" for k in unset),
            " ".join(f"dataset.{k}=/path/to/val" for k in unset),
            " ".join(f"dataset.{k}=${{dataset.{VAL_FALLBACK[k]}}}" for k in unset),
        )
    return bool(cfg.dataset.val_is_train)


def check_can_learn(cfg: DictConfig) -> None:
    """The plain matching rule (IoU >= fg_iou, no point credit) has nothing to learn from in random
    weights: no candidate reaches IoU 0.5, so nothing is ever foreground. Refuse that start."""
    from mobilesam_se.errors import ConfigError
    m = cfg.matching
    plain = float(m.get("point_credit", 0.0)) == 0.0 and not m.get("point_fg", False)
    if plain and not cfg.model.get("checkpoint") and not m.get("allow_random_init", False):
        raise ConfigError(
            "matching=default (the plain IoU >= 0.5 rule, used by experiment=seed_everything) cannot learn "
            "from random weights: no candidate ever becomes foreground. Pass model.checkpoint=/path/to/mobile_sam.pt "
            "(or a best.pt of your own), use matching=bootstrap to train from scratch, or set "
            "matching.allow_random_init=true to start anyway."
        )


def _require_paths(cfg: DictConfig, split: str, node: DictConfig) -> None:
    """A dataset path left unset names the key the user sets (e.g. dataset.root), not a TypeError."""
    from mobilesam_se.errors import UserError

    raw = OmegaConf.to_container(node, resolve=False)
    for key in ("root", "image_dir", "annotation_file"):
        if key in node and node.get(key) is None:
            value = raw.get(key)
            src = value[2:-1] if isinstance(value, str) and value.startswith("${") else f"dataset.{split}.{key}"
            raise UserError(f"{src} is not set (dataset={cfg.dataset.name}): pass {src}=<path> on the command line")


def build_datasets(cfg: DictConfig, progress: bool = False):
    """Index both splits, then check every sample (cached per dataset version, see data/check.py).

    The datasets are indexed in skip mode so that the check sees every problem, the indexing ones
    and the decoding ones, and reports them together; with dataset.on_error=raise any problem then
    stops the run, with dataset.on_error=skip the bad samples are dropped and reported."""
    from mobilesam_se.data.check import check_dataset
    from mobilesam_se.data.errors import DatasetError

    resolve_val_split(cfg)
    sets = {}
    problems = []
    for name in ("train", "val"):
        node = cfg.dataset.get(name)
        if node is None:
            sets[name] = None
            continue
        _require_paths(cfg, name, node)
        ds = instantiate(node, on_error="skip")
        found = check_dataset(ds, progress=progress, cache_dir=cfg.paths.cache_dir)
        if found and cfg.dataset.on_error != "raise":
            log.warning("%s set: skipped %d bad sample(s); first: %s", name, len(found), found[0])
        problems += [p for p in found if p not in problems]  # val may be the train folder: each problem once
        ds.on_error = cfg.dataset.on_error
        sets[name] = ds
    if problems and cfg.dataset.on_error == "raise":
        raise DatasetError(problems)  # fix the data, or dataset.on_error=skip to train without them
    return sets["train"], sets["val"]


def resolve_checkpoints(cfg: DictConfig) -> list:
    """Config checks, then every checkpoint name -> a verified local file (one message for all
    missing ones). Runs before any image is decoded or model built. Returns the teacher specs."""
    import dataclasses as dc

    from mobilesam_se.weights import resolve_many

    specs = []
    if cfg.distillation.get("enabled", False):
        from mobilesam_se.distill import check_distillation

        specs = check_distillation(cfg)
    paths = resolve_many([cfg.model.get("checkpoint")] + [s.checkpoint for s in specs], cfg.paths.weights_dir)
    if cfg.model.get("checkpoint"):
        with open_dict(cfg):
            cfg.model.checkpoint = paths[0]
    return [dc.replace(s, checkpoint=p) for s, p in zip(specs, paths[1:])]


def sweep_labels(cfg: DictConfig) -> dict:
    """W&B group / run name of a multirun job, where the logger config leaves them null:
    group = "<task_name>-<sweep directory name>" (one per sweep), name = the job's overrides
    (hydra.job.override_dirname, e.g. "dataset.grid_points=16,loss.w_dice=0.5")."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return {}
    labels = {}
    if "group" in cfg.logger and cfg.logger.group is None:
        labels["group"] = f"{cfg.task_name}-{Path(str(hc.sweep.dir)).name}"
    if "name" in cfg.logger and cfg.logger.name is None:
        labels["name"] = hc.job.override_dirname or f"job{hc.job.num}"
    return labels


def build_objective(cfg: DictConfig, model, distiller=None):
    """The student, its everything-mode loss and (by `prompted.mode`) the prompted loss, with the
    distiller, as the one module the trainer optimises (and DDP wraps)."""
    from mobilesam_se.objective import SegmentEverythingObjective

    mode = cfg.prompted.mode
    prompted = instantiate(cfg.prompted) if mode in ("single", "mixed") else None
    m = cfg.model
    return SegmentEverythingObjective(
        model, instantiate(cfg.loss), mode=mode, prompted=prompted, distiller=distiller,
        multimask_output=m.multimask_output, points_per_batch=m.points_per_batch,
        prompts_per_step=cfg.dataset.prompts_per_step, prompt_sampling=cfg.dataset.prompt_sampling,
    )


def build_validator(cfg: DictConfig, val_set):
    from mobilesam_se.evaluation.validation import Validator

    if val_set is None:
        return None
    d, m = cfg.dataset, cfg.model
    return Validator(val_set, batch_size=d.val_batch_size, num_workers=d.num_workers, image_size=m.image_size,
                     multimask_output=m.multimask_output, points_per_batch=m.points_per_batch,
                     grid_points=d.grid_points, max_images=d.val_max_images)


def build_run(cfg: DictConfig, out_dir: Optional[Path] = None) -> Tuple[Any, Callable[[], None]]:
    """Instantiate model, objective, data, validator, logger and (optional) distiller, then the
    trainer from its group (its `_target_` with the group's settings, given the parts); return
    (trainer, cleanup)."""
    from mobilesam_se.engine.distributed import broadcast_object, cleanup, init_distributed
    from mobilesam_se.precision import resolve_device

    device = resolve_device(cfg.trainer.device, "trainer.device")
    dist_info = init_distributed(device.type)
    if not dist_info.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # logs from rank 0; warnings from every rank
    # Each rank's Hydra resolved its own ${now:...}: all use rank 0's directory.
    out_dir = Path(broadcast_object(str(out_dir or output_dir(cfg)), dist_info))
    # Cheap first: config and checkpoint files (widths, mode, downloads), then the data check, then
    # the heavy parts (student, teachers).
    check_can_learn(cfg)
    teacher_specs = resolve_checkpoints(cfg)
    train_set, val_set = build_datasets(cfg, progress=bool(cfg.trainer.get("progress", True)) and dist_info.is_main)
    seed_rngs(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    model = instantiate(cfg.model.net)
    logger = None
    if cfg.get("logger") is not None and dist_info.is_main:
        labels = sweep_labels(cfg)
        with open_dict(cfg):  # recorded in config_resolved.yaml / the W&B config
            for k, v in labels.items():
                cfg.logger[k] = v
        logger = instantiate(cfg.logger)
    distiller = None
    if cfg.distillation.get("enabled", False):
        from mobilesam_se.distill import build_distiller

        distiller = build_distiller(cfg, model_image_size=cfg.model.image_size, specs=teacher_specs,
                                    train_files=train_set.image_paths)
    objective = build_objective(cfg, model, distiller)
    # Hydra gives the trainer its own settings; the built parts go straight to the constructor
    # (instantiate would turn dataclass parts, e.g. DistInfo, into configs).
    make_trainer = instantiate(cfg.trainer, _partial_=True, _recursive_=False, _convert_="all")
    from_checkpoint = bool(cfg.model.get("checkpoint"))
    if from_checkpoint and cfg.trainer.get("low_res_fraction", 0):
        # A warm-up for random weights: a checkpoint is fine-tuned at the size it is used at.
        log.info("model.checkpoint given: trainer.low_res_fraction=%s ignored (every epoch at model.image_size=%s)",
                 cfg.trainer.low_res_fraction, cfg.model.image_size)
    trainer = make_trainer(
        objective=objective, train_set=train_set, val_set=val_set,
        validator=build_validator(cfg, val_set), out_dir=out_dir, logger=logger, dist=dist_info, run_config=cfg,
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
        seed=cfg.seed, batch_size=cfg.dataset.batch_size, num_workers=cfg.dataset.num_workers,
        freeze={**OmegaConf.to_container(cfg.freeze, resolve=True), "estimate_batchnorm_stats": not from_checkpoint},
        visual=OmegaConf.to_container(cfg.visual, resolve=True),
        **({"low_res_fraction": 0.0} if from_checkpoint else {}),
    )

    def _cleanup() -> None:
        if logger is not None:
            logger.finish()
        cleanup(dist_info)

    return trainer, _cleanup
