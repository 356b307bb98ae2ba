"""trainer.low_res_fraction: the first epochs of a from-scratch run at a lower input size, same weights."""
from pathlib import Path

import pytest
import torch

from helpers.hydra_utils import compose_cfg
from mobilesam_se.assembly import build_run
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import load_model_weights


def test_a_model_set_to_another_size_computes_what_one_built_at_it_does():
    torch.manual_seed(0)
    big = build_mobilesam(256, size="tiny").eval()
    small = build_mobilesam(128, size="tiny").eval()
    small.load_state_dict(big.state_dict())  # no weight depends on the size
    pixels = torch.randn(1, 3, 128, 128)
    points = torch.tensor([[[20.0, 30.0], [100.0, 64.0], [5.0, 120.0]]])
    with torch.no_grad():
        want = small(pixels, points)
        big.set_image_size(128)
        got = big(pixels, points)
    assert got.masks.shape == want.masks.shape == (1, 3, 3, 32, 32)
    assert torch.equal(got.masks, want.masks) and torch.equal(got.iou_pred, want.iou_pred)
    assert big.prompt_encoder.get_dense_pe().shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        big.set_image_size(120)


def _fit(cfg, out: Path, seen=None):
    trainer, cleanup = build_run(cfg, out_dir=out)
    if seen is not None:
        step = trainer._micro_step

        def spy(batch, index):  # records the input side of every training step
            seen.append((trainer.epoch, batch.image.shape[-1], batch.masks_lowres[0].shape[-1], trainer.model.image_size))
            return step(batch, index)

        trainer._micro_step = spy
    try:
        trainer.fit()
    finally:
        cleanup()
    return trainer


def test_the_first_epochs_train_at_the_low_size_and_everything_else_at_the_full_one(tmp_path):
    cfg = compose_cfg(["debug=default", "trainer.max_epochs=3", "trainer.low_res_fraction=0.67", "trainer.tune_amg=true"])
    seen = []
    trainer = _fit(cfg, tmp_path, seen)
    full = cfg.model.image_size
    assert {(e, s, m, s) for e, s, m, _ in seen} == {(e, s, m, ms) for e, s, m, ms in seen}  # model and data agree
    assert sorted({(e, s, m) for e, s, m, _ in seen}) == [(0, full // 2, full // 8), (1, full // 2, full // 8),
                                                            (2, full, full // 4)]
    # validation, best.pt, its description and the tuned thresholds are at the model's own size
    assert trainer.model.image_size == full and trainer.train_set.image_size == full
    assert [r.get("val/num_images") for r in trainer.history] == [2, 2, 2]
    model = build_mobilesam(full, size=cfg.model.size)
    load_model_weights(model, tmp_path / "checkpoints" / "best.pt")
    assert "image_size: %d" % full in (tmp_path / "checkpoints" / "best.model.yaml").read_text()
    assert (tmp_path / "checkpoints" / "best.amg.yaml").is_file()


def test_a_run_resumed_in_a_low_res_epoch_repeats_the_uninterrupted_one(tmp_path):
    overrides = ["debug=default", "trainer.max_epochs=3", "trainer.low_res_fraction=0.67"]
    whole = _fit(compose_cfg(overrides), tmp_path / "whole")
    _fit(compose_cfg(overrides + ["trainer.max_steps=1"]), tmp_path / "cut")  # stops inside epoch 0
    resumed = _fit(compose_cfg(overrides), tmp_path / "cut")
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_low_res_settings_name_the_option(tmp_path):
    for overrides, message in ((["trainer.low_res_scale=1.0"], "trainer.low_res_scale=1.0"),
                               (["trainer.low_res_fraction=1.0"], r"trainer.low_res_fraction must be in \[0, 1\)")):
        cfg = compose_cfg(["debug=default", "trainer.low_res_fraction=0.5"] + overrides)
        with pytest.raises(ValueError, match=message):
            build_run(cfg, out_dir=tmp_path)


def test_from_a_checkpoint_every_epoch_is_at_the_full_size(tmp_path):
    first = _fit(compose_cfg(["debug=default", "trainer.max_epochs=1"]), tmp_path / "a")
    cfg = compose_cfg(["debug=default", "trainer.max_epochs=2", "trainer.low_res_fraction=0.5",
                       f"model.checkpoint={tmp_path / 'a' / 'checkpoints' / 'best.pt'}"])
    seen = []
    tuned = _fit(cfg, tmp_path / "b", seen)
    assert tuned.low_res_epochs == 0 and {s for _, s, _, _ in seen} == {first.model.image_size}


def test_the_full_size_epochs_restart_the_schedule_unless_told_to_continue(tmp_path):
    from mobilesam_se.engine.optim import phased_warmup_cosine, warmup_cosine

    assert [phased_warmup_cosine(s, 2, [], 20, 0.05) for s in range(20)] == [warmup_cosine(s, 2, 20, 0.05) for s in range(20)]
    restarted = [phased_warmup_cosine(s, 2, [8], 20, 0.05) for s in range(20)]
    assert restarted[:8] == [warmup_cosine(s, 2, 8, 0.05) for s in range(8)]
    assert restarted[8:] == [warmup_cosine(s, 2, 12, 0.05) for s in range(12)]
    lrs = {}
    for schedule in ("restart", "continue"):
        cfg = compose_cfg(["debug=default", "trainer.max_epochs=3", "trainer.low_res_fraction=0.67",
                           f"trainer.low_res_schedule={schedule}", "trainer.warmup_steps=2"])
        trainer, cleanup = build_run(cfg, out_dir=tmp_path / schedule)
        cleanup()
        factor = trainer.scheduler.lr_lambdas[0]  # the multiplier of the learning rate per optimizer step
        lrs[schedule] = [factor(s) for s in range(trainer.total_steps)]
    per_epoch = trainer.steps_per_epoch
    assert lrs["restart"][2 * per_epoch] == 0.5 != lrs["continue"][2 * per_epoch]  # the warm-up's first step again
    assert lrs["continue"] == [warmup_cosine(s, 2, 3 * per_epoch, 0.05) for s in range(3 * per_epoch)]
    with pytest.raises(ValueError, match="trainer.low_res_schedule"):
        build_run(compose_cfg(["debug=default", "trainer.low_res_schedule=cosine"]), out_dir=tmp_path / "bad")
