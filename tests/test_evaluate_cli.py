"""`python -m mobilesam_se.evaluate` end to end, the shared routine, and the evaluation inside training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from helpers.hydra_utils import compose_cfg
from mobilesam_se.data.sample import collate_samples
from mobilesam_se.data.synthetic import SyntheticDataset
from mobilesam_se.evaluation.validation import validate
from mobilesam_se.evaluation.evaluator import evaluate_everything
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import export_official
from mobilesam_se.assembly import build_run

REPO = Path(__file__).resolve().parents[1]
SMALL_DATA = ["dataset.val.num_images=2", "dataset.val.image_hw=[96,128]", "dataset.grid_points=4"]
GROUPS = ("hungarian", "coco_raw", "coco_amg", "calibration")
KEYS = {
    "hungarian": ["dice", "iou", "recall", "precision", "micro_recall", "num_pred", "num_gt", "num_images"],
    "coco_raw": ["AP", "AP50", "AP75", "AR_10", "AR_100", "AR_1000", "dets_per_image"],
    "coco_amg": ["AP", "AP50", "AP75", "AR_10", "AR_100", "AR_1000", "dets_per_image"],
    "calibration": ["ece", "mae", "pred_above_88", "pred_above_95", "mean_pred_iou", "mean_true_iou"],
}


pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_mobilesam(256, size="tiny").eval()


def test_cli_end_to_end(tmp_path):
    ckpt = tmp_path / "best.pt"
    export_official(tiny_model(), ckpt)
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "mobilesam_se.evaluate", "model=tiny", f"checkpoint={ckpt}", f"output={out}",
           f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false", *SMALL_DATA]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    saved = json.loads((out / "metrics.json").read_text())
    for group, keys in KEYS.items():
        missing = [k for k in keys if k not in saved[group]]
        assert not missing, (group, missing)
    assert saved["hungarian"]["num_images"] == 2
    assert saved["info"]["checkpoint"] == str(ckpt) and saved["info"]["split"] == "val"
    assert saved["coco_raw"]["dets_per_image"] == 48  # 4 x 4 prompts x 3 candidates, all kept
    assert 0 <= saved["coco_raw"]["AR_1000"] <= 1 and 0 <= saved["calibration"]["ece"] <= 1
    assert len(saved["reliability"]["count"]) == 10 and sum(saved["reliability"]["count"]) == 96
    assert (out / "calibration.png").stat().st_size > 1000
    for text in ("dice", "AMG output", "AR@1000", "ECE"):
        assert text in res.stdout, res.stdout


def test_cli_needs_a_checkpoint(tmp_path):
    from mobilesam_se.evaluate import run_evaluation

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["model=tiny", f"output={tmp_path}", *SMALL_DATA])
    assert cfg.model.name == "tiny" and cfg.generator.points_per_side == 4  # groups reused, grid shared
    from mobilesam_se.errors import UserError

    with pytest.raises(UserError, match="allow_random"):
        run_evaluation(cfg)


def test_shared_routine_matches_validation(tmp_path):
    ds = SyntheticDataset(root=tmp_path, num_images=2, image_hw=(96, 128), split="val", image_size=256,
                          grid_points=4, keep_original=True)
    model = tiny_model()
    report = evaluate_everything(model, ds, "cpu", batch_size=2, generator=False, progress=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, collate_fn=collate_samples)
    plain, _ = validate(model, loader, torch.device("cpu"), 256, True, 64, progress=False)
    for k in plain:
        assert report.metrics[k] == pytest.approx(plain[k], nan_ok=True), k
    assert "coco_amg/AP" not in report.metrics and "coco_raw/AP" in report.metrics
    assert report.info["num_images"] == 2
    one = evaluate_everything(model, ds, "cpu", max_images=1, generator=False, progress=False)
    assert one.metrics["num_images"] == 1


class RecordingLogger:
    run_id = None

    def __init__(self):
        self.metrics, self.images = [], []

    def start(self, *a, **k):
        pass

    def log(self, metrics, step):
        self.metrics.append(dict(metrics))

    def log_image(self, key, image, step, caption=""):
        self.images.append((key, image.shape))

    def summary(self, values):
        pass

    def finish(self):
        pass


def test_training_runs_the_evaluation(tmp_path):
    cfg = compose_cfg(["debug=default", "trainer.max_epochs=1", "trainer.coco_eval_every=1", "trainer.coco_eval_amg=true",
                                  "dataset.val.num_images=1",
                                  "dataset.train.num_images=2", "dataset.val.image_hw=[96,128]"])
    trainer, cleanup = build_run(cfg, out_dir=tmp_path)
    trainer.logger = RecordingLogger()
    try:
        result = trainer.fit()
    finally:
        cleanup()
    val = [m for m in trainer.logger.metrics if "val/dice" in m]
    assert len(val) == 1
    for key in ("val/coco_raw/AP", "val/coco_raw/AR_1000", "val/coco_amg/AR_100", "val/calibration/ece",
                "val/calibration/pred_above_88"):
        assert key in val[0], key
    assert [k for k, _ in trainer.logger.images if k == "val/calibration"]
    assert "val/coco_raw/AR_100" in result["history"][0]

    # on by default at every validation of the default run (AR@100 on the learning curves), the AMG pass off
    defaults = compose_cfg([]).trainer
    assert defaults.coco_eval_every == defaults.val_every > 0 and defaults.coco_eval_amg is False
