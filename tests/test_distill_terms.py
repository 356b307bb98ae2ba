"""Distillation terms as pure functions, the lambda schedule and the mask-teacher pieces."""

import pytest
import torch
import torch.nn.functional as F

from mobilesam_se.distill import mask_teacher as mt
from mobilesam_se.matching import mask_nms
from mobilesam_se.distill import terms as T
from mobilesam_se.distill.plateau import PlateauLambda


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _attention_pair(g):
    """Student attention = softmax of free logits (the tensor the term must be minimal in)."""
    t2i = torch.randn(1, 3, 2, 7, 16, generator=g)
    i2t = torch.randn(1, 3, 2, 16, 7, generator=g)
    return [t2i, i2t]


# Each case: (name, build student/teacher tensors from a leaf, call the term). The leaf is the
# student tensor itself, except for attention where it is the pre-softmax scores.
def _cases():
    g = _gen(1)
    return {
        "encoder_patch": (torch.randn(2, 8, 4, 4, generator=g), lambda s, t: T.encoder_patch(s, t, 1.0, 1.0)),
        "prompt_embed": (torch.randn(2, 5, 7, 8, generator=g), lambda s, t: T.prompt_embed(s, t, 0.7, 0.3)),
        "decoder_mask_token": (torch.randn(2, 5, 3, 8, generator=g), lambda s, t: T.mask_token_kl(s, t, 1.0, 0.5)),
        "dense_mask_logits": (3 * torch.randn(6, 8, 8, generator=g), lambda s, t: T.dense_mask_logits(s, t, 0.6, 0.4, 2.0)),
        "rkd": (torch.randn(10, 12, generator=g), lambda s, t: T.rkd(s, t, 1.0, 2.0)),
        "attention": (
            _attention_pair(g),
            lambda s, t: T.attention_maps(
                {"token_to_image": [s[0].softmax(-1)], "image_to_token": [s[1].softmax(-1)]},
                {"token_to_image": [t[0].softmax(-1)], "image_to_token": [t[1].softmax(-1)]},
                1.0,
            ),
        ),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_term_is_zero_and_minimal_at_the_teacher(name):
    teacher, fn = _cases()[name]
    leaves = [x.clone().requires_grad_() for x in (teacher if isinstance(teacher, list) else [teacher])]
    student = leaves if isinstance(teacher, list) else leaves[0]
    out = fn(student, teacher)
    assert set(out) >= {"loss"} and all(v.dim() == 0 for v in out.values())
    assert abs(float(out["loss"].detach())) < 1e-5, out
    out["loss"].backward()
    for leaf in leaves:
        assert leaf.grad.abs().max() < 1e-5, f"{name}: gradient {leaf.grad.abs().max()} at the minimum"
    g = _gen(7)
    for scale in (1e-2, 1e-1):
        moved = [x + scale * torch.randn(x.shape, generator=g) for x in (teacher if isinstance(teacher, list) else [teacher])]
        worse = fn(moved if isinstance(teacher, list) else moved[0], teacher)["loss"]
        assert float(worse) > 1e-7, f"{name}: a perturbation of {scale} did not increase the term"


def test_terms_detach_the_teacher():
    teacher = torch.randn(2, 8, 4, 4, requires_grad=True)
    student = torch.randn(2, 8, 4, 4, requires_grad=True)
    T.encoder_patch(student, teacher)["loss"].backward()
    assert teacher.grad is None and student.grad is not None


def test_dense_kl_is_not_the_one_class_trap():
    """A KL on the positive class only, p_t log(p_t / p_s), is lowest for an all-foreground student;
    the two-class Bernoulli KL is lowest at the teacher and optimising it recovers the teacher."""
    g = _gen(3)
    teacher = 4 * torch.randn(8, 16, 16, generator=g)  # ~half foreground
    all_fg = torch.full_like(teacher, 12.0)

    def one_class_kl(s, t):
        p_t, p_s = torch.sigmoid(t), torch.sigmoid(s)
        return (p_t * (p_t.log() - p_s.log())).mean()

    # The trap exists: the one-class KL prefers the all-foreground student to the teacher itself.
    assert one_class_kl(all_fg, teacher) < one_class_kl(teacher, teacher)
    # Ours does not.
    ours = lambda s: T.dense_mask_logits(s, teacher, 1.0, 0.0)["loss"]  # noqa: E731
    assert ours(all_fg) > ours(teacher) + 1.0
    assert T.dense_mask_logits(all_fg, teacher, 0.0, 1.0)["focal"] > T.dense_mask_logits(teacher, teacher, 0.0, 1.0)["focal"] + 0.1
    # Gradient descent from all-foreground goes back to the teacher's foreground fraction.
    s = all_fg.clone().requires_grad_()
    opt = torch.optim.Adam([s], lr=0.5)
    for _ in range(150):
        opt.zero_grad()
        T.dense_mask_logits(s, teacher, 0.6, 0.4)["loss"].backward()
        opt.step()
    fg_s, fg_t = (s > 0).float().mean(), (teacher > 0).float().mean()
    assert abs(float(fg_s - fg_t)) < 0.05, (float(fg_s), float(fg_t))
    assert (torch.sigmoid(s) - torch.sigmoid(teacher)).abs().mean() < 0.05


def test_bernoulli_kl_matches_its_definition():
    s, t = torch.randn(3, 5, 5), torch.randn(3, 5, 5)
    p_s, p_t = torch.sigmoid(s), torch.sigmoid(t)
    ref = p_t * (p_t / p_s).log() + (1 - p_t) * ((1 - p_t) / (1 - p_s)).log()
    assert torch.allclose(T.bernoulli_kl(s, t), ref, atol=1e-5)


def test_mask_token_kl_definition_and_temperature_scaling():
    s, t = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    temp = 0.5
    p_t = F.softmax(t / temp, -1)
    ref = (p_t * (p_t.log() - F.log_softmax(s / temp, -1))).sum(-1).mean() * temp**2
    assert torch.allclose(T.mask_token_kl(s, t, 1.0, temp)["kl"], ref, atol=1e-6)


def test_rkd_works_on_one_image_and_across_widths():
    g = _gen(4)
    t = torch.randn(12, 20, generator=g)
    # A rotation + uniform scale of the teacher keeps every distance ratio and angle.
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=g))
    assert float(T.rkd(3.0 * t @ q, t)["loss"]) < 1e-5
    # Different widths: relations still compare.
    s = torch.randn(12, 6, generator=g, requires_grad=True)
    out = T.rkd(s, t)
    out["loss"].backward()
    assert out["loss"] > 0 and s.grad.abs().sum() > 0


