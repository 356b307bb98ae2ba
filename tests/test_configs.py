"""Every config option composes and instantiates; typos and wrong types fail at compose time."""
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from helpers.hydra_utils import CONF, compose_cfg
from mobilesam_se.losses.everything import EverythingLoss
from mobilesam_se.prompted.step import PromptedLoss


def group_options(group: str):
    """The options a user selects (group=<option>); sub-folders (conf/dataset/shared) are merged parts."""
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


@pytest.mark.parametrize("group", ["loss", "freeze", "trainer", "visual", "matching", "distillation", "logger", "prompted",
                                   "paths", "debug"])
def test_other_group_options(group):
    for option in group_options(group):
        cfg = compose_cfg([f"{group}={option}"])
        if group == "loss":
            assert isinstance(instantiate(cfg.loss), EverythingLoss)
        if group == "prompted":
            assert isinstance(instantiate(cfg.prompted, mode="single"), PromptedLoss)
        if group == "paths":
            assert all(k in cfg.paths for k in ("data_dir", "weights_dir", "cache_dir"))
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
    cfg = compose_cfg([f"dataset={option}", *required, "model.image_size=320", "dataset.grid_points=5",
                       "dataset.max_masks_per_image=7", "dataset.on_error=skip"])
    for split in ("train", "val"):  # conf/dataset/shared/split.yaml, merged into both
        node = cfg.dataset[split]
        assert node._target_.startswith("mobilesam_se.data."), split
        assert (node.image_size, node.grid_points, node.max_masks_per_image, node.on_error) == (320, 5, 7, "skip"), split
    assert cfg.dataset.val.keep_original and "keep_original" not in cfg.dataset.train
    assert cfg.dataset.batch_size >= 1 and cfg.dataset.val_is_train is False  # conf/dataset/shared/dataset.yaml


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
    assert cfg.model.size == "mobilesam" and cfg.model.image_size == 1024 and cfg.dataset.grid_points == 32
    assert cfg.model.multimask_output is True
    assert (cfg.loss.w_bce, cfg.loss.w_focal, cfg.loss.w_dice, cfg.loss.w_iou, cfg.loss.w_cls) == (1, 15, 1, 1, 1)
    assert cfg.trainer.lr == 1e-5 and cfg.trainer.warmup_steps == 250 and cfg.trainer.max_epochs == 300
    assert cfg.trainer.early_stop_patience == 20 and cfg.trainer.precision == "bf16"
    # the recipe's AdamW, whatever the from-scratch default's betas are
    assert list(cfg.trainer.betas) == [0.9, 0.999]
    assert not any(cfg.freeze[p] for p in ("image_encoder", "prompt_encoder", "mask_decoder"))
    assert cfg.matching.fg_iou == 0.5 and cfg.matching.point_credit == 0 and not cfg.matching.point_fg
    # the default (from-scratch) run bootstraps with the point credit instead
    default = compose_cfg([])
    assert default.matching.point_credit > 0 and default.matching.point_fg
    assert list(default.trainer.betas) != list(cfg.trainer.betas)  # the from-scratch default is not the recipe's AdamW


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
                 "matching": "MatchingConfig", "logger": "LoggerConfig", "dataset": "DatasetConfig", "prompted": "PromptedConfig",
                 "paths": "PathsConfig"}


def group_keys(group: str, path: Path) -> dict:
    """The keys a group file sets for its group: at the top, or under the group's name in a
    `# @package _global_` file (matching/bootstrap.yaml)."""
    import yaml

    text = path.read_text()
    data = yaml.safe_load(text) or {}
    if text.startswith("# @package _global_"):
        return data.get(group) or {}
    return {k: v for k, v in data.items() if k != "defaults"}


@pytest.mark.parametrize("group", sorted(SCHEMA_GROUPS))
def test_group_yaml_is_the_one_source_of_its_defaults(group):
    import dataclasses

    from omegaconf import MISSING

    from mobilesam_se import config as schema

    fields = {f.name: f for f in dataclasses.fields(getattr(schema, SCHEMA_GROUPS[group]))}
    files = sorted((CONF / group).rglob("*.yaml"))  # with conf/dataset/shared/*
    assert files
    doubled = []
    set_anywhere = set()
    for path in files:
        keys = group_keys(group, path)
        set_anywhere |= set(keys)
        for key in keys:
            f = fields.get(key)
            if f is not None and f.default is not MISSING and f.default != MISSING:
                doubled.append(f"{path.name}: {key} (schema default {f.default!r})")
    assert not doubled, f"conf/{group} sets keys that mobilesam_se/config.py also defaults: {doubled}"
    if group in ("dataset", "prompted", "paths"):  # every key of these schemas comes from their YAML
        assert set(fields) <= set_anywhere, sorted(set(fields) - set_anywhere)


