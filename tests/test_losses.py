"""Mask / IoU losses against explicit formulas, and EverythingLoss bookkeeping and gradients."""
import math

import pytest
import torch

from helpers.losses import everything_loss
from mobilesam_se.losses import (bce_per_mask, dice_loss, dice_per_mask, focal_per_mask,
                                 iou_confidence_bce, iou_mse, sigmoid_bce, sigmoid_focal)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Two 1x2 masks: logits and targets, small enough to write every pixel's loss by hand.
X = [[0.0, 2.0], [-1.0, 3.0]]
T = [[1.0, 0.0], [1.0, 1.0]]
LOGITS = torch.tensor(X).reshape(2, 1, 2)
TARGETS = torch.tensor(T).reshape(2, 1, 2)


def pixel_ce(x: float, t: float) -> float:
    return -math.log(sig(x)) if t == 1 else -math.log(1 - sig(x))


def test_sigmoid_bce_hand():
    per_mask = [(pixel_ce(X[f][0], T[f][0]) + pixel_ce(X[f][1], T[f][1])) / 2 for f in range(2)]
    assert sigmoid_bce(LOGITS, TARGETS).item() == pytest.approx(sum(per_mask) / 2, rel=1e-6)


def test_sigmoid_focal_hand():
    alpha, gamma = 0.25, 2.0

    def fl(x: float, t: float) -> float:
        p = sig(x)
        return alpha * (1 - p) ** gamma * -math.log(p) if t == 1 else (1 - alpha) * p ** gamma * -math.log(1 - p)

    per_mask = [(fl(X[f][0], T[f][0]) + fl(X[f][1], T[f][1])) / 2 for f in range(2)]
    assert sigmoid_focal(LOGITS, TARGETS).item() == pytest.approx(sum(per_mask) / 2, rel=1e-6)
    # gamma = 0 and no alpha weighting reduce to plain BCE.
    assert sigmoid_focal(LOGITS, TARGETS, alpha=-1, gamma=0).item() == pytest.approx(
        sigmoid_bce(LOGITS, TARGETS).item(), rel=1e-6)


def test_dice_hand():
    eps = 1.0
    per_mask = []
    for f in range(2):
        p = [sig(v) for v in X[f]]
        inter = sum(pi * ti for pi, ti in zip(p, T[f]))
        per_mask.append(1 - (2 * inter + eps) / (sum(p) + sum(T[f]) + eps))
    assert dice_loss(LOGITS, TARGETS).item() == pytest.approx(sum(per_mask) / 2, rel=1e-6)


def test_iou_mse_hand():
    assert iou_mse(torch.tensor([0.5, 0.9]), torch.tensor([0.4, 1.0])).item() == pytest.approx(0.01, rel=1e-5)


