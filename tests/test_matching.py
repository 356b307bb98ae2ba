"""Mask IoU matrix, Hungarian assignment and the candidate foreground rule."""
import time

import numpy as np
import pytest
import torch

from mobilesam_se.matching import hungarian_match, mask_iou_matrix, match_candidates, point_in_masks


def strip(w: int, *ranges: tuple) -> torch.Tensor:
    """(len(ranges), 1, w) bool masks, each True on [a, b) of a one-row image."""
    m = torch.zeros(len(ranges), 1, w, dtype=torch.bool)
    for i, (a, b) in enumerate(ranges):
        m[i, 0, a:b] = True
    return m


def logits_of(masks: torch.Tensor) -> torch.Tensor:
    """Logits whose > 0 binarisation reproduces `masks`."""
    return torch.where(masks, torch.tensor(4.0), torch.tensor(-4.0))


def naive_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(a), len(b))
    for i in range(len(a)):
        for j in range(len(b)):
            union = (a[i] | b[j]).sum().item()
            out[i, j] = (a[i] & b[j]).sum().item() / union if union else 0.0
    return out


def test_iou_matrix_hand_values():
    pred = strip(10, (0, 5), (3, 6), (0, 0))  # last one empty
    gt = strip(10, (0, 5), (5, 10), (0, 0))
    # [3,6) vs [0,5): inter {3,4} = 2, union {0..5} = 6; vs [5,10): inter {5} = 1, union {3..9} = 7.
    # An empty mask has IoU 0 with anything, itself included (empty union).
    expected = torch.tensor([
        [1.0, 0.0, 0.0],
        [2 / 6, 1 / 7, 0.0],
        [0.0, 0.0, 0.0],
    ])
    torch.testing.assert_close(mask_iou_matrix(pred, gt), expected)


def test_iou_matrix_matches_naive_loop_all_input_forms():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(7, 5, 6, generator=g) > 0.5
    gt = torch.rand(4, 5, 6, generator=g) > 0.6
    want = naive_iou(pred, gt)
    torch.testing.assert_close(mask_iou_matrix(pred, gt), want)
    torch.testing.assert_close(mask_iou_matrix(pred.flatten(1).float(), gt.flatten(1).float()), want)
    # A tiny float budget forces the pixel-split path: same counts.
    torch.testing.assert_close(mask_iou_matrix(pred, gt, max_float_bytes=1), want)
    assert mask_iou_matrix(pred[:0], gt).shape == (0, 4)
    assert mask_iou_matrix(pred, gt[:0]).shape == (7, 0)


def test_iou_matrix_exact_counts_under_autocast():
    # bf16 cannot hold 1001; the matmul must stay float32 even inside autocast.
    pred = torch.zeros(1, 2000, dtype=torch.bool)
    pred[0, :1001] = True
    gt = torch.zeros(1, 2000, dtype=torch.bool)
    gt[0, :1500] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        iou = mask_iou_matrix(pred, gt)
    assert iou.dtype == torch.float32
    assert abs(iou.item() - 1001 / 1500) < 1e-6


