"""evaluate_image / aggregate on constructed scenes with hand-computed values."""
import math

import pytest
import torch

from mobilesam_se.evaluation import aggregate, evaluate_image, mask_nms
from mobilesam_se.evaluation.metrics import summarize_views


def boxes(*rects: tuple, hw: int = 8) -> torch.Tensor:
    """(N, hw, hw) bool masks, each True on rows [r0, r1) x cols [c0, c1)."""
    m = torch.zeros(len(rects), hw, hw, dtype=torch.bool)
    for i, (r0, r1, c0, c1) in enumerate(rects):
        m[i, r0:r1, c0:c1] = True
    return m


GT = boxes((0, 2, 0, 2), (0, 2, 4, 8), (4, 8, 4, 8))  # areas 4, 8, 16


def scores(n: int) -> torch.Tensor:
    return torch.linspace(0.9, 0.5, n)


def test_perfect_prediction():
    r = evaluate_image(GT.flip(0), scores(3), GT)  # order must not matter
    assert (r["dice"], r["iou"], r["recall"], r["precision"]) == (1.0, 1.0, 1.0, 1.0)
    assert (r["num_pred"], r["num_gt"], r["num_tp"]) == (3, 3, 3)


def test_missed_object_lowers_recall_only():
    r = evaluate_image(GT[:2], scores(2), GT)
    assert r["recall"] == pytest.approx(2 / 3) and r["precision"] == 1.0
    assert r["dice"] == 1.0  # dice is over matched pairs only


def test_spurious_mask_lowers_precision():
    preds = torch.cat([GT, boxes((6, 8, 0, 2))])  # disjoint from every gt
    r = evaluate_image(preds, scores(4), GT)
    assert r["precision"] == pytest.approx(3 / 4) and r["recall"] == 1.0 and r["dice"] == 1.0


def test_partial_overlap_hand_values_and_inclusive_threshold():
    # pred = half of the 4-pixel gt: IoU 2/4, dice 2*2/(2+4).
    gt, pred = boxes((0, 2, 0, 2)), boxes((0, 1, 0, 2))
    r = evaluate_image(pred, torch.ones(1), gt)
    assert r["iou"] == pytest.approx(0.5) and r["dice"] == pytest.approx(2 / 3)
    assert r["num_tp"] == 1
    assert evaluate_image(pred, torch.ones(1), gt, iou_thresh=0.6)["num_tp"] == 0


def test_score_threshold_filters():
    preds = torch.cat([GT, boxes((6, 8, 0, 2))])
    r = evaluate_image(preds, torch.tensor([0.9, 0.8, 0.7, 0.1]), GT, score_thresh=0.5)
    assert r["num_pred"] == 3 and r["precision"] == 1.0


def test_nms_removes_duplicate():
    dup = GT[1:2].clone()
    dup[0, 1, 7] = False  # near-copy of gt 1: IoU 7/8 with it
    preds = torch.cat([GT, dup])
    plain = evaluate_image(preds, scores(4), GT)
    assert plain["precision"] == pytest.approx(3 / 4)
    r = evaluate_image(preds, scores(4), GT, nms_iou=0.7)
    assert r["num_pred"] == 3 and r["precision"] == 1.0 and r["dice"] == 1.0
    # A threshold above the duplicates' IoU keeps both.
    assert evaluate_image(preds, scores(4), GT, nms_iou=0.9)["num_pred"] == 4


def test_mask_nms_keeps_higher_score():
    a = boxes((0, 4, 0, 4))
    a2 = a.clone()
    a2[0, 0, 0] = False  # IoU 15/16 with a
    b = boxes((5, 8, 5, 8))
    kept = mask_nms(torch.cat([a, a2, b]), torch.tensor([0.5, 0.9, 0.7]), 0.5)
    assert kept.tolist() == [1, 2]


def test_hungarian_not_greedy_in_eval():
    # Score-greedy matching (COCO style) lets p0 (higher score) take its best gt g0 and leaves p1
    # only g1 (IoU 0): mean IoU 0.25. The optimal assignment is p1-g0 + p0-g1.
    gt = boxes((0, 4, 0, 4), (0, 4, 4, 8))  # 16 px each
    p0 = boxes((0, 4, 1, 6))  # 20 px: inter 12 with g0 (IoU 12/24), 8 with g1 (IoU 8/28)
    p1 = boxes((0, 4, 0, 3))  # 12 px inside g0: IoU 12/16
    r = evaluate_image(torch.cat([p0, p1]), torch.tensor([0.9, 0.8]), gt)
    assert r["iou"] == pytest.approx((12 / 16 + 8 / 28) / 2)
    assert r["dice"] == pytest.approx((2 * 12 / (12 + 16) + 2 * 8 / (20 + 16)) / 2)
    assert r["num_tp"] == 1


