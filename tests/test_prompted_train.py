"""End to end: compose the Hydra config with prompted.mode single / mixed, train one epoch, validate."""
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mobilesam_se.assembly import build_run, register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"
PROMPTED_KEYS = [f"{n}_miou_{r}" for n in ("point", "box", "click1", "click3", "click5") for r in ("oracle", "pred")]


def compose_run(overrides):
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


@pytest.mark.parametrize("mode", ["single", "mixed"])
def test_prompted_training_end_to_end(mode, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(data_dir))  # both modes share one generated dataset
    cfg = compose_run([
        f"prompted.mode={mode}", "logger=none", "model=tiny",
        "dataset.train.num_images=4", "dataset.val.num_images=2", "trainer.max_epochs=1",
        "dataset.grid_points=4", "dataset.batch_size=2", "dataset.val_batch_size=2", "prompted.objects_per_image=4",
        "prompted.negative_points=1", "prompted.mixed_weight=0.5", "trainer.val_every=1", "trainer.warmup_steps=1",
        "trainer.progress=false", "trainer.log_every=1", "trainer.device=cpu", "visual.num_images=0",
        # single mode evaluates both val images; mixed only one, to keep the test short
        f"dataset.val_max_images={2 if mode == 'single' else 1}",
    ])
    trainer, cleanup = build_run(cfg, out_dir=tmp_path)
    try:
        result = trainer.fit()
    finally:
        cleanup()
    assert result["step"] == 2
    record = result["history"][-1]
    assert math.isfinite(record["train/loss"]) and record["train/loss"] > 0
    for key in ("focal", "dice", "iou"):
        assert math.isfinite(record[f"train/prompted/{key}"])
    assert record["train/prompted/num_objects"] > 0
    # everything-mode terms are there in mixed mode only
    assert ("train/num_gt" in record) == (mode == "mixed")
    for key in PROMPTED_KEYS:
        assert 0.0 <= record[f"val/prompted/{key}"] <= 1.0
    assert record["val/prompted/num_objects"] > 0
    assert "val/dice" in record  # the everything metrics are still logged beside
    log = (tmp_path / "checkpoints" / "training_log.txt").read_text()
    assert "val/prompted/click5_miou_pred=" in log


def test_prompted_eval_flag_in_everything_mode(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(data_dir))
    base = ["logger=none", "model=tiny", "dataset.train.num_images=4", "dataset.val.num_images=2",
            "dataset.grid_points=4", "dataset.batch_size=2", "dataset.val_batch_size=2", "trainer.progress=false",
            "trainer.device=cpu", "visual.num_images=0", "dataset.val_max_images=1"]
    assert compose_run(base).trainer.prompted_eval is False
    cfg = compose_run(base + ["trainer.prompted_eval=true"])
    trainer, cleanup = build_run(cfg, out_dir=tmp_path)
    try:
        assert trainer.objective.prompted is None  # everything mode trains as before
        metrics, _ = trainer._validate(0)
    finally:
        cleanup()
    assert "dice" in metrics and all(f"prompted/{k}" in metrics for k in PROMPTED_KEYS)
