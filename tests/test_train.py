"""The trainer: exact resume, freezing, schedules, non-finite guard, outputs, the run.py command line."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.hydra_utils import compose_cfg
from helpers.wandb_records import history_keys, read_run
from mobilesam_se.engine.optim import warmup_cosine
from mobilesam_se.engine.trainer import NonFiniteLossError
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import load_model_weights, read_checkpoint
from mobilesam_se.assembly import build_run

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


def fit(overrides, out_dir):
    cfg = compose_cfg(["debug=default", *overrides])
    trainer, cleanup = build_run(cfg, out_dir=Path(out_dir))
    try:
        return trainer, trainer.fit()
    finally:
        cleanup()


def fresh_model():
    """The model `build_run` starts from: the debug run's model group (its init included), built
    after seeding with cfg.seed = 0."""
    from hydra.utils import instantiate

    net = compose_cfg(["debug=default"]).model.net
    torch.manual_seed(0)
    return instantiate(net)


def params(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    common = ["matching=bootstrap", "dataset.batch_size=1", "trainer.grad_accum=2", "dataset.prompts_per_step=6"]
    full, res = fit(common, tmp_path / "a")
    assert res["step"] == 4  # 4 images, batch 1, accumulation 2 -> 2 steps/epoch, 2 epochs
    stopped, res_b = fit(common + ["trainer.max_steps=3"], tmp_path / "b")
    assert res_b["stopped"] and res_b["step"] == 3 and res_b["epoch"] == 1
    resumed, res_c = fit(common, tmp_path / "b")
    assert res_c["step"] == 4 and res_c["epoch"] == 2
    a, c = params(full), params(resumed)
    assert a.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], c[k]), k
    # something was learned, so the equality above is not vacuous
    fresh = fresh_model().state_dict()
    assert any(not torch.equal(fresh[k], a[k]) for k in a if "num_batches" not in k)
    log = (tmp_path / "b" / "checkpoints" / "training_log.txt").read_text().splitlines()
    assert [l.split("\t")[0] for l in log] == ["epoch=0", "epoch=1"]  # appended, never rewritten
    # The epoch resumed mid-way logs its mean over all of its batches, as the uninterrupted run.
    ref = (tmp_path / "a" / "checkpoints" / "training_log.txt").read_text().splitlines()
    train_terms = lambda line: {kv.split("=")[0]: float(kv.split("=")[1]) for kv in line.split("\t") if kv.startswith("train/")}
    assert train_terms(log[1]) == pytest.approx(train_terms(ref[1]), rel=1e-5)
    assert "train/loss" in train_terms(log[1])


def test_unfreeze_hands_parameters_to_the_optimizer(tmp_path):
    trainer, _ = fit(["freeze=encoder", "freeze.unfreeze_epoch=1", "trainer.max_epochs=1"], tmp_path / "frozen")
    before = fresh_model().image_encoder.state_dict()
    enc = trainer.model.image_encoder.state_dict()
    assert all(torch.equal(before[k], enc[k]) for k in enc)  # frozen in epoch 0 (BN stats frozen too)
    n_opt = sum(p.numel() for g in trainer.optimizer.param_groups for p in g["params"])
    assert n_opt < sum(p.numel() for p in trainer.model.parameters())

    trainer, _ = fit(["freeze=encoder", "freeze.unfreeze_epoch=1", "trainer.max_epochs=2"], tmp_path / "thawed")
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in in_opt for p in trainer.model.image_encoder.parameters())
    enc = trainer.model.image_encoder.state_dict()
    changed = [k for k in enc if enc[k].is_floating_point() and not torch.equal(before[k], enc[k])]
    assert changed, "unfrozen encoder did not train"


def test_warmup_cosine_schedule_and_accumulation(tmp_path):
    assert warmup_cosine(0, 4, 20) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20) == pytest.approx(1.0)
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20, min_ratio=0.1) == pytest.approx(0.1)
    trainer, res = fit(["dataset.batch_size=1", "trainer.grad_accum=2", "trainer.max_epochs=1",
                        "trainer.warmup_steps=1", "trainer.lr=0.01", "trainer.min_lr_ratio=0.0"], tmp_path)
    assert trainer.total_steps == 2 and res["step"] == 2  # 4 micro-batches / accumulation 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine reached its end


def test_nonfinite_losses_are_skipped_then_stop(tmp_path):
    with pytest.raises(NonFiniteLossError, match="max_nonfinite"):
        fit(["loss.w_iou=nan", "trainer.max_nonfinite=2"], tmp_path)
    trainer, res = fit(["loss.w_iou=nan", "trainer.max_nonfinite=100", "trainer.max_epochs=1"], tmp_path / "skip")
    assert trainer.nonfinite == 2 and res["step"] == 0  # both steps skipped, parameters untouched
    fresh = dict(fresh_model().named_parameters())
    assert all(torch.equal(fresh[k], v) for k, v in trainer.model.named_parameters())  # BN stats may move


def test_outputs_checkpoints_and_visuals(tmp_path):
    trainer, res = fit(["matching=bootstrap", "trainer.tune_amg=true", "trainer.tune_objective=f1"], tmp_path)
    ck = tmp_path / "checkpoints"
    state = read_checkpoint(ck / "last.ckpt")  # weights_only load works
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "lambda", "best_score", "wandb_run_id"):
        assert key in state
    assert state["epoch"] == 2 and state["step"] == res["step"]
    m = build_mobilesam(256, size="tiny")
    load_model_weights(m, ck / "best.pt")  # official layout, strict
    load_model_weights(m, ck / "last.ckpt")
    assert len((ck / "training_log.txt").read_text().splitlines()) == 2
    assert list((tmp_path / "vis").glob("epoch_*/*.png"))
    assert (tmp_path / "config_resolved.yaml").exists()
    from mobilesam_se.inference.thresholds import TUNED_KEYS, read_tuned, tuned_path

    tuned = read_tuned(ck / "best.pt")  # the AMG thresholds tuned for the final best.pt
    assert tuned is not None and set(tuned) == set(TUNED_KEYS)
    assert all(0.0 < v <= 1.0 for v in tuned.values())
    info = yaml.safe_load(tuned_path(ck / "best.pt").read_text())["info"]
    assert info["objective"] == "f1"  # trainer.tune_objective reached the tuning


def test_unknown_tune_objective_fails_before_training(tmp_path):
    cfg = compose_cfg(["debug=default", "trainer.tune_objective=AP"])
    with pytest.raises(ValueError, match="trainer.tune_objective"):
        build_run(cfg, out_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_run_py_command_line_with_wandb_offline(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", MOBILESAM_SE_DATA=str(tmp_path / "data"))
    out = tmp_path / "run"
    cmd = [sys.executable, "run.py", f"hydra.run.dir={out}", "logger=wandb", "matching=bootstrap",
           "debug=default", "trainer.max_epochs=1", "trainer.log_every=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    logged = read_run(files[0])
    # config = the resolved Hydra config
    assert logged["config"]["loss"]["w_focal"] == 15.0 and logged["config"]["dataset"]["grid_points"] == 4
    keys = history_keys(logged)
    for key in ("train/loss", "train/bce", "train/focal", "train/dice", "train/iou", "train/cls", "train/lr",
                "val/dice", "val/recall", "val/precision"):
        assert key in keys, key
    # the logged loss is the optimised one: the weighted sum of the logged terms
    row = next(r for r in logged["history"] if "train/loss" in r)
    w = logged["config"]["loss"]
    total = sum(w[f"w_{t}"] * row[f"train/{t}"] for t in ("bce", "focal", "dice", "iou", "cls"))
    assert math.isclose(row["train/loss"], total, rel_tol=1e-4, abs_tol=1e-6)
    assert any(k.startswith("val/overlay/") for k in keys)  # overlay images
    state = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert state["wandb_run_id"] == logged["run_id"]


def test_last_accumulation_window_averages_its_own_batches(tmp_path):
    """3 micro-batches with accumulation 2: the second window holds one batch, and its gradient
    must be that batch's own gradient (divided by 1, not 2). lr 0 keeps the parameters fixed, so
    the same batch seen with accumulation 1 gives the reference gradient."""
    def grads_per_step(accum, out):
        cfg = compose_cfg(["debug=default", "dataset.train.num_images=3", "dataset.batch_size=1", f"trainer.grad_accum={accum}",
                                      "trainer.max_epochs=1", "trainer.lr=0.0", "trainer.grad_clip=null",
                                      "trainer.val_every=0", "matching=bootstrap"])
        trainer, cleanup = build_run(cfg, out_dir=tmp_path / out)
        seen = []
        trainer.optimizer.register_step_pre_hook(
            lambda opt, *_: seen.append([p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]))
        try:
            trainer.fit()
        finally:
            cleanup()
        return seen

    accumulated, single = grads_per_step(2, "accum"), grads_per_step(1, "single")
    assert len(accumulated) == 2 and len(single) == 3, (len(accumulated), len(single))
    assert any(g.abs().sum() > 0 for g in single[2])
    for a, b in zip(accumulated[1], single[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
