"""Soft low-res targets (`dataset.soft_targets`): each cell's object coverage as the mask losses' target."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.hydra_utils import compose_cfg
from helpers.losses import everything_loss
from mobilesam_se.assembly import build_run
from mobilesam_se.data import collate_samples
from mobilesam_se.data.targets import lowres_coverage, lowres_targets
from mobilesam_se.losses import focal_per_mask, sigmoid_focal
from mobilesam_se.objective import _ignore, _visible_coverage

pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


def test_coverage_is_the_share_of_each_cell_and_the_binary_target_its_half():
    # A 64x64 image at image_size 64: 16x16 cells of 4x4 px. A 6x6 square from (2, 2) covers
    # cell (0, 0) by 2x2 = 4/16 px, cell (0, 1) by 2x4 = 8/16 and cell (1, 1) fully.
    m = np.zeros((1, 64, 64), bool)
    m[0, 2:8, 2:8] = True
    cov = lowres_coverage(m, (64, 64), 64)
    assert cov.shape == (1, 16, 16) and cov.dtype == np.float32
    assert cov[0, 0, 0] == pytest.approx(0.25) and cov[0, 0, 1] == pytest.approx(0.5)
    assert cov[0, 1, 1] == pytest.approx(1.0) and cov[0, 2, 2] == 0.0
    assert cov[0].sum() * 16 == pytest.approx(36)  # the area is kept exactly
    np.testing.assert_array_equal(lowres_targets(m, (64, 64), 64), cov >= 0.5)


def test_padding_beyond_the_image_region_has_no_coverage():
    m = np.ones((1, 32, 64), bool)  # a wide image: the low-res region is 8 x 16 of 16 x 16
    cov = lowres_coverage(m, (32, 64), 64)
    assert cov[0, :8].min() == 1.0 and cov[0, 8:].max() == 0.0


def test_a_dataset_returns_coverage_only_when_asked(tmp_path):
    from hydra.utils import instantiate

    for soft in (False, True):
        cfg = compose_cfg(["debug=default", f"dataset.soft_targets={str(soft).lower()}"])
        ds = instantiate(cfg.dataset.train)
        s = ds[0]
        if not soft:
            assert s.coverage_lowres is None
            continue
        assert s.coverage_lowres.dtype == torch.float32 and s.coverage_lowres.shape == s.masks_lowres.shape
        cov = s.coverage_lowres
        assert torch.equal(cov >= 0.5, s.masks_lowres)
        # some cells an edge crosses are neither 0 nor 1
        assert bool(((cov > 0.05) & (cov < 0.95)).any())
        batch = collate_samples([s, ds[1]])
        assert len(batch.coverage_lowres) == 2 and batch.to(torch.device("cpu")).coverage_lowres[1] is not None


def test_soft_focal_equals_focal_on_binary_targets_and_is_least_at_the_target():
    x = torch.tensor([[-3.0, -0.5, 0.0, 0.7, 2.5]])
    t = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0]])
    for alpha in (0.25, -1.0):
        assert torch.allclose(focal_per_mask(x, t, alpha, 2.0, soft=True), focal_per_mask(x, t, alpha, 2.0), atol=1e-6)
    # Unweighted (alpha < 0), the soft loss of target 0.3 is least at sigmoid(x) = 0.3.
    xs = torch.linspace(-4, 4, 801)[:, None, None]
    loss = focal_per_mask(xs, torch.full((1, 1), 0.3), -1.0, 2.0, soft=True)
    assert float(torch.sigmoid(xs.flatten()[loss.argmin()])) == pytest.approx(0.3, abs=0.01)
    # ... and by hand at one pixel: CE * |t - p|^gamma
    p = 1 / (1 + math.exp(0.4))
    ce = -(0.3 * math.log(p) + 0.7 * math.log(1 - p))
    assert float(sigmoid_focal(torch.tensor([[[-0.4]]]), torch.tensor([[[0.3]]]), -1.0, 2.0, soft=True)) == pytest.approx(
        ce * abs(0.3 - p) ** 2, rel=1e-5)


def _scene():
    logits = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, :4, :4] = True
    gt[1, 4:, 3:] = True
    points = torch.tensor([[1.0, 1.0], [5.0, 5.0], [6.0, 6.0], [1.0, 6.0]])
    return logits, torch.rand(4, 3, generator=torch.Generator().manual_seed(1)), gt, points


def test_the_loss_takes_the_soft_target_for_the_mask_terms_only():
    logits, iou, gt, points = _scene()
    loss = everything_loss("bootstrap")
    plain = loss(logits, iou, gt, points).terms
    same = loss(logits, iou, gt, points, soft_lowres=gt.float()).terms
    for k in ("bce", "dice", "iou"):  # binary coverage: the same target
        assert float(same[k]) == pytest.approx(float(plain[k]), rel=1e-6)
    assert float(same["focal"]) == pytest.approx(float(plain["focal"]), rel=1e-5)
    soft = gt.float()
    soft[0, 4, :4] = 0.4  # a partly covered row below object 0
    out = loss(logits, iou, gt, points, soft_lowres=soft)
    assert float(out.terms["bce"]) != pytest.approx(float(plain["bce"]), rel=1e-6)
    assert float(out.terms["iou"]) == pytest.approx(float(plain["iou"]), rel=1e-6)  # matching: binary
    assert torch.equal(out.matches[0].fg, loss(logits, iou, gt, points).matches[0].fg)


def test_the_objective_hands_the_coverage_to_the_loss(tmp_path):
    cfg = compose_cfg(["debug=default", "dataset.soft_targets=true"])
    trainer, cleanup = build_run(cfg, out_dir=Path(tmp_path))
    try:
        objective = trainer.objective
        batch = next(iter(trainer.loader))
        with torch.no_grad():
            out = objective.everything(batch, torch.Generator().manual_seed(2))
            items = lambda soft: [(out.outputs.masks[b].float(), out.outputs.iou_pred[b].float(), out.targets[b],
                                   out.lowres_points[b], _ignore(batch, b), None,
                                   _visible_coverage(batch, b) if soft else None) for b in range(len(batch))]
            # Dice: at init the logits are near 0 and the BCE is ~log 2 whatever the target
            with_soft = objective.criterion.batch_forward(items(True)).terms["dice"]
            binary = objective.criterion.batch_forward(items(False)).terms["dice"]
        assert float(out.terms["dice"]) == pytest.approx(float(with_soft), rel=1e-6)
        assert float(with_soft) != pytest.approx(float(binary), rel=1e-4)
        for b in range(len(batch)):  # the coverage rows are the visible targets' rows
            assert torch.equal(_visible_coverage(batch, b) >= 0.5, out.targets[b])
        assert trainer.fit()["step"] > 0
    finally:
        cleanup()
