"""Every config option composes and instantiates; typos and wrong types fail at compose time."""
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from helpers.hydra_utils import CONF, compose_cfg
from mobilesam_se.losses.everything import EverythingLoss


def group_options(group: str):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_default_config_composes_and_builds(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(tmp_path))
    cfg = compose_cfg(["dataset.train.num_images=2", "dataset.val.num_images=1"])
    assert cfg.model.size == "small" and cfg.dataset.name == "synthetic"
    model = instantiate(cfg.model.net)
    assert model.image_size == cfg.model.image_size
    loss = instantiate(cfg.loss)
    assert isinstance(loss, EverythingLoss) and loss.weights["focal"] == cfg.loss.w_focal
    assert loss.fg_iou == cfg.matching.fg_iou
    ds = instantiate(cfg.dataset.train)
    assert len(ds) == 2 and ds[0].points.shape == (cfg.dataset.grid_points ** 2, 2)
    logger = instantiate(cfg.logger)
    assert logger.project == "mobilesam-se"


@pytest.mark.parametrize("option", group_options("model"))
def test_model_options(option):
    cfg = compose_cfg([f"model={option}", "model.image_size=256"])
    model = instantiate(cfg.model.net)
    with torch.no_grad():
        emb = model.encode(torch.zeros(1, 3, 256, 256))
    assert emb.shape[-1] == 16


@pytest.mark.parametrize("group", ["loss", "freeze", "trainer", "visual", "matching", "distillation", "logger"])
def test_other_group_options(group):
    for option in group_options(group):
        cfg = compose_cfg([f"{group}={option}"])
        if group == "loss":
            assert isinstance(instantiate(cfg.loss), EverythingLoss)
        if group == "logger" and cfg.logger is not None:
            instantiate(cfg.logger)
        if group == "freeze":
            assert isinstance(cfg.freeze.image_encoder, bool)


@pytest.mark.parametrize("option", group_options("dataset"))
def test_dataset_options_compose(option):
    required = {
        "folder": ["dataset.root=/data/x"],
        "sa1b": ["dataset.root=/data/x"],
        "coco": ["dataset.image_dir=/data/x", "dataset.annotation_file=/data/x.json"],
    }.get(option, [])
    cfg = compose_cfg([f"dataset={option}", *required])
    assert cfg.dataset.train._target_.startswith("mobilesam_se.data.")
    assert cfg.dataset.train.image_size == cfg.model.image_size


def test_coco_sample_dataset_instantiates(monkeypatch):
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_sample"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    monkeypatch.setenv("MOBILESAM_SE_COCO_SAMPLE", str(root))
    cfg = compose_cfg(["dataset=coco_sample", "model.image_size=256"])
    train, val = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert len(train) + len(val) == 8 and train[0].num_masks > 0 and val[0].num_masks > 0


def test_experiment_seed_everything():
    cfg = compose_cfg(["experiment=seed_everything"])
    assert cfg.model.size == "full" and cfg.model.image_size == 1024 and cfg.dataset.grid_points == 32
    assert cfg.model.multimask_output is True
    assert (cfg.loss.w_bce, cfg.loss.w_focal, cfg.loss.w_dice, cfg.loss.w_iou, cfg.loss.w_cls) == (1, 15, 1, 1, 1)
    assert cfg.trainer.lr == 1e-5 and cfg.trainer.warmup_steps == 250 and cfg.trainer.max_epochs == 300
    assert cfg.trainer.early_stop_patience == 20 and cfg.trainer.precision == "bf16"
    assert not any(cfg.freeze[p] for p in ("image_encoder", "prompt_encoder", "mask_decoder"))
    assert cfg.matching.fg_iou == 0.5 and cfg.matching.point_credit == 0 and not cfg.matching.point_fg
    # the default (from-scratch) run bootstraps with the point credit instead
    default = compose_cfg([])
    assert default.matching.point_credit > 0 and default.matching.point_fg


def test_mistyped_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["trainer.max_epoch=3"])
    assert "max_epoch" in str(e.value.__cause__ or e.value)


def test_wrong_type_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(["trainer.max_epochs=many"])
    assert "max_epochs" in str(e.value.__cause__ or e.value)


def test_logger_none_disables_wandb():
    assert compose_cfg(["logger=none"]).logger is None


# The YAML is the one source of defaults: a key a group's YAML sets has no second default in the schema.
SCHEMA_GROUPS = {"model": "ModelConfig", "trainer": "TrainerConfig", "loss": "LossConfig", "visual": "VisualConfig", "freeze": "FreezeConfig",
                 "matching": "MatchingConfig", "logger": "LoggerConfig"}


@pytest.mark.parametrize("group", sorted(SCHEMA_GROUPS))
def test_group_yaml_is_the_one_source_of_its_defaults(group):
    import dataclasses

    import yaml
    from omegaconf import MISSING

    from mobilesam_se import config as schema

    fields = {f.name: f for f in dataclasses.fields(getattr(schema, SCHEMA_GROUPS[group]))}
    files = sorted((CONF / group).glob("*.yaml"))
    assert files
    doubled = []
    for path in files:
        for key in (yaml.safe_load(path.read_text()) or {}):
            f = fields.get(key)
            if f is not None and f.default is not MISSING and f.default != MISSING:
                doubled.append(f"{path.name}: {key} (schema default {f.default!r})")
    assert not doubled, f"conf/{group} sets keys that mobilesam_se/config.py also defaults: {doubled}"


def test_loss_group_carries_its_target_and_reads_the_matching_rule():
    cfg = compose_cfg(["matching=bootstrap"])
    assert cfg.loss._target_ == "mobilesam_se.losses.everything.EverythingLoss"
    assert cfg.trainer._target_ == "mobilesam_se.engine.trainer.Trainer"
    assert (cfg.loss.point_credit, cfg.loss.point_fg) == (cfg.matching.point_credit, cfg.matching.point_fg) == (1.0, True)
