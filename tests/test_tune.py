"""`python -m mobilesam_se.tune`: thresholds searched on a val split, written beside the checkpoint,
used by `evaluate` (and `segment`) unless the stock values are asked for or a value is typed.

The model has hand-structured weights (blobs around each point, a prompt-dependent IoU), and the
ground truth is what the AMG keeps of that model's masks at loose thresholds (0.3 / 0.6): a model
whose good masks sit below the stock 0.88 / 0.95, as a freshly trained one's do. The tuner must
find thresholds under which the AMG recovers them, and beat the stock values doing so."""
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mobilesam_se.data.folder_writer import write_folder_sample
from mobilesam_se.inference import EverythingGenerator
from mobilesam_se.inference.synthetic import structured_mobilesam_state_dict
from mobilesam_se.inference.thresholds import TUNED_KEYS, apply_tuned, read_tuned, tuned_path
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import export_official, load_official_state_dict, official_state_dict

REPO = Path(__file__).resolve().parents[1]
LOOSE = dict(pred_iou_thresh=0.3, stability_score_thresh=0.6, box_nms_thresh=0.7)


@pytest.fixture(scope="module")
def setup(coffee, tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    torch.manual_seed(0)
    model = build_mobilesam(256, size="mobilesam").eval()
    load_official_state_dict(model, structured_mobilesam_state_dict(official_state_dict(model), coffee), "structured")
    ckpt = root / "best.pt"
    export_official(model, ckpt)
    image = np.ascontiguousarray(coffee[::2, ::2])
    records = EverythingGenerator(model, points_per_side=6, output_mode="binary_mask", **LOOSE).generate(image)
    assert len(records) >= 5
    write_folder_sample(root / "val", "coffee", image, [np.asarray(r["segmentation"], bool) for r in records])
    return ckpt, root


def _compose(config, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config, overrides=overrides)


def test_tune_beats_stock_and_writes_beside_the_checkpoint(setup):
    from mobilesam_se.tune import run_tune

    ckpt, root = setup
    data = ["dataset=folder", f"dataset.root={root / 'val'}", f"dataset.val_root={root / 'val'}", "dataset.grid_points=6",
            "model=mobilesam", "model.image_size=256"]
    args = [f"checkpoint={ckpt}", "progress=false", "device=cpu", *data]
    out = run_tune(_compose("tune", args), overrides=args)  # typed: a bare full-size file runs at 256, not 1024
    assert out["tuned"]["AR_100"] > out["stock"]["AR_100"] + 0.2
    assert out["tuned"]["AR_100"] >= 0.8  # the loose masks are recovered
    assert out["thresholds"]["pred_iou_thresh"] < TUNED_KEYS["pred_iou_thresh"]
    assert tuned_path(ckpt) == ckpt.with_name("best.amg.yaml") and read_tuned(ckpt) == out["thresholds"]

    from mobilesam_se.evaluate import run_evaluation

    common = [f"checkpoint={ckpt}", "progress=false", "device=cpu", *data]
    tuned_args = common + [f"output={root / 'ev_tuned'}"]
    stock_args = common + [f"output={root / 'ev_stock'}", "generator.tuned=false"]
    tuned = run_evaluation(_compose("evaluate", tuned_args), overrides=tuned_args)
    stock = run_evaluation(_compose("evaluate", stock_args), overrides=stock_args)
    assert tuned["info"]["amg_thresholds"] == "tuned (best.amg.yaml)" and stock["info"]["amg_thresholds"] == "stock"
    assert tuned["coco_amg"]["AR_100"] == pytest.approx(out["tuned"]["AR_100"], abs=1e-6)
    assert stock["coco_amg"]["AR_100"] == pytest.approx(out["stock"]["AR_100"], abs=1e-6)


def test_typed_thresholds_win_over_tuned_ones(tmp_path):
    from mobilesam_se.inference.thresholds import write_tuned

    ckpt = tmp_path / "model.pt"
    write_tuned(ckpt, {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.7, "box_nms_thresh": 0.6}, {})
    kwargs, used = apply_tuned(dict(TUNED_KEYS, points_per_side=8), ckpt, explicit={"box_nms_thresh"})
    assert used == tmp_path / "model.amg.yaml"
    assert kwargs == {"pred_iou_thresh": 0.4, "stability_score_thresh": 0.7, "box_nms_thresh": 0.7, "points_per_side": 8}
    assert apply_tuned(dict(TUNED_KEYS), ckpt, enabled=False)[0] == TUNED_KEYS
    assert apply_tuned(dict(TUNED_KEYS), tmp_path / "other.pt")[1] is None
    (tmp_path / "model.amg.yaml").write_text("generator: [not, a, mapping\n")
    with pytest.raises(ValueError, match="model.amg.yaml"):
        read_tuned(ckpt)
