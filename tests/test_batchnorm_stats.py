"""BatchNorm statistics estimated once (population statistics) and then kept fixed:
`freeze.batchnorm_stats_epoch` (experiments/learning: with batch 1-2, train-mode statistics are
per-image ones that the eval-mode model never sees)."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers.hydra_utils import compose_cfg
from mobilesam_se.engine.freeze import estimate_batchnorm_stats
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import load_model_weights
from mobilesam_se.assembly import build_run


pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


def test_estimate_gives_population_statistics_and_keeps_the_mode():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.1)
    model = nn.Sequential(conv, bn).eval()
    # images of very different brightness: per-image statistics differ from the population's
    images = [torch.randn(3, 8, 8) + 3 * i for i in range(16)]
    assert estimate_batchnorm_stats(model, images, batch_size=8) == 1
    assert not model.training and bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2
    with torch.no_grad():
        feats = [conv(torch.stack(images[s : s + 8])) for s in (0, 8)]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1, unbiased=True) for f in feats]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-5) and torch.allclose(bn.running_var, var, rtol=1e-4)
    # the spread between images is in the variance (per-image statistics would miss it)
    per_image = torch.stack([conv(x[None]).detach().transpose(0, 1).flatten(1).var(1) for x in images]).mean(0)
    assert (bn.running_var > 2 * per_image).all()


def test_training_keeps_the_estimated_statistics(tmp_path):
    cfg = compose_cfg(["debug=default", "freeze.batchnorm_stats_epoch=0", "freeze.batchnorm_stats_images=3"])
    trainer, cleanup = build_run(cfg, out_dir=Path(tmp_path))
    try:
        trainer.fit()
    finally:
        cleanup()
    bns = [m for m in trainer.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns
    # one estimate forward (3 images, one batch) and no update by any training step after it
    assert all(int(m.num_batches_tracked) == math.ceil(3 / 8) for m in bns)
    # best.pt carries them (official layout)
    model = build_mobilesam(cfg.model.image_size, size=cfg.model.size)
    load_model_weights(model, tmp_path / "checkpoints" / "best.pt")
    ours = trainer.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in model.state_dict().items() if "running_" in k)


def test_from_a_checkpoint_the_loaded_statistics_are_kept(tmp_path):
    def fit(overrides, out):
        cfg = compose_cfg(["debug=default", "trainer.max_epochs=1"] + overrides)
        trainer, cleanup = build_run(cfg, out_dir=Path(out))
        try:
            trainer.fit()
        finally:
            cleanup()
        return trainer

    first = fit([], tmp_path / "a")
    stats = {k: v.clone() for k, v in first.model.state_dict().items() if "running_" in k}
    tuned = fit([f"model.checkpoint={tmp_path / 'a' / 'checkpoints' / 'best.pt'}"], tmp_path / "b")
    after = tuned.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items())  # neither re-estimated nor updated
