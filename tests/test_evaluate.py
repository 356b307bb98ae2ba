"""The evaluation's parts on constructed cases: the COCOeval wrapper, calibration, the evaluator."""
import json
import math

import numpy as np
import pytest
import torch

from mobilesam_se.evaluation.calibration import (
    best_match_iou,
    plot_reliability,
    reliability,
    survival,
)
from mobilesam_se.evaluation.coco_eval import CocoMaskEval, encode_masks
from mobilesam_se.evaluation.evaluator import EverythingEvaluator, EverythingReport, format_table


def box_mask(hw, y0, x0, y1, x1):
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


HW = (60, 80)
GT = np.stack([box_mask(HW, 0, 0, 20, 20), box_mask(HW, 30, 40, 60, 80), box_mask(HW, 25, 0, 50, 30)])


def coco_with(dets_per_image, gts=(GT,)):
    ev = CocoMaskEval(max_dets=(1, 10, 100))
    for gt, (masks, scores) in zip(gts, dets_per_image):
        iid = ev.add_image(HW, gt)
        ev.add_detections("d", iid, masks, scores)
    return ev.summarize("d")


# -- COCOeval wrapper ---------------------------------------------------------------------------
def test_perfect_detections_score_one():
    m = coco_with([(GT, [0.9, 0.8, 0.7])])
    for k in ("AP", "AP50", "AP75", "AR_10", "AR_100"):
        assert m[k] == pytest.approx(1.0), k
    assert m["AR_1"] == pytest.approx(1 / 3)  # one detection per image finds one of three objects
    assert m["num_dets"] == 3
    # two images, RLE input and a torch tensor input, give the same
    ev = CocoMaskEval(max_dets=(10,))
    for i in range(2):
        iid = ev.add_image(HW, torch.from_numpy(GT))
        ev.add_detections("d", iid, encode_masks(GT) if i else torch.from_numpy(GT), torch.tensor([0.5, 0.6, 0.7]))
    assert ev.summarize("d")["AP"] == pytest.approx(1.0)


def test_no_detections_score_zero():
    m = coco_with([(np.zeros((0, *HW), bool), [])])
    assert m["AP"] == 0 and m["AR_100"] == 0 and m["num_dets"] == 0


def test_no_ground_truth_is_nan():
    ev = CocoMaskEval()
    iid = ev.add_image(HW, np.zeros((0, *HW), bool))
    ev.add_detections("d", iid, GT, [0.9, 0.8, 0.7])
    m = ev.summarize("d")
    assert math.isnan(m["AP"]) and math.isnan(m["AR_1000"])


def test_spurious_confident_detection_lowers_ap_not_ar():
    spurious = box_mask(HW, 0, 60, 10, 80)  # overlaps no object
    m = coco_with([(np.concatenate([GT, spurious[None]]), [0.8, 0.7, 0.6, 0.95])])
    # ranks: FP, TP, TP, TP -> precision 3/4 at full recall, interpolated over all recall levels
    assert m["AP"] == pytest.approx(0.75, abs=0.01)
    assert m["AR_100"] == pytest.approx(1.0)
    # ranked last it costs nothing
    m = coco_with([(np.concatenate([GT, spurious[None]]), [0.8, 0.7, 0.6, 0.1])])
    assert m["AP"] == pytest.approx(1.0)


def test_partial_overlap_counts_only_at_low_thresholds():
    shifted = box_mask(HW, 0, 3, 20, 23)  # IoU with gt 0 = 340 / 460 = 0.739
    m = coco_with([(shifted[None], [0.9])], gts=(GT[:1],))
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == 0.0
    assert m["AP"] == pytest.approx(0.5, abs=0.01)  # TP at thresholds .50-.70 (5 of 10)


def test_only_the_best_max_dets_are_kept():
    ev = CocoMaskEval(max_dets=(1, 2))
    iid = ev.add_image(HW, GT)
    assert ev.add_detections("d", iid, GT, [0.1, 0.9, 0.5]) == 2
    assert sorted(d["score"] for d in ev.dets["d"]) == [0.5, 0.9]
    with pytest.raises(ValueError):
        ev.add_detections("d", iid, np.zeros((1, 10, 10), bool), [1.0])  # wrong size


def test_hundreds_of_detections_per_image():
    """A 16x16 grid x 3 masks gives 768 candidates: pycocotools' `area` fails from 256 RLEs under
    NumPy 2 (OverflowError), so areas are asked in pieces; the duplicates change no AR."""
    dets = np.tile(GT, (100, 1, 1))  # 300 detections: 100 copies of each object, interleaved
    m = coco_with([(dets, np.linspace(0.9, 0.1, 300))])
    assert m["AR_100"] == pytest.approx(1.0) and m["num_dets"] == 100
    ev = CocoMaskEval(max_dets=(1000,))
    iid = ev.add_image(HW, dets)  # as many ground-truth masks
    assert ev.add_detections("d", iid, dets, np.ones(300)) == 300
    assert [d["area"] for d in ev.gt] == [float(m.sum()) for m in dets]


