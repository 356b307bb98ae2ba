"""Prompted fine-tuning: prompt sampling, SAM's best-of-3 loss, one encode per image, simulated clicks."""
import math

import numpy as np
import pytest
import torch

from mobilesam_se.data.sample import Batch
from mobilesam_se.evaluation.prompted import evaluate_promptable
from mobilesam_se.models.mask_decoder import DecoderOutput
from mobilesam_se.prompted import (
    PromptedLoss, PromptedLossWeights, PromptSampling, best_candidate_loss, corrective_click, interior_point,
    sample_prompts,
)
from mobilesam_se.prompted.sampling import mask_box
from mobilesam_se.transforms import postprocess_masks

S = 256  # model input side: low-res frame 64 x 64
INPUT_HW = (192, 256)  # a 3:4 image after the resize: low-res image region 48 x 64


def constructed_masks() -> torch.Tensor:
    """Four low-res objects of different shapes, plus one empty (invisible) object."""
    m = torch.zeros(5, S // 4, S // 4, dtype=torch.bool)
    m[0, 2:10, 3:20] = True  # a bar near the top-left corner
    m[1, 20:22, 30:31] = True  # two cells: fewer than max_points
    m[2, 30:47, 50:64] = True  # touches the right edge of the image region
    m[3, 12:16, 5:9] = True
    m[3, 14:18, 40:44] = True  # two parts
    return m


# ---- prompt sampling ----------------------------------------------------------------------------
def test_point_prompts_inside_negatives_outside_padding():
    masks = constructed_masks()
    cfg = PromptSampling(prompt_mode="point", max_objects=10, min_points=2, max_points=4, negative_points=3)
    for seed in range(20):
        p = sample_prompts(masks, INPUT_HW, S, cfg, torch.Generator().manual_seed(seed))
        assert p.index.tolist() == [0, 1, 2, 3]  # the empty object is never prompted
        assert p.coords.shape == (4, 7, 2) and p.labels.shape == (4, 7) and not p.use_box.any()
        for row, obj in enumerate(p.index.tolist()):
            labels = p.labels[row]
            n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
            assert 2 <= n_pos <= 4 and n_neg == 3
            # positives first, then negatives, then padding at (0, 0)
            assert labels.tolist() == [1] * n_pos + [0] * n_neg + [-1] * (7 - n_pos - n_neg)
            assert (p.coords[row][labels == -1] == 0).all()
            cells = (p.coords[row] // 4).long()  # xy -> the low-res cell each point lies in
            for (cx, cy), lab in zip(cells.tolist(), labels.tolist()):
                if lab == 1:
                    assert masks[obj, cy, cx]
                elif lab == 0:
                    assert not masks[obj, cy, cx] and cy < 48 and cx < 64  # outside, in the image


def test_box_prompts_within_shift_and_image():
    masks = constructed_masks()
    shift = 6
    cfg = PromptSampling(prompt_mode="box", max_objects=10, max_bbox_shift=shift)
    moved = False
    for seed in range(30):
        p = sample_prompts(masks, INPUT_HW, S, cfg, torch.Generator().manual_seed(seed))
        assert p.use_box.all() and (p.labels == -1).all()
        for row, obj in enumerate(p.index.tolist()):
            true = mask_box(masks[obj])
            box = p.boxes[row]
            assert (box - true).abs().max() <= shift
            assert box[0] <= box[2] and box[1] <= box[3]
            assert 0 <= box[0] and box[2] <= INPUT_HW[1] and 0 <= box[1] and box[3] <= INPUT_HW[0]
            moved |= bool((box != true).any())
    assert moved
    # the true box: the outer edges of the object's cells; object 2 ends at the image's right edge
    assert mask_box(masks[2]).tolist() == [200, 120, 256, 188]
    exact = sample_prompts(masks, INPUT_HW, S, PromptSampling(prompt_mode="box", max_bbox_shift=0),
                           torch.Generator().manual_seed(0))
    assert torch.equal(exact.boxes, torch.stack([mask_box(masks[i]) for i in exact.index]))


def test_mixed_prompts_object_cap_and_determinism():
    masks = constructed_masks()
    cfg = PromptSampling(prompt_mode="mixed", max_objects=3)
    kinds = set()
    for seed in range(10):
        p = sample_prompts(masks, INPUT_HW, S, cfg, torch.Generator().manual_seed(seed))
        q = sample_prompts(masks, INPUT_HW, S, cfg, torch.Generator().manual_seed(seed))
        assert len(p) == 3 and set(p.index.tolist()) <= {0, 1, 2, 3}
        assert torch.equal(p.coords, q.coords) and torch.equal(p.boxes, q.boxes) and torch.equal(p.index, q.index)
        kinds |= set(p.use_box.tolist())
        assert ((p.labels == 1).sum(1) > 0).tolist() == (~p.use_box).tolist()
    assert kinds == {True, False}


def test_invalid_sampling_config():
    with pytest.raises(ValueError, match="prompt_mode"):
        PromptSampling(prompt_mode="scribble")
    with pytest.raises(ValueError, match="min_points"):
        PromptSampling(min_points=3, max_points=2)


# ---- SAM's best-of-3 loss -----------------------------------------------------------------------
def _focal(logits, target, alpha=0.25, gamma=2.0):
    total = 0.0
    for x, y in zip(logits, target):
        p = 1 / (1 + math.exp(-x))
        ce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        p_t = p if y else 1 - p
        total += ce * (1 - p_t) ** gamma * (alpha if y else 1 - alpha)
    return total / len(logits)


def _dice(logits, target):
    p = [1 / (1 + math.exp(-x)) for x in logits]
    return 1 - (2 * sum(a * b for a, b in zip(p, target)) + 1) / (sum(p) + sum(target) + 1)


def test_best_of_three_hand_computed():
    target = [1, 1, 0, 0]
    cands = [[2.0, 2.0, 2.0, 2.0], [0.5, 0.5, -3.0, -3.0], [4.0, 4.0, 1.0, -4.0]]
    focal = [_focal(c, target) for c in cands]
    dice = [_dice(c, target) for c in cands]
    # Candidate 1 wins on 20 * focal + dice, candidate 2 on dice alone: the weighting decides.
    assert int(np.argmin([20 * f + d for f, d in zip(focal, dice)])) == 1 and int(np.argmin(dice)) == 2
    true_iou = [2 / 4, 1.0, 2 / 3]  # IoU of (logits > 0) with the target
    iou_pred = [0.3, 0.1, 0.9]
    logits = torch.tensor(cands).view(1, 3, 1, 4).requires_grad_()
    t = torch.tensor(target, dtype=torch.bool).view(1, 1, 4)
    out = best_candidate_loss(logits, torch.tensor([iou_pred]), t, PromptedLossWeights())
    mse = sum((a - b) ** 2 for a, b in zip(iou_pred, true_iou)) / 3
    assert out["best"].tolist() == [1]
    assert out["focal"].item() == pytest.approx(focal[1], rel=1e-5)
    assert out["dice"].item() == pytest.approx(dice[1], rel=1e-5)
    assert out["iou"].item() == pytest.approx(mse, rel=1e-5)
    assert out["loss"].item() == pytest.approx(20 * focal[1] + dice[1] + mse, rel=1e-5)
    # Only the chosen candidate receives the mask gradient.
    out["loss"].backward()
    grad_norm = logits.grad.abs().sum(-1).flatten()
    assert grad_norm[1] > 0 and grad_norm[0] == 0 and grad_norm[2] == 0
    dice_only = best_candidate_loss(logits, torch.tensor([iou_pred]), t, PromptedLossWeights(focal=0.0, dice=1.0))
    assert dice_only["best"].tolist() == [2]


def test_best_of_three_matches_repo_mask_losses():
    from mobilesam_se.losses.mask import dice_loss, sigmoid_focal

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 1, 8, 8, generator=g) * 3
    targets = torch.rand(4, 8, 8, generator=g) > 0.5
    out = best_candidate_loss(logits, torch.zeros(4, 1), targets, PromptedLossWeights())
    assert out["focal"].item() == pytest.approx(sigmoid_focal(logits[:, 0], targets).item(), rel=1e-5)
    assert out["dice"].item() == pytest.approx(dice_loss(logits[:, 0], targets).item(), rel=1e-5)
    empty = best_candidate_loss(logits[:0].requires_grad_(), torch.zeros(0, 1), targets[:0], PromptedLossWeights())
    assert empty["loss"].item() == 0.0 and empty["loss"].requires_grad


# ---- one image embedding per image -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    from mobilesam_se.models.build import build_mobilesam

    torch.manual_seed(0)
    return build_mobilesam(S, size="tiny")


def _count_calls(monkeypatch, model, name):
    calls = []
    original = getattr(model, name)

    def wrapped(*args, **kwargs):
        calls.append(args[0].shape[0] if args else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, name, wrapped)
    return calls


def test_single_mode_encodes_each_image_once(tiny_model, monkeypatch):
    masks = constructed_masks()
    batch = Batch(image=torch.randn(2, 3, S, S), masks_lowres=[masks, masks[:3]], input_size=[INPUT_HW, INPUT_HW])
    loss = PromptedLoss(PromptSampling(prompt_mode="mixed", max_objects=16, negative_points=1), PromptedLossWeights())
    encodes = _count_calls(monkeypatch, tiny_model, "encode")
    decodes = _count_calls(monkeypatch, tiny_model, "decode")
    tiny_model.zero_grad(set_to_none=True)
    out = loss(tiny_model, batch, None, torch.device("cpu"), None, torch.Generator().manual_seed(1))
    assert encodes == [2]  # one call for the batch: each image once, whatever its object count
    assert 2 <= len(decodes) <= 4 and all(b == 1 for b in decodes)  # per image: a box group and a point group
    assert out["prompted/num_objects"].item() == 4 + 3
    assert set(out) == {"loss", "prompted/focal", "prompted/dice", "prompted/iou", "prompted/num_objects"}
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.image_encoder.parameters())