def test_iou_matrix_large_without_broadcast():
    # A Q x K x HW broadcast here would be 3072*200*65536 bytes = 40 GB; the matmul needs ~0.5 GB.
    q, k, hw = 3072, 200, 256 * 256
    g = torch.Generator().manual_seed(1)
    gt = torch.rand(k, hw, generator=g) > 0.5
    pred = gt[torch.arange(q) % k].clone()
    pred[:, : hw // 4] = False  # candidate q keeps 3/4 of gt q % k
    t0 = time.perf_counter()
    iou = mask_iou_matrix(pred, gt)
    elapsed = time.perf_counter() - t0
    assert iou.shape == (q, k)
    for i, j in [(0, 0), (5, 5), (2999, 2999 % k), (7, 3)]:
        inter = (pred[i] & gt[j]).sum().item()
        union = (pred[i] | gt[j]).sum().item()
        assert abs(iou[i, j].item() - inter / union) < 1e-6
    assert elapsed < 20, elapsed


def test_hungarian_beats_greedy():
    # Greedy takes 0.9 then is left with 0.1 (total 1.0); the optimum is 0.8 + 0.85.
    score = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    pi, gi = hungarian_match(score)
    assert pi.tolist() == [0, 1] and gi.tolist() == [1, 0]
    pi, gi = hungarian_match(score.numpy())
    assert pi.dtype == torch.long and gi.tolist() == [1, 0]


def test_hungarian_rectangular_and_empty():
    pi, gi = hungarian_match(np.array([[0.1, 0.0], [0.2, 0.9], [0.7, 0.3]]))
    assert pi.tolist() == [1, 2] and gi.tolist() == [1, 0]
    for shape in [(0, 3), (3, 0), (0, 0)]:
        pi, gi = hungarian_match(torch.zeros(shape))
        assert pi.numel() == 0 and gi.numel() == 0 and pi.dtype == torch.long


def test_point_in_masks_pixel_convention():
    gt = strip(10, (0, 5), (5, 10))
    pts = torch.tensor([[4.99, 0.3], [5.0, 0.9], [10.0, 0.0], [-1.0, 0.0]])  # last two clamp to edges
    assert point_in_masks(pts, gt).tolist() == [[True, False], [False, True], [False, True], [True, False]]


def test_fg_threshold_is_inclusive_and_flat_index():
    # P=2, M=2. Candidate (p=1, m=0) -> q = 2 covers 2 of gt's 4 pixels: IoU exactly 0.5.
    gt = strip(8, (0, 4))
    cand = strip(8, (6, 8), (7, 8), (0, 2), (4, 8)).reshape(2, 2, 1, 8)
    r = match_candidates(logits_of(cand), gt)
    assert r.pred_idx.tolist() == [2] and r.gt_idx.tolist() == [0]
    assert r.iou.tolist() == [0.5]
    assert r.fg.tolist() == [False, False, True, False]
    assert r.fg_pred_idx.tolist() == [2] and r.fg_gt_idx.tolist() == [0]
    assert r.true_iou.tolist() == [0.0, 0.0, 0.5, 0.0]
    # best IoU of every candidate over gt: [6,8) and [7,8) disjoint, [4,8) disjoint too.
    assert r.best_iou.tolist() == [0.0, 0.0, 0.5, 0.0]
    assert not match_candidates(logits_of(cand), gt, fg_iou=0.51).fg.any()


def test_below_threshold_is_background():
    gt = strip(8, (0, 5))
    cand = strip(8, (0, 2)).reshape(1, 1, 1, 8)  # IoU 2/5
    r = match_candidates(logits_of(cand), gt)
    assert r.pred_idx.tolist() == [0] and abs(r.iou.item() - 0.4) < 1e-7
    assert not r.fg.any() and r.fg_pred_idx.numel() == 0


def test_point_credit_changes_assignment_and_point_fg():
    # Candidate [3,6): IoU 1/3 with A=[0,5), 1/7 with B=[5,10); its prompt point lies in B.
    gt = strip(10, (0, 5), (5, 10))
    cand = logits_of(strip(10, (3, 6))).reshape(1, 1, 1, 10)
    pts = torch.tensor([[7.5, 0.5]])
    plain = match_candidates(cand, gt, pts)
    assert plain.gt_idx.tolist() == [0] and abs(plain.iou.item() - 1 / 3) < 1e-6
    credited = match_candidates(cand, gt, pts, point_credit=1.0)
    assert credited.gt_idx.tolist() == [1] and abs(credited.iou.item() - 1 / 7) < 1e-6
    assert not credited.fg.any()  # credit alone does not make foreground
    boot = match_candidates(cand, gt, pts, point_credit=1.0, point_fg=True)
    assert boot.fg.tolist() == [True] and boot.fg_gt_idx.tolist() == [1]
    # point_fg only counts the point inside the *assigned* gt (A here), so no foreground.
    assert not match_candidates(cand, gt, pts, point_fg=True).fg.any()
    # Without points both options are inert.
    assert match_candidates(cand, gt, None, point_credit=1.0, point_fg=True).gt_idx.tolist() == [0]


def test_point_shared_by_all_candidates_of_a_prompt():
    # P=2, M=2, q = p*M + m. Prompt 0's point is in A, prompt 1's in B. With credit 1, B goes to
    # the prompt-1 candidate with the best IoU: q3 = [4,6) (1/6), not prompt 0's q1 = [9,10) (1/5).
    gt = strip(10, (0, 5), (5, 10))
    cand = logits_of(strip(10, (0, 5), (9, 10), (0, 3), (4, 6))).reshape(2, 2, 1, 10)
    pts = torch.tensor([[1.0, 0.0], [6.0, 0.0]])
    r = match_candidates(cand, gt, pts, point_credit=1.0, point_fg=True)
    assert r.pred_idx.tolist() == [0, 3] and r.gt_idx.tolist() == [0, 1]
    assert r.fg.tolist() == [True, False, False, True]
    assert match_candidates(cand, gt, pts).pred_idx.tolist() == [0, 1]  # without credit IoU decides


def test_no_gt_and_no_grad():
    logits = torch.randn(3, 2, 4, 4, requires_grad=True)
    r = match_candidates(logits, torch.zeros(0, 4, 4, dtype=torch.bool), torch.rand(3, 2) * 4, point_credit=1.0)
    assert r.pred_idx.numel() == 0 and r.iou_matrix.shape == (6, 0)
    assert not r.fg.any() and r.best_iou.tolist() == [0.0] * 6 and r.true_iou.tolist() == [0.0] * 6
    r = match_candidates(logits, torch.ones(1, 4, 4, dtype=torch.bool))
    assert not r.iou_matrix.requires_grad and not r.true_iou.requires_grad


def test_gt_frame_mismatch_raises():
    with pytest.raises(ValueError):
        match_candidates(torch.zeros(1, 1, 4, 4), torch.zeros(1, 8, 8, dtype=torch.bool))
