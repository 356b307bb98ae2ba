"""Which grid prompts a training step decodes: uniform or balanced over the objects under the grid."""
from pathlib import Path

import pytest
import torch

from helpers.hydra_utils import compose_cfg
from mobilesam_se.assembly import build_run
from mobilesam_se.losses.mask import iou_confidence_bce, iou_mse
from mobilesam_se.objective import point_groups, select_balanced_prompts
from mobilesam_se.prompts import balanced_inclusion, balanced_subsample, subsample_prompts

pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py

# One large object under 60 grid points, three small ones under one point each, 4 background points.
GROUPS = torch.tensor([0] * 60 + [1, 2, 3] + [-1] * 4)


def test_balanced_subsample_draws_k_distinct_sorted_indices_repeatably():
    idx = balanced_subsample(GROUPS, 5, torch.Generator().manual_seed(3))
    assert idx.numel() == 5 and torch.equal(idx, idx.unique())  # unique() sorts
    assert torch.equal(idx, balanced_subsample(GROUPS, 5, torch.Generator().manual_seed(3)))
    assert torch.equal(balanced_subsample(GROUPS, None), torch.arange(67))
    assert torch.equal(balanced_subsample(GROUPS, 67), torch.arange(67))


def test_balanced_subsample_gives_small_objects_the_odds_of_large_ones():
    g = torch.Generator().manual_seed(0)
    small = {60, 61, 62}
    all_small = {"uniform": 0, "balanced": 0}
    large = {"uniform": 0.0, "balanced": 0.0}
    for _ in range(300):
        for mode in all_small:
            idx = subsample_prompts(67, 4, g) if mode == "uniform" else balanced_subsample(GROUPS, 4, g)
            chosen = set(idx.tolist())
            all_small[mode] += small <= chosen
            large[mode] += sum(i < 60 for i in chosen) / 300
    # Uniformly the large object takes ~3.6 of the 4 prompts and the three small ones almost never
    # come together; balanced, the five groups have equal weight, so the large object gets about one
    # prompt and all three small ones come together in about a quarter of the draws.
    assert large["uniform"] > 3.0 and all_small["uniform"] <= 3
    assert large["balanced"] < 1.5 and all_small["balanced"] > 40


def test_point_groups_name_the_first_mask_under_each_point():
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, 4:, 4:] = True
    points = torch.tensor([[1.5, 1.5], [6.2, 5.9], [6.0, 1.0], [7.99, 7.99]])  # xy, low-res frame
    assert point_groups(points, masks).tolist() == [0, 1, -1, 1]
    assert point_groups(points, masks[:0]).tolist() == [-1, -1, -1, -1]  # no visible object


def test_select_balanced_prompts_keeps_the_rows_it_draws_with_their_weights():
    points = torch.arange(2 * 67 * 2, dtype=torch.float32).reshape(2, 67, 2)
    g = torch.Generator().manual_seed(1)
    sel, weights = select_balanced_prompts(points, 5, g, [GROUPS, GROUPS])
    assert sel.shape == (2, 5, 2) and [w.shape for w in weights] == [(5,), (5,)]
    for b in range(2):
        rows = ((sel[b, :, 0] - points[b, 0, 0]) / 2).long()
        assert torch.equal(points[b, rows], sel[b])
        # Small groups (the three small objects, the 4 background points) are kept more often than
        # uniformly (weight < 1), the large object less (weight > 1).
        for r, w in zip(rows.tolist(), weights[b].tolist()):
            assert (w > 1) if r < 60 else (w < 1)
    everything, none = select_balanced_prompts(points, 67, g, [GROUPS, GROUPS])
    assert torch.equal(everything, points) and none is None


def test_balanced_inclusion_estimates_the_samplers_odds():
    g = torch.Generator().manual_seed(5)
    est = balanced_inclusion(GROUPS, 8, g)
    seen = torch.zeros(67)
    for _ in range(2000):
        seen[balanced_subsample(GROUPS, 8, g)] += 1 / 2000
    assert torch.allclose(est.float(), seen, atol=0.05)
    assert est[60:63].min() > 0.7 and est[:60].max() < 0.15  # the small objects are nearly always in
    assert torch.equal(balanced_inclusion(GROUPS, 67), torch.ones(67, dtype=torch.float64))