def test_mixed_mode_reuses_everything_embeddings(tiny_model, monkeypatch):
    masks = constructed_masks()
    pixels = torch.randn(1, 3, S, S)
    embeddings = tiny_model.encode(pixels)
    batch = Batch(image=pixels, masks_lowres=[masks], input_size=[INPUT_HW])
    encodes = _count_calls(monkeypatch, tiny_model, "encode")
    plain = PromptedLoss(PromptSampling(), PromptedLossWeights())
    weighted = PromptedLoss(PromptSampling(), PromptedLossWeights(), weight=0.25)
    a = plain(tiny_model, batch, embeddings, torch.device("cpu"), None, torch.Generator().manual_seed(3))
    b = weighted(tiny_model, batch, embeddings, torch.device("cpu"), None, torch.Generator().manual_seed(3))
    assert encodes == []
    assert b["loss"].item() == pytest.approx(0.25 * a["loss"].item(), rel=1e-5)
    assert b["prompted/dice"].item() == pytest.approx(a["prompted/dice"].item(), rel=1e-6)


# ---- simulated clicks ---------------------------------------------------------------------------
def test_interior_point_is_the_centre():
    m = np.zeros((40, 60), bool)
    m[10:21, 20:51] = True  # 11 x 31 rectangle, centre (35, 15)
    assert interior_point(m) == (35, 15)
    edge = np.zeros((40, 60), bool)
    edge[:, :9] = True  # touches the image border: the border counts as a boundary
    assert interior_point(edge)[0] == 4
    assert interior_point(np.zeros((4, 4), bool)) is None


