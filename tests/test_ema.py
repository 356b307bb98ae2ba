"""trainer.ema_decay: validation and best.pt see an exponential moving average of the weights."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers.hydra_utils import compose_cfg
from mobilesam_se.assembly import build_run
from mobilesam_se.engine.ema import WeightEMA
from mobilesam_se.models.checkpoint import load_model_weights

pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


def fit(overrides, out_dir):
    cfg = compose_cfg(["debug=default", *overrides])
    trainer, cleanup = build_run(cfg, out_dir=Path(out_dir))
    try:
        return trainer, trainer.fit()
    finally:
        cleanup()


def test_average_follows_its_formula_and_applied_swaps_back():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(net, decay=0.5)
    w0 = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.fill_(4.0)
    ema.update()  # ramp: min(0.5, 2 / 11) -> keep 2/11 of the old, take 9/11 of the new
    d = 2 / 11
    expect = d * w0 + (1 - d) * (w0 + 1.0)
    live = net[0].weight.detach().clone()
    with ema.applied():
        assert torch.allclose(net[0].weight, expect)
        assert torch.allclose(net[1].running_mean, torch.full((2,), (1 - d) * 4.0))  # buffers averaged too
    assert torch.equal(net[0].weight, live)  # training weights back after the block
    assert net[1].running_mean.tolist() == [4.0, 4.0]
    for _ in range(50):
        ema.update()
    with ema.applied():  # a constant weight: the average converges to it
        assert torch.allclose(net[0].weight, live, atol=1e-6)
    with pytest.raises(ValueError, match="trainer.ema_decay"):
        WeightEMA(net, decay=1.0)


def test_best_pt_holds_the_average_and_a_resume_continues_it(tmp_path):
    common = ["trainer.ema_decay=0.9", "dataset.batch_size=1", "dataset.prompts_per_step=6",
              "trainer.val_every=2"]  # one validation, at the end: best.pt is the final average
    full, res = fit(common, tmp_path / "a")
    assert res["step"] == 8
    best_model = copy.deepcopy(full.model)
    load_model_weights(best_model, tmp_path / "a" / "checkpoints" / "best.pt")  # official layout
    best = best_model.state_dict()
    shadow = full.ema.state_dict()["shadow"]
    live = full.model.state_dict()
    trained = [k for k in shadow if not torch.equal(shadow[k], live[k].cpu())]
    assert trained, "the average equals the training weights: nothing was averaged"
    for k in trained:
        assert torch.equal(best[k], shadow[k]), k  # best.pt: the average, not the last weights

    fit(common + ["trainer.max_steps=5"], tmp_path / "b")  # stopped mid-epoch 1
    resumed, res_b = fit(common, tmp_path / "b")
    assert res_b["step"] == 8 and resumed.ema.updates == full.ema.updates == 8
    again = resumed.ema.state_dict()["shadow"]
    for k in shadow:
        assert torch.equal(again[k], shadow[k]), k