def test_weighted_sample_means_estimate_the_whole_grid():
    """What the IoU head's weights are for: a mean over the balanced sample, weighted, is the mean
    over the whole grid (as a uniform sample's is); unweighted, it over-represents small objects."""
    value = (GROUPS > 0).float()  # e.g. "the candidate is a good mask": 1 on the three small objects
    points = torch.zeros(1, 67, 2)
    points[0, :, 0] = torch.arange(67, dtype=torch.float32)
    g = torch.Generator().manual_seed(2)
    weighted, plain = 0.0, 0.0
    for _ in range(400):
        sel, w = select_balanced_prompts(points, 8, g, [GROUPS])
        v = value[sel[0, :, 0].long()]
        weighted += float((v * w[0]).sum() / w[0].sum()) / 400
        plain += float(v.mean()) / 400
    grid = float(value.mean())  # 3 / 67
    assert abs(weighted - grid) < 0.03 and plain > 5 * grid


def test_iou_head_terms_take_a_weighted_mean():
    pred = torch.tensor([0.2, 0.8, 0.5])
    true = torch.tensor([0.0, 1.0, 0.0])
    w = torch.tensor([1.0, 1.0, 2.0])
    assert float(iou_mse(pred, true, w)) == pytest.approx((0.04 + 0.04 + 2 * 0.25) / 4)
    assert float(iou_mse(pred, true, torch.ones(3))) == pytest.approx(float(iou_mse(pred, true)))
    labels = torch.tensor([0.0, 1.0, 1.0])
    assert float(iou_confidence_bce(pred, labels, weight=torch.ones(3))) == pytest.approx(
        float(iou_confidence_bce(pred, labels)))
    only_first = float(iou_confidence_bce(pred, labels, weight=torch.tensor([1.0, 0.0, 0.0])))
    assert only_first == pytest.approx(-float(torch.log(torch.tensor(0.8))))


def test_training_with_balanced_prompts_decodes_objects_uniform_misses(tmp_path):
    """One training step of each rule on the same scene: balanced decodes more distinct objects."""
    counts = {}
    for mode in ("uniform", "balanced"):
        cfg = compose_cfg(["debug=default", "dataset.prompts_per_step=6", f"dataset.prompt_sampling={mode}"])
        trainer, cleanup = build_run(cfg, out_dir=Path(tmp_path / mode))
        try:
            batch = next(iter(trainer.loader))
            objective = trainer.objective
            hits = 0
            for seed in range(8):
                out = objective.everything(batch, torch.Generator().manual_seed(seed))
                for b in range(len(batch)):
                    groups = point_groups(out.lowres_points[b], out.targets[b])
                    hits += len(set(groups.tolist()) - {-1})
            counts[mode] = hits
            if mode == "balanced":  # and a run trains with it
                assert trainer.fit()["step"] > 0
        finally:
            cleanup()
    assert counts["balanced"] > counts["uniform"]


def test_unknown_prompt_sampling_names_the_key(tmp_path):
    cfg = compose_cfg(["debug=default", "dataset.prompt_sampling=stratified"])
    with pytest.raises(ValueError, match="dataset.prompt_sampling"):
        build_run(cfg, out_dir=Path(tmp_path))


def test_the_objective_hands_the_sample_weights_to_the_iou_head_terms(tmp_path):
    """The weights reach the loss: the objective's IoU term equals the criterion's with the weights
    the same seeded draw gives, not the unweighted one."""
    from mobilesam_se.objective import _ignore

    cfg = compose_cfg(["debug=default", "dataset.prompts_per_step=6", "dataset.prompt_sampling=balanced"])
    trainer, cleanup = build_run(cfg, out_dir=Path(tmp_path))
    try:
        objective = trainer.objective
        batch = next(iter(trainer.loader))
        with torch.no_grad():
            out = objective.everything(batch, torch.Generator().manual_seed(4))
            groups = [point_groups(objective.model.lowres_coords(batch.points[b]), out.targets[b]) for b in range(len(batch))]
            points, weights = select_balanced_prompts(batch.points, 6, torch.Generator().manual_seed(4), groups)
            assert torch.equal(points, out.points)  # the same draw
            items = lambda w: [(out.outputs.masks[b].float(), out.outputs.iou_pred[b].float(), out.targets[b],
                                out.lowres_points[b], _ignore(batch, b), None if w is None else w[b])
                               for b in range(len(batch))]
            weighted = objective.criterion.batch_forward(items(weights)).terms["iou"]
            plain = objective.criterion.batch_forward(items(None)).terms["iou"]
    finally:
        cleanup()
    assert float(out.terms["iou"]) == pytest.approx(float(weighted), rel=1e-6)
    assert float(weighted) != pytest.approx(float(plain), rel=1e-6)
