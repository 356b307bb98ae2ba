"""Start-up checks of a training run: a plain-rule start from random weights is refused, and a
dataset without a validation split validates on the training data only with a warning and a record."""
import logging
from pathlib import Path

import numpy as np
import pytest

from helpers.hydra_utils import compose_cfg
from mobilesam_se.data.folder_writer import write_folder_sample
from mobilesam_se.assembly import build_run, check_can_learn, resolve_val_split


def test_seed_everything_without_checkpoint_refuses_naming_the_flag():
    cfg = compose_cfg(["experiment=seed_everything"])
    with pytest.raises(ValueError, match="model.checkpoint="):
        check_can_learn(cfg)
    check_can_learn(compose_cfg(["experiment=seed_everything", "model.checkpoint=mobile_sam.pt"]))
    check_can_learn(compose_cfg(["experiment=seed_everything", "matching.allow_random_init=true"]))
    check_can_learn(compose_cfg([]))  # the default from-scratch run (bootstrap matching)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i in range(2):
        mask = np.zeros((32, 32), bool)
        mask[4:20, 4:20] = True
        write_folder_sample(root, f"{i}", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), [mask])
    return root


def test_missing_val_split_warns_and_is_recorded(tmp_path, caplog):
    root = _folder(tmp_path / "train")
    cfg = compose_cfg(["dataset=folder", f"dataset.root={root}"])
    with caplog.at_level(logging.WARNING):
        assert resolve_val_split(cfg) is True
    assert "TRAINING data" in caplog.text and "dataset.val_root=" in caplog.text
    assert cfg.dataset.val_root == str(root) and cfg.dataset.val_is_train is True

    caplog.clear()
    explicit = compose_cfg(["dataset=folder", f"dataset.root={root}", "dataset.val_root=${dataset.root}"])
    with caplog.at_level(logging.WARNING):
        assert resolve_val_split(explicit) is True  # on purpose: recorded, not warned
    assert "TRAINING" not in caplog.text

    val = _folder(tmp_path / "val")
    split = compose_cfg(["dataset=folder", f"dataset.root={root}", f"dataset.val_root={val}"])
    assert resolve_val_split(split) is False and split.dataset.val_is_train is False


def test_the_run_records_val_is_train_in_its_config(tmp_path):
    root = _folder(tmp_path / "train")
    tiny = ["debug=default", "~dataset.train.num_images", "~dataset.val.num_images"]  # synthetic-only keys
    cfg = compose_cfg(tiny + ["dataset=folder", f"dataset.root={root}", "trainer.max_epochs=1",
                                  "dataset.grid_points=2", "model.image_size=64"])
    trainer, cleanup = build_run(cfg, out_dir=tmp_path / "run")
    try:
        trainer.fit()
    finally:
        cleanup()
    assert "val_is_train: true" in (tmp_path / "run" / "config_resolved.yaml").read_text()


def test_standin_finetune_starts_from_the_checkpoint_with_the_plain_rule(tmp_path):
    """A short version of experiments/finetune_standin: pre-train, then fine-tune that best.pt with
    matching=default on scenes of another seed. The fine-tune must start from the pre-trained
    weights (not random ones), use the plain rule, and validate on the other seed's scenes."""
    import torch

    from mobilesam_se.models.checkpoint import read_checkpoint

    pre_dir = tmp_path / "pre"
    cfg = compose_cfg(["debug=default", "trainer.max_epochs=1"])
    trainer, cleanup = build_run(cfg, out_dir=pre_dir)
    try:
        trainer.fit()
    finally:
        cleanup()
    best = pre_dir / "checkpoints" / "best.pt"
    ft = compose_cfg(["debug=default", "experiment=finetune_standin", f"model.checkpoint={best}", "trainer.max_epochs=1",
                                 "trainer.val_every=1", "trainer.lr=0.0"])
    assert ft.matching.point_credit == 0.0 and not ft.matching.point_fg and ft.seed == 1
    trainer, cleanup = build_run(ft, out_dir=tmp_path / "ft")
    try:
        start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        trainer.fit()
    finally:
        cleanup()
    pre = read_checkpoint(best)
    ours = {k: v for k, v in start.items() if k in pre}
    assert ours and all(torch.equal(ours[k], pre[k].to(ours[k].dtype)) for k in ours)
    from hydra.utils import instantiate

    seed0_val = instantiate(compose_cfg(["debug=default"]).dataset.val)
    assert trainer.val_set.root != seed0_val.root  # other validation scenes (seed 1)
    assert not torch.equal(trainer.val_set[0].image, seed0_val[0].image)
    assert (tmp_path / "ft" / "checkpoints" / "training_log.txt").exists()