def test_loss_group_carries_its_target_and_reads_the_matching_rule():
    cfg = compose_cfg(["matching=bootstrap"])
    assert cfg.loss._target_ == "mobilesam_se.losses.everything.EverythingLoss"
    assert cfg.trainer._target_ == "mobilesam_se.engine.trainer.Trainer"
    assert (cfg.loss.point_credit, cfg.loss.point_fg) == (cfg.matching.point_credit, cfg.matching.point_fg) == (1.0, True)


def test_prompted_group_builds_the_prompted_loss_of_its_mode():
    cfg = compose_cfg(["prompted.mode=mixed", "prompted.mixed_weight=0.5", "prompted.objects_per_image=3",
                       "prompted.w_focal=7", "loss.focal_alpha=0.4", "model.multimask_output=false"])
    loss = instantiate(cfg.prompted)
    assert loss.weight == 0.5 and loss.sampling.max_objects == 3 and loss.multimask_output is False
    assert (loss.weights.focal, loss.weights.focal_alpha) == (7, 0.4)  # the focal shape: the everything loss's
    assert instantiate(cfg.prompted, mode="single").weight == 1.0
    with pytest.raises(Exception, match="prompted.mode single|mixed"):
        instantiate(compose_cfg([]).prompted)  # everything mode builds no prompted loss


def test_point_supervision_is_a_loss_option_that_the_bootstrap_rule_turns_on():
    assert compose_cfg(["matching=bootstrap"]).loss.point_supervision is True
    assert compose_cfg(["matching=default"]).loss.point_supervision is False
    assert compose_cfg(["experiment=seed_everything"]).loss.point_supervision is False
    assert compose_cfg(["matching=bootstrap", "loss.point_supervision=false"]).loss.point_supervision is False
    assert "point_supervision" not in compose_cfg([]).matching


def test_paths_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("MOBILESAM_SE_WEIGHTS", str(tmp_path / "w"))
    monkeypatch.delenv("MOBILESAM_SE_CACHE", raising=False)
    cfg = compose_cfg([])
    assert cfg.dataset.val.root == f"{tmp_path}/d/synthetic"
    assert cfg.paths.weights_dir == str(tmp_path / "w") and cfg.paths.cache_dir is None
    monkeypatch.delenv("MOBILESAM_SE_DATA")
    assert compose_cfg([]).paths.data_dir == "~/.cache/mobilesam_se"  # SyntheticDataset expands ~


def test_debug_preset_is_the_tiny_run_and_the_command_line_wins():
    cfg = compose_cfg(["debug=default", "experiment=finetune_standin", "trainer.max_epochs=1"])
    assert cfg.model.size == "tiny" and cfg.logger is None and cfg.dataset.train.num_images == 4
    assert cfg.trainer.val_every == 1  # over the experiment's 5
    assert cfg.trainer.max_epochs == 1 and not cfg.trainer.tune_amg


@pytest.mark.parametrize("old, new", [("dataset.mode", "prompted.mode"), ("dataset.prompted_w_dice", "prompted.w_dice"),
                                      ("matching.point_supervision", "loss.point_supervision"),
                                      ("weights_dir", "paths.weights_dir")])
def test_a_moved_key_names_its_new_name(old, new):
    from mobilesam_se.config import check_moved_keys

    with pytest.raises(ConfigCompositionException):
        compose_cfg([f"{old}=1"])  # Hydra alone: an unknown key
    with pytest.raises(SystemExit, match=f"{old} is now {new}"):
        check_moved_keys(["model=tiny", f"{old}=1"])
    check_moved_keys(["model=tiny", f"{new}=1"])


def test_run_py_names_the_new_key():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "run.py", "dataset.mode=single"], cwd=CONF.parent, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "dataset.mode is now prompted.mode (prompted.mode=single)" in proc.stderr


def test_experiment_long_doubles_the_default_schedule_and_nothing_else():
    default, long = compose_cfg([]), compose_cfg(["experiment=long"])
    assert long.trainer.max_epochs == 2 * default.trainer.max_epochs
    assert long.trainer.val_every == long.trainer.coco_eval_every == default.trainer.max_epochs
    assert long.task_name == "train_long"
    changed = {k for k in default.trainer if default.trainer[k] != long.trainer[k]}
    assert changed == {"max_epochs", "val_every", "coco_eval_every"}
    for group in ("model", "dataset", "loss", "matching", "freeze"):
        assert long[group] == default[group], group