def test_no_gt():
    r = evaluate_image(GT[:2], scores(2), GT[:0])
    assert math.isnan(r["recall"]) and r["precision"] == 0.0 and r["num_tp"] == 0
    assert math.isnan(r["dice"]) and math.isnan(r["iou"])
    r = evaluate_image(GT[:0], scores(0), GT[:0])
    assert math.isnan(r["recall"]) and math.isnan(r["precision"]) and r["num_pred"] == 0


def test_no_predictions():
    r = evaluate_image(GT[:0], scores(0), GT)
    assert r["recall"] == 0.0 and math.isnan(r["precision"])
    assert r["dice"] == 0.0 and r["iou"] == 0.0
    # Every prediction under the score threshold is the same as none.
    assert evaluate_image(GT, torch.zeros(3), GT, score_thresh=0.5)["recall"] == 0.0


def test_aggregate_ignores_nan_and_micro_from_counts():
    img1 = evaluate_image(torch.cat([GT, boxes((6, 8, 0, 2))]), scores(4), GT)  # R 1, P 3/4
    img2 = evaluate_image(GT[:2], scores(2), GT[:0])  # R NaN, P 0
    img3 = evaluate_image(GT[:1], scores(1), GT)  # R 1/3, P 1
    agg = aggregate([img1, img2, img3])
    assert agg["num_images"] == 3
    assert agg["recall"] == pytest.approx((1 + 1 / 3) / 2)
    assert agg["precision"] == pytest.approx((3 / 4 + 0 + 1) / 3)
    assert agg["dice"] == pytest.approx(1.0)  # img2's NaN skipped
    assert (agg["num_pred"], agg["num_gt"], agg["num_tp"]) == (7, 6, 4)
    assert agg["micro_recall"] == pytest.approx(4 / 6) and agg["micro_precision"] == pytest.approx(4 / 7)
    empty = aggregate([])
    assert math.isnan(empty["recall"]) and math.isnan(empty["micro_precision"])


def test_negative_scores_count_without_a_threshold():
    # A raw IoU head can predict below 0; a perfect mask must still be scored as perfect.
    r = evaluate_image(GT, torch.full((3,), -0.01), GT)
    assert r["dice"] == pytest.approx(1.0) and r["recall"] == 1.0 and r["num_pred"] == 3
    assert evaluate_image(GT, torch.full((3,), -0.01), GT, score_thresh=0.0)["num_pred"] == 0


def _validation_views():
    """Two images; the filtered view keeps only confident candidates (score >= 0.5) after NMS."""
    preds = torch.cat([GT, boxes((6, 8, 0, 2))])  # 3 perfect masks + 1 spurious
    s = torch.tensor([0.9, 0.2, 0.1, 0.8])  # only GT[0] and the spurious one are confident
    views_all = [evaluate_image(preds, s, GT), evaluate_image(GT[:1], torch.tensor([0.9]), GT)]
    views_f = [evaluate_image(preds, s, GT, score_thresh=0.5, nms_iou=0.7),
               evaluate_image(GT[:1], torch.tensor([0.9]), GT, score_thresh=0.5, nms_iou=0.7)]
    return summarize_views(views_all, views_f)


def test_validation_summary_reports_filtered_recall():
    m = _validation_views()
    assert m["recall"] == pytest.approx((1 + 1 / 3) / 2)  # every candidate takes part
    assert m["recall_filtered"] == pytest.approx((1 / 3 + 1 / 3) / 2)  # one confident hit per image
    assert m["micro_recall_filtered"] == pytest.approx(2 / 6)


def test_micro_precision_uses_the_filtered_counts():
    m = _validation_views()
    # 3 confident predictions (2 + 1), 2 of them true: never the unfiltered TP count (4) over 3.
    assert (m["num_pred"], m["num_tp_filtered"], m["num_tp"]) == (3, 2, 4)
    assert m["micro_precision"] == pytest.approx(2 / 3)
    assert m["precision"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["micro_precision"] <= 1.0
