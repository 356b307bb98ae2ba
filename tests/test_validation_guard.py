"""The calibration guard of every validation: the AMG filters applied to the validation candidates
keep what the real `EverythingGenerator` keeps, and the calibration numbers are the plain means."""
import numpy as np
import pytest
import torch

from mobilesam_se.data.sample import Batch
from mobilesam_se.evaluation.validation import amg_keep, calibration_summary, full_res_candidates, predict_candidates
from mobilesam_se.evaluation.metrics import evaluate_image
from mobilesam_se.inference import EverythingGenerator
from mobilesam_se.inference import rle as rle_utils
from mobilesam_se.inference.synthetic import structured_mobilesam_state_dict
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import load_official_state_dict, official_state_dict
from mobilesam_se.prompts import grid_points_for_model
from mobilesam_se.transforms import preprocess_image, preprocess_shape


def test_amg_filters_on_validation_candidates_match_the_generator(coffee):
    # Hand-structured weights (blobs around each point, a prompt-dependent IoU), so masks vary.
    torch.manual_seed(0)
    model = build_mobilesam(256, size="mobilesam").eval()
    weights = structured_mobilesam_state_dict(official_state_dict(model), coffee)
    load_official_state_dict(model, weights, "structured weights")
    image = coffee[::2, ::2].copy()
    input_hw = preprocess_shape(*image.shape[:2], 256)
    batch = Batch(image=preprocess_image(image, 256)[None], points=grid_points_for_model(6, image.shape[:2], 256)[None])
    logits, scores = predict_candidates(model, batch, torch.device("cpu"), True, 64)
    q, s = logits[0].flatten(0, 1), scores[0].flatten()
    masks, stability = full_res_candidates(q, input_hw, image.shape[:2], 256, with_stability=True)
    # Thresholds inside the random model's score ranges, so that every filter acts.
    t_iou, t_stab = float(s.median()), float(stability[stability > 0].quantile(0.3))
    keep = amg_keep(masks, s, stability, t_iou, t_stab, 0.7)
    gen = EverythingGenerator(model, points_per_side=6, pred_iou_thresh=t_iou, stability_score_thresh=t_stab,
                              box_nms_thresh=0.7, output_mode="binary_mask")
    records = gen.generate(image)
    assert 0 < len(keep) < int((s > t_iou).sum())
    assert len(records) == len(keep)
    ours = sorted(float(x) for x in s[keep])
    theirs = sorted(float(r["predicted_iou"]) for r in records)
    assert ours == pytest.approx(theirs, abs=1e-5)
    got = {m.numpy().tobytes() for m in masks[keep]}
    assert all(np.asarray(r["segmentation"], bool).tobytes() in got for r in records)


def test_calibration_summary_is_the_plain_means():
    pred = torch.tensor([0.9, 0.2, 1.3, -0.1])  # clipped to [0, 1]: 0.9, 0.2, 1.0, 0.0
    true = torch.tensor([0.95, 0.0, 0.5, 0.1])
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True
    views = [evaluate_image(gt, torch.ones(1), gt), evaluate_image(gt[:0], torch.ones(0), gt)]
    m = calibration_summary(pred.clamp(0, 1), true, views)
    assert m["calibration/mean_pred_iou"] == pytest.approx(0.525)
    assert m["calibration/mean_true_iou"] == pytest.approx(0.3875)
    assert m["calibration/gap"] == pytest.approx(0.1375)
    assert m["calibration/pred_above_88"] == pytest.approx(0.5) and m["calibration/true_above_88"] == pytest.approx(0.25)
    assert m["amg/masks_per_image"] == pytest.approx(0.5) and m["amg/recall"] == pytest.approx(0.5)


def test_calibration_warning_only_past_the_gap():
    from mobilesam_se.engine.trainer import calibration_warning

    m = {"calibration/mean_pred_iou": 0.085, "calibration/mean_true_iou": 0.32, "calibration/gap": 0.235,
         "calibration/pred_above_88": 0.0, "calibration/true_above_88": 0.02, "amg/masks_per_image": 0.0}
    text = calibration_warning(m, 7)
    assert text and "epoch 7" in text and "0.085" in text and "0.320" in text and "0.0 masks per image" in text
    assert calibration_warning(dict(m, **{"calibration/gap": 0.05}), 7) is None
    assert calibration_warning({}, 0) is None