def test_iou_confidence_bce_clamps():
    eps = 1e-4
    pred = torch.tensor([1.3, -0.2, 0.7], requires_grad=True)
    loss = iou_confidence_bce(pred, torch.tensor([1.0, 0.0, 1.0]), eps=eps)
    want = -(math.log(1 - eps) + math.log(1 - eps) + math.log(0.7)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()
    # Out of [eps, 1-eps] the clamp blocks the gradient; inside it is d/dc -log(c)/3.
    assert pred.grad[0].item() == 0.0 and pred.grad[1].item() == 0.0
    assert pred.grad[2].item() == pytest.approx(-1 / (3 * 0.7), rel=1e-5)


@pytest.mark.parametrize("fn", [sigmoid_bce, sigmoid_focal, dice_loss])
def test_mask_losses_empty_keep_graph(fn):
    base = torch.randn(3, 4, 4, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long)
    loss = fn(base[empty], torch.zeros(0, 4, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert base.grad is not None and not base.grad.any()


def test_iou_losses_empty_keep_graph():
    pred = torch.randn(0, requires_grad=True)
    for loss in (iou_mse(pred, torch.zeros(0)), iou_confidence_bce(pred, torch.zeros(0))):
        assert loss.item() == 0.0 and loss.requires_grad


# EverythingLoss scene: one-row images of width 10, P=3 prompts, M=1.
W = 10


def strip(*ranges: tuple, w: int = W) -> torch.Tensor:
    """(len(ranges), 1, w) bool masks, each True on [a, b)."""
    m = torch.zeros(len(ranges), 1, w, dtype=torch.bool)
    for i, (a, b) in enumerate(ranges):
        m[i, 0, a:b] = True
    return m


def scene():
    """gt A=[0,5), B=[5,10); candidates c0 = A, c1 = [0,4) (IoU 0.8 with A), c2 = B.
    Hungarian: c0-A, c2-B (both IoU 1, foreground); c1 unassigned, best IoU 0.8."""
    gt = strip((0, 5), (5, 10))
    cand = strip((0, 5), (0, 4), (5, 10))
    mag = torch.linspace(0.5, 3.0, 3 * W).reshape(3, 1, W)  # varied magnitudes, sign from the masks
    logits = torch.where(cand, mag, -mag).reshape(3, 1, 1, W).requires_grad_()
    pred_iou = torch.tensor([[0.9], [0.5], [0.7]], requires_grad=True)
    return logits, pred_iou, gt


def test_everything_terms_and_weighted_sum():
    logits, pred_iou, gt = scene()
    weights = dict(w_bce=2.0, w_focal=3.0, w_dice=0.5, w_iou=4.0, w_cls=0.25)
    out = everything_loss(**weights, cls_term="recipe")(logits, pred_iou, gt)
    fg_logits, fg_t = logits[[0, 2], 0], gt.float()
    assert out.terms["bce"].item() == pytest.approx(sigmoid_bce(fg_logits, fg_t).item(), rel=1e-6)
    assert out.terms["focal"].item() == pytest.approx(sigmoid_focal(fg_logits, fg_t).item(), rel=1e-6)
    assert out.terms["dice"].item() == pytest.approx(dice_loss(fg_logits, fg_t).item(), rel=1e-6)
    # IoU targets [1, 0.8 (unassigned -> best), 1].
    assert out.terms["iou"].item() == pytest.approx((0.1 ** 2 + 0.3 ** 2 + 0.3 ** 2) / 3, rel=1e-5)
    # cls labels [1, 0, 1].
    assert out.terms["cls"].item() == pytest.approx(-(math.log(0.9) + math.log(0.5) + math.log(0.7)) / 3, rel=1e-5)
    total = sum(weights["w_" + k] * out.terms[k].item() for k in ("bce", "focal", "dice", "iou", "cls"))
    assert out.terms["loss"].item() == pytest.approx(total, rel=1e-6)
    assert out.num_fg == 2 and out.num_gt == 2 and out.mean_matched_iou == pytest.approx(1.0)
    assert out.matches[0].fg.tolist() == [True, False, True]
    assert set(out.terms) == {"loss", "bce", "focal", "dice", "iou", "cls"}  # tensors only
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.terms.values())


def test_mask_gradients_reach_only_fg_candidates():
    logits, pred_iou, gt = scene()
    everything_loss()(logits, pred_iou, gt).terms["loss"].backward()
    per_cand = logits.grad.abs().flatten(1).sum(1)
    assert per_cand[0] > 0 and per_cand[2] > 0 and per_cand[1] == 0
    assert (pred_iou.grad != 0).all()  # IoU terms cover every candidate


def test_iou_target_assigned_vs_best():
    # gt A=[0,10), B=[10,20). c0=[4,13): IoU 6/13 with A, 3/16 with B; c1 = A.
    # Hungarian gives c1-A, c0-B, so c0's assigned IoU (3/16) differs from its best (6/13).
    gt = strip((0, 10), (10, 20), w=20)
    logits = torch.where(strip((4, 13), (0, 10), w=20), 1.0, -1.0).reshape(2, 1, 1, 20)
    pred_iou = torch.zeros(2, 1)
    assigned = everything_loss(iou_target="assigned")(logits, pred_iou, gt).terms["iou"].item()
    best = everything_loss(iou_target="best")(logits, pred_iou, gt).terms["iou"].item()
    assert assigned == pytest.approx(((3 / 16) ** 2 + 1) / 2, rel=1e-5)
    assert best == pytest.approx(((6 / 13) ** 2 + 1) / 2, rel=1e-5)
    with pytest.raises(ValueError):
        everything_loss(iou_target="zero")


def test_no_gt_zero_mask_terms_with_graph():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    pred_iou = torch.full((2, 3), 0.2, requires_grad=True)
    out = everything_loss(cls_term="recipe")(logits, pred_iou, torch.zeros(0, 4, 4, dtype=torch.bool))
    for k in ("bce", "focal", "dice"):
        assert out.terms[k].item() == 0.0
    assert out.terms["iou"].item() == pytest.approx(0.04, rel=1e-5)  # all targets 0
    assert out.terms["cls"].item() == pytest.approx(-math.log(0.8), rel=1e-5)  # all labels 0
    assert out.num_fg == 0 and out.mean_matched_iou == 0.0
    out.terms["loss"].backward()
    assert logits.grad is not None and not logits.grad.any()


def test_point_options_reach_the_matcher():
    # One low-IoU candidate whose point is inside the gt: foreground only with point_fg.
    gt = strip((0, 5))
    logits = torch.where(strip((4, 6)), 1.0, -1.0).reshape(1, 1, 1, W)
    pts = torch.tensor([[2.0, 0.0]])
    assert everything_loss()(logits, torch.zeros(1, 1), gt, pts).num_fg == 0
    assert everything_loss(point_fg=True)(logits, torch.zeros(1, 1), gt, pts).num_fg == 1


def test_batch_forward_means_over_images():
    crit = everything_loss()
    a = scene()
    b = (torch.randn(2, 3, 4, 4), torch.rand(2, 3), torch.zeros(0, 4, 4, dtype=torch.bool), None)
    out = crit.batch_forward([a, dict(logits=b[0], pred_iou=b[1], gt_lowres=b[2], points_lowres=None)])
    ra, rb = crit(*a), crit(*b)
    for k in ("loss", "bce", "focal", "dice", "iou", "cls"):
        assert out.terms[k].item() == pytest.approx((ra.terms[k].item() + rb.terms[k].item()) / 2, rel=1e-6)
    assert out.num_fg == 2 and out.num_gt == 2 and len(out.matches) == 2
    total = sum(crit.weights[k] * out.terms[k].item() for k in ("bce", "focal", "dice", "iou", "cls"))
    assert out.terms["loss"].item() == pytest.approx(total, rel=1e-6)
    with pytest.raises(ValueError):
        crit.batch_forward([])


def test_point_supervision_picks_best_candidate_of_each_prompt_inside_an_object():
    h = w = 8
    gt = torch.zeros(2, h, w, dtype=torch.bool)
    gt[0, :4, :4] = True  # object A (area 16)
    gt[1, :, 4:] = True  # object B (area 32)
    logits = torch.full((3, 2, h, w), -4.0)
    logits[0, 1, :4, :4] = 4.0  # prompt 0, candidate 1 is A exactly
    logits[1, 0, :, 4:] = 4.0  # prompt 1, candidate 0 is B exactly
    points = torch.tensor([[1.5, 1.5], [6.5, 3.5], [1.5, 6.5]])  # in A, in B, in no object
    loss = everything_loss(point_supervision=True)
    pred, tgt = loss._point_pairs(logits, gt, points)
    assert pred.tolist() == [1, 2] and tgt.tolist() == [0, 1]  # q = p * M + m
    # with point supervision the mask terms see these pairs even when Hungarian pairs are few
    on = loss(logits.clone().requires_grad_(True), torch.zeros(3, 2), gt, points)
    off = everything_loss(point_supervision=False)(logits, torch.zeros(3, 2), gt, points)
    assert on.terms["dice"] < 0.05 and off.terms["dice"] < 0.05  # both exact here; now break prompt 1's mask
    bad = logits.clone()
    bad[1, 0] = -4.0
    bad[1, 1, :, 4:] = 4.0  # candidate 1 of prompt 1 becomes B: still the best of that prompt
    pred2, _ = loss._point_pairs(bad, gt, points)
    assert pred2.tolist() == [1, 3]


def test_zero_iou_filler_assignment_keeps_the_real_iou_target():
    # gt A=[0,5), B=[5,10), C=[10,12) that no candidate overlaps. c0 = A, c1 = [0,4) (a good
    # duplicate of A, IoU 0.8), c2 = B. The Hungarian step still hands C to the free c1 at IoU 0;
    # c1's target must stay its real quality 0.8, not 0.
    gt = strip((0, 5), (5, 10), (10, 12), w=12)
    cand = strip((0, 5), (0, 4), (5, 10), w=12)
    logits = torch.where(cand, 1.0, -1.0).reshape(3, 1, 1, 12)
    pred_iou = torch.zeros(3, 1)
    loss = everything_loss(iou_target="assigned")
    out = loss(logits, pred_iou, gt)
    assert out.matches[0].pred_idx.tolist() == [0, 1, 2]  # c1 really is assigned (to C, at IoU 0)
    assert out.terms["iou"].item() == pytest.approx((1 + 0.8 ** 2 + 1) / 3, rel=1e-5)
    strict = everything_loss(iou_target="assigned_zero")(logits, pred_iou, gt).terms["iou"].item()
    assert strict == pytest.approx((1 + 0 + 1) / 3, rel=1e-5)


def test_iou_over_selects_the_candidates_of_the_mse():
    logits, pred_iou, gt = scene()  # targets [1, 0.8, 1], predictions [0.9, 0.5, 0.7]; fg = c0, c2
    fg = everything_loss(iou_over="fg")(logits, pred_iou, gt).terms["iou"].item()
    assert fg == pytest.approx((0.1 ** 2 + 0.3 ** 2) / 2, rel=1e-5)
    everyone = everything_loss(iou_over="all")(logits, pred_iou, gt).terms["iou"].item()
    assert everyone == pytest.approx((0.1 ** 2 + 0.3 ** 2 + 0.3 ** 2) / 3, rel=1e-5)
    with pytest.raises(ValueError, match="loss.iou_over"):
        everything_loss(iou_over="some")


def test_cls_without_duplicate_negatives():
    logits, pred_iou, gt = scene()  # c1 is background but a good duplicate of A (IoU 0.8)
    recipe = everything_loss(cls_term="recipe")(logits, pred_iou, gt).terms["cls"].item()
    assert recipe == pytest.approx(-(math.log(0.9) + math.log(0.5) + math.log(0.7)) / 3, rel=1e-5)
    no_dup = everything_loss(cls_term="no_duplicates")
    out = no_dup(logits, pred_iou, gt)
    assert out.terms["cls"].item() == pytest.approx(-(math.log(0.9) + math.log(0.7)) / 2, rel=1e-5)
    out.terms["loss"].backward()
    # c1 still gets the MSE's gradient toward its real IoU (0.8 > 0.5: pushed up, not down).
    assert pred_iou.grad[1, 0] < 0


def test_cls_term_off_is_zero_but_keeps_the_graph():
    logits, pred_iou, gt = scene()
    out = everything_loss(cls_term="off")(logits, pred_iou, gt)
    assert out.terms["cls"].item() == 0.0 and out.terms["cls"].requires_grad
    with pytest.raises(ValueError, match="loss.cls_term"):
        everything_loss(cls_term="all")


# One implementation per mask loss: (..., h, w) -> (...), against the textbook formulas in float64.
def reference_terms(x: torch.Tensor, t: torch.Tensor, alpha: float, gamma: float):
    x, t = x.double(), t.double().expand_as(x)
    p = torch.sigmoid(x)
    ce = -(t * torch.log(p) + (1 - t) * torch.log(1 - p))
    p_t = torch.where(t > 0, p, 1 - p)
    a_t = torch.where(t > 0, torch.full_like(p, alpha), torch.full_like(p, 1 - alpha)) if alpha >= 0 else 1.0
    focal = a_t * (1 - p_t) ** gamma * ce
    dice = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    return ce.mean((-2, -1)), focal.mean((-2, -1)), dice


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0)])
def test_per_mask_losses_equal_the_reference_formulas(alpha, gamma):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 9, 11, generator=g) * 3  # logits of 4 prompts x 3 candidates
    targets = torch.rand(4, 1, 9, 11, generator=g) > 0.5  # one target per prompt, broadcast
    bce, focal, dice = reference_terms(logits, targets, alpha, gamma)
    torch.testing.assert_close(bce_per_mask(logits, targets), bce.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(focal_per_mask(logits, targets, alpha, gamma), focal.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dice_per_mask(logits, targets), dice.float(), rtol=1e-5, atol=1e-7)
    # The everything loss's scalar terms are the same functions' means over the masks.
    flat_x, flat_t = logits.flatten(0, 1), targets.expand_as(logits).flatten(0, 1)
    assert torch.equal(sigmoid_bce(flat_x, flat_t), bce_per_mask(flat_x, flat_t).mean())
    assert torch.equal(sigmoid_focal(flat_x, flat_t, alpha, gamma), focal_per_mask(flat_x, flat_t, alpha, gamma).mean())
    assert torch.equal(dice_loss(flat_x, flat_t), dice_per_mask(flat_x, flat_t).mean())


def test_point_supervision_selects_by_the_shared_focal_and_dice():
    g = torch.Generator().manual_seed(1)
    cand = torch.randn(6, 3, 8, 8, generator=g) * 3
    gt = torch.rand(6, 8, 8, generator=g) > 0.5
    for alpha in (0.25, -1.0):  # a negative alpha disables the class weighting here too
        loss = everything_loss(w_focal=15.0, w_dice=1.0, focal_alpha=alpha)
        _, focal, dice = reference_terms(cand, gt[:, None], alpha, 2.0)
        assert loss._best_candidate(cand, gt).tolist() == (15 * focal + dice).argmin(1).tolist()