def test_corrective_click_on_largest_error_region():
    gt = np.zeros((60, 80), bool)
    gt[10:50, 10:70] = True
    pred = gt.copy()
    pred[30:50, 40:70] = False  # missed: 20 x 30 block, centre (54.5, 39.5)
    pred[0:5, 0:5] = True  # a small false positive
    c = corrective_click(pred, gt)
    assert c.positive and 52 <= c.x <= 57 and 37 <= c.y <= 42 and gt[c.y, c.x] and not pred[c.y, c.x]
    # A false positive larger than any miss: a negative click at its centre.
    pred2 = gt.copy()
    pred2[10:14, 10:14] = False  # missed: 16 pixels
    pred2[52:60, 0:40] = True  # false positive: 8 x 40, touches the bottom border
    c2 = corrective_click(torch.from_numpy(pred2), torch.from_numpy(gt))
    assert not c2.positive and not gt[c2.y, c2.x] and pred2[c2.y, c2.x]
    assert 55 <= c2.y <= 56 and 18 <= c2.x <= 21
    assert corrective_click(gt, gt) is None


class OracleStub(torch.nn.Module):
    """A fake SAM whose candidate 0 is exactly the prompted object and candidate 1 is empty, while
    its IoU head prefers candidate 1: the oracle rule must score 1, the predicted rule 0."""

    image_size = 64

    def __init__(self, lowres_gt: torch.Tensor) -> None:
        super().__init__()
        self.gt = lowres_gt  # (K, 16, 16)
        self.encodes = 0
        self.decoded_points = []

    def encode(self, pixels):
        self.encodes += 1
        return torch.zeros(pixels.shape[0], 8, 4, 4)

    def decode(self, emb, coords=None, labels=None, boxes=None, mask_input=None, multimask_output=True,
               points_per_batch=None):
        lead = coords if coords is not None else boxes
        B, P = lead.shape[:2]
        if coords is not None:
            self.decoded_points.append(labels.clone())
            xy = coords[:, :, 0]  # the first point is the object's centre
        else:
            xy = (boxes[..., :2] + boxes[..., 2:]) / 2
        masks = torch.full((B, P, 3, 16, 16), -10.0)
        for b in range(B):
            for p in range(P):
                x, y = (xy[b, p] // 4).long().tolist()
                obj = int(torch.nonzero(self.gt[:, y, x])[0])
                masks[b, p, 0][self.gt[obj]] = 10.0
        iou = torch.tensor([0.1, 0.9, 0.2]).expand(B, P, 3)
        return DecoderOutput(masks=masks, iou_pred=iou)


def test_evaluate_promptable_selection_rules_and_clicks():
    lowres = torch.zeros(2, 16, 16, dtype=torch.bool)
    lowres[0, 2:8, 1:7] = True
    lowres[1, 10:15, 9:15] = True
    # The ground truth is what the stub's candidate 0 becomes at full resolution (bilinear
    # upsampling rounds the rectangles' corners), so that candidate is exact.
    full = postprocess_masks(torch.where(lowres, 10.0, -10.0), (64, 64), (64, 64), 64) > 0
    model = OracleStub(lowres)
    batch = Batch(image=torch.zeros(1, 3, 64, 64), masks=[torch.cat([full, torch.zeros(1, 64, 64, dtype=torch.bool)])],
                  input_size=[(64, 64)], orig_size=[(64, 64)])
    out = evaluate_promptable(model, [batch], torch.device("cpu"), True, num_clicks=(1, 3, 5))
    assert model.encodes == 1 and out["num_objects"] == 2  # the empty mask is skipped
    for name in ("point", "box", "click1", "click3", "click5"):
        assert out[f"{name}_miou_oracle"] == pytest.approx(1.0)
        assert out[f"{name}_miou_pred"] == pytest.approx(0.0)
    # The oracle user never needs to click; the predicted-rule user clicks (positive, since the
    # shown mask is empty) once per round, each click added to the prompt.
    last = model.decoded_points[-1]
    assert last.shape == (1, 2, 6) and (last == 1).all()
    assert [lab.shape[-1] for lab in model.decoded_points] == [1, 2, 3, 4, 5, 6]


def test_evaluate_promptable_tiny_model(tiny_model):
    g = torch.Generator().manual_seed(0)
    full = torch.zeros(3, 96, 128, dtype=torch.bool)
    full[0, 10:40, 10:60] = True
    full[1, 50:90, 70:120] = True
    full[2, 60:70, 5:30] = True
    batch = Batch(image=torch.randn(1, 3, S, S, generator=g), masks=[full], input_size=[(192, 256)],
                  orig_size=[(96, 128)])
    for use_mask_input, clicks in ((False, (1, 2)), (True, (1,))):
        out = evaluate_promptable(tiny_model, [batch, batch], torch.device("cpu"), True, num_clicks=clicks,
                                  max_images=1, use_mask_input=use_mask_input)
        assert out["num_objects"] == 3
        names = ("point", "box", *(f"click{n}" for n in clicks))
        assert set(out) == {f"{n}_miou_{r}" for n in names for r in ("oracle", "pred")} | {"num_objects"}
        for k, v in out.items():
            if k != "num_objects":
                assert 0.0 <= v <= 1.0
                assert out[k.replace("_pred", "_oracle")] >= v - 1e-6