def test_shape_mismatch_names_the_term():
    with pytest.raises(ValueError, match="encoder_patch"):
        T.encoder_patch(torch.zeros(1, 32, 4, 4), torch.zeros(1, 256, 4, 4))


def test_dense_gamma_below_one_is_rejected():
    with pytest.raises(ValueError, match="gamma"):
        T.dense_mask_logits(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), gamma=0.5)


# -- lambda schedule ------------------------------------------------------------------------------
def test_plateau_lambda_moves_after_patience_and_clips():
    sched = PlateauLambda(1.0, enabled=True, factor=0.5, patience=1, min=0.3, max=10.0, mode="max")
    assert [sched.step(s) for s in (0.5, 0.6, 0.6, 0.55)] == [1.0, 1.0, 1.0, 0.5]  # 2 bad > patience 1
    assert sched.step(float("nan")) == 0.5 and sched.step(0.1) == 0.3  # clipped at min
    state = sched.state_dict()
    again = PlateauLambda(9.0, enabled=True, factor=0.5, patience=1, min=0.3)
    again.load_state_dict(state)
    assert again.state_dict() == state
    assert PlateauLambda(2.0, enabled=False).step(0.0) == 2.0
    up = PlateauLambda(1.0, enabled=True, factor=2.0, patience=0, max=3.0, mode="min")
    assert [up.step(s) for s in (1.0, 2.0, 2.0)] == [1.0, 2.0, 3.0]