# -- calibration --------------------------------------------------------------------------------
def test_ece_constructed_cases():
    rng = np.random.default_rng(0)
    true = rng.uniform(0, 1, 1000)
    assert reliability(true, true)["ece"] == pytest.approx(0.0)
    # a constant offset that keeps each prediction inside the range: ECE = the offset
    t = rng.uniform(0, 0.8, 1000)
    assert reliability(t + 0.1, t)["ece"] == pytest.approx(0.1)
    # hand-computed: bin [0.9,1]: preds .95,.95 true .5,.7 -> |.95-.6| = .35; bin [0.1,0.2): .15 vs .15
    rel = reliability([0.95, 0.95, 0.15, 0.15], [0.5, 0.7, 0.1, 0.2], bins=10)
    assert rel["ece"] == pytest.approx(0.5 * 0.35)
    assert rel["count"][9] == 2 and rel["count"][1] == 2 and sum(rel["count"]) == 4
    assert math.isnan(rel["mean_pred"][0])
    assert rel["mae"] == pytest.approx((0.45 + 0.25 + 0.05 + 0.05) / 4)
    # predictions beyond [0, 1] are clipped into the end bins
    rel = reliability([1.3, -0.2], [1.0, 0.0], bins=4)
    assert rel["ece"] == 0 and rel["count"] == [1, 0, 0, 1]
    assert math.isnan(reliability([], [])["ece"])


def test_survival_and_best_match():
    assert survival([0.5, 0.88, 0.9, 0.96], (0.88, 0.95)) == {0.88: 0.5, 0.95: 0.25}
    gt = torch.from_numpy(GT)
    cand = torch.from_numpy(np.stack([GT[1], box_mask(HW, 0, 0, 10, 20), np.zeros(HW, bool)]))
    assert best_match_iou(cand, gt).tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert best_match_iou(cand, gt[:0]).tolist() == [0, 0, 0]


def test_reliability_plot(tmp_path):
    rel = reliability(np.linspace(0, 1, 50), np.linspace(0, 1, 50) ** 2)
    plot_reliability(rel, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 1000


# -- the evaluator ------------------------------------------------------------------------------
class FakeGenerator:
    """Returns the gt as AMG records plus one spurious mask, like EverythingGenerator.generate."""

    def generate(self, image):
        assert image.dtype == np.uint8 and image.shape[:2] == HW
        recs = [{"segmentation": r, "predicted_iou": 0.9, "area": 1} for r in encode_masks(GT)]
        recs.append({"segmentation": box_mask(HW, 0, 60, 10, 80), "predicted_iou": 0.5, "area": 1})
        return recs


def test_evaluator_and_report(tmp_path):
    ev = EverythingEvaluator(FakeGenerator(), max_dets=(10, 100, 1000))
    cand = torch.from_numpy(np.concatenate([GT, GT[:1], np.zeros((1, *HW), bool)]))
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95, 0.99])  # a duplicate and an empty mask ranked first
    ev.add("a", cand, scores, torch.from_numpy(GT), np.zeros((*HW, 3), np.uint8))
    m = ev.summarize()
    assert m["coco_raw/AR_10"] == pytest.approx(1.0) and m["coco_raw/AP"] < 0.7
    assert m["coco_amg/AP"] == pytest.approx(1.0) and m["coco_amg/dets_per_image"] == 4
    assert m["calibration/pred_above_88"] == pytest.approx(3 / 5)
    assert m["calibration/true_above_88"] == pytest.approx(4 / 5)
    assert m["calibration/candidates_per_image"] == 5
    with pytest.raises(ValueError, match="keep_original"):
        ev.add("b", cand, scores, torch.from_numpy(GT), None)

    report = EverythingReport({"dice": 0.5, "num_gt": 3, **m}, ev.reliability, {"num_images": 1, "checkpoint": None})
    path = report.save(tmp_path)
    saved = json.loads(path.read_text())
    assert saved["hungarian"]["dice"] == 0.5 and saved["coco_amg"]["AP"] == pytest.approx(1.0)
    assert len(saved["reliability"]["count"]) == 10
    assert (tmp_path / "calibration.png").exists()
    table = format_table(report.metrics, report.info)
    assert "AMG output" in table and "AR@1000" in table and "random init" in table