# -- mask teacher -----------------------------------------------------------------------------------
def _box(y0, y1, x0, x1, side=16):
    m = torch.zeros(side, side, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_nms_keeps_the_best_of_duplicates():
    masks = torch.stack([_box(0, 8, 0, 8), _box(0, 8, 0, 7), _box(8, 16, 8, 16)])
    keep = mask_nms(masks, torch.tensor([0.9, 0.95, 0.5]), 0.7)
    assert keep.tolist() == [1, 2]


def test_select_candidates_filters_by_predicted_iou_and_clips_padding():
    logits = torch.stack([_box(0, 16, 0, 16), _box(0, 4, 12, 16), _box(0, 4, 0, 4)]).float() * 20 - 10
    region = mt.region_mask((16, 10), 16, torch.device("cpu"))  # columns >= 10 are padding
    kept, scores = mt.select_candidates(logits, torch.tensor([0.95, 0.99, 0.5]), 0.88, region)
    # #1 lies only in the padding -> empty after clipping; #2 is not confident enough.
    assert scores.tolist() == [pytest.approx(0.95)] and kept.shape == (1, 16, 16)
    assert not (kept[0, :, 10:] > 0).any() and (kept[0, :, :10] > 0).all()


def test_replace_gt_keeps_gt_and_adds_unannotated_teacher_masks():
    gt = torch.stack([_box(0, 6, 0, 6), _box(10, 16, 10, 16), _box(0, 4, 10, 16)])
    teacher = torch.stack([
        _box(0, 6, 0, 5),  # the first GT object, IoU 5/6: replaced by that GT
        _box(8, 10, 0, 4),  # not annotated: added
        _box(0, 8, 10, 16),  # overlaps the third GT at IoU 0.5 < 0.6: kept as its own target
    ])
    targets, counts = mt.replace_with_gt(teacher, gt, iou_threshold=0.6)
    assert counts == {"replaced": 1, "added": 2, "duplicates": 0}
    assert targets.shape == (5, 16, 16)
    assert all(torch.equal(targets[i], gt[i]) for i in range(3))  # every GT stays, the matched one in place of the teacher's
    assert torch.equal(targets[3], teacher[1]) and torch.equal(targets[4], teacher[2])
    # Degenerate sides.
    assert mt.replace_with_gt(teacher[:0], gt, 0.5)[0].shape[0] == 3
    assert mt.replace_with_gt(teacher, gt[:0], 0.5)[1] == {"replaced": 0, "added": 3, "duplicates": 0}


def test_replace_gt_adds_no_duplicate_of_an_annotated_object():
    # Two teacher masks at IoU 0.8 with one GT mask: one stands for it (replaced), the other is a
    # second copy of the same object and must not become a new target.
    gt = _box(0, 10, 0, 10)[None]
    teacher = torch.stack([_box(0, 10, 0, 8), _box(0, 8, 0, 10), _box(12, 16, 12, 16)])
    iou = [float((t & gt[0]).sum()) / float((t | gt[0]).sum()) for t in teacher[:2]]
    assert iou == [0.8, 0.8]
    targets, counts = mt.replace_with_gt(teacher, gt, iou_threshold=0.5)
    assert counts == {"replaced": 1, "added": 1, "duplicates": 1}
    assert targets.shape[0] == 2 and torch.equal(targets[0], gt[0]) and torch.equal(targets[1], teacher[2])


def test_dual_supervision_soft_term_is_minimal_with_zero_gradient_at_the_teacher():
    g = _gen(3)
    teacher_logits = 4 * torch.randn(2, 16, 16, generator=g)
    probs = torch.sigmoid(teacher_logits)
    at = teacher_logits.clone().requires_grad_()
    dice = T.soft_dice(at, probs)
    dice.backward()
    assert abs(float(dice.detach())) < 1e-5 and float(at.grad.abs().max()) < 1e-6
    # A sharper student (same signs, larger logits) and a blurred one both score worse.
    for other in (3 * teacher_logits, 0.3 * teacher_logits, teacher_logits + 0.1 * torch.randn(2, 16, 16, generator=g)):
        assert float(T.soft_dice(other, probs)) > float(dice) + 1e-6
    # The whole dual-supervision loss (KL + dice) at the teacher: zero, no gradient.
    tm = mt.TeacherMasks(teacher_logits.clamp(-6, 6), torch.tensor([0.95, 0.9]))
    student = tm.logits.clone()[:, None].requires_grad_()  # 2 prompts x 1 candidate = the teacher masks
    out = mt.dual_supervision_loss(student, tm, None, fg_iou=0.0)
    out["loss"].backward()
    assert out["pairs"] == 2 and abs(float(out["loss"])) < 1e-5 and float(student.grad.abs().max()) < 1e-6


def test_dual_supervision_pulls_matched_candidates_toward_the_teacher():
    teacher_logits = torch.stack([_box(0, 8, 0, 8), _box(8, 16, 8, 16)]).float() * 12 - 6
    tm = mt.TeacherMasks(teacher_logits, torch.tensor([0.95, 0.9]))
    # Two prompts, one candidate each: a rough version of each teacher mask.
    student = torch.stack([_box(0, 7, 0, 8), _box(9, 16, 8, 16)]).float()[:, None] * 4 - 2
    student.requires_grad_()
    out = mt.dual_supervision_loss(student, tm, None, fg_iou=0.5)
    assert out["pairs"] == 2 and out["loss"] > 0
    out["loss"].backward()
    # Missing rows of the first object: the gradient raises those logits (descent = -grad > 0).
    assert (student.grad[0, 0, 7, :8] < 0).all()
    # Nothing matches at fg_iou -> zero, still differentiable.
    far = torch.full((1, 1, 16, 16), -5.0, requires_grad=True)
    zero = mt.dual_supervision_loss(far, tm, None, fg_iou=0.5)
    zero["loss"].backward()
    assert float(zero["loss"]) == 0 and zero["pairs"] == 0
