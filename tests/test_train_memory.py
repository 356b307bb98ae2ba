"""The memory-lean everything step (issue 14, item 5) computes what the plain step computes.

Checkpointed pieces capped below points_per_batch, the heap released per piece, the point-supervision
candidates scored in pieces and the bool-count ignore test must give the same loss terms and the same
gradients as one un-checkpointed pass over all prompts.
"""
from __future__ import annotations

from typing import Dict, Tuple

import pytest
import torch

import mobilesam_se.losses.everything as everything_loss
import mobilesam_se.models.sam as sam_module
from helpers import losses as loss_helpers
from mobilesam_se.data.sample import Batch
from mobilesam_se.objective import SegmentEverythingObjective
from mobilesam_se.losses.everything import EverythingLoss
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.prompts import build_point_grid


def _batch(image_size: int = 256, grid: int = 4) -> dict:
    g = torch.Generator().manual_seed(3)
    low = image_size // 4
    yy, xx = torch.meshgrid(torch.arange(low), torch.arange(low), indexing="ij")
    # discs and a band, so that most grid points fall inside some object (point supervision pairs)
    masks = torch.stack([
        (yy - 20) ** 2 + (xx - 20) ** 2 < 15**2,
        (yy - 44) ** 2 + (xx - 40) ** 2 < 12**2,
        (yy > 50) & (xx < 30),
    ])
    ignore = torch.zeros(low, low, dtype=torch.bool)
    ignore[:, 56:] = True
    return Batch(
        image=torch.randn(1, 3, image_size, image_size, generator=g),
        points=torch.as_tensor(build_point_grid(grid) * image_size, dtype=torch.float32)[None],
        masks_lowres=[masks],
        ignore_lowres=[ignore],
    )


def _step(model, batch, ckpt: bool) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    crit = loss_helpers.everything_loss(point_credit=1.0, point_fg=True, point_supervision=True)
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(ckpt)
    objective = SegmentEverythingObjective(model, crit, multimask_output=True, points_per_batch=16)
    terms = objective(batch)
    terms["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in terms.items()}, grads


def test_lean_checkpointed_step_matches_the_plain_step(monkeypatch):
    torch.manual_seed(0)
    model = build_mobilesam(256, size="tiny").train()
    batch = _batch()
    plain_losses, plain_grads = _step(model, batch, ckpt=False)

    calls = []
    real_trim = sam_module._MALLOC_TRIM
    monkeypatch.setattr(sam_module, "_MALLOC_TRIM", lambda pad: calls.append(pad) or (real_trim and real_trim(pad)))
    monkeypatch.setattr(everything_loss, "POINT_PAIR_CHUNK", 3)
    model.checkpoint_chunk = 5  # 16 prompts -> pieces of 5, 5, 5, 1 (below points_per_batch=16)
    lean_losses, lean_grads = _step(model, batch, ckpt=True)

    assert plain_losses.keys() == lean_losses.keys()
    for k in plain_losses:
        torch.testing.assert_close(lean_losses[k], plain_losses[k], rtol=1e-5, atol=1e-7)
    assert plain_losses["focal"] > 0  # the point-supervised mask terms are really in the loss
    assert plain_grads.keys() == lean_grads.keys()
    assert any(n.startswith("image_encoder") for n in plain_grads)
    for n in plain_grads:
        torch.testing.assert_close(lean_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6)
    # the heap is released after each of the 4 pieces' forward and after each piece's backward
    assert len(calls) == 8


def test_checkpoint_piece_size():
    model = build_mobilesam(256, size="tiny")
    # SAM's decoder at 1024 px: ~64 x N x C = 64 MiB per prompt -> 8 prompts in 512 MiB
    assert model.checkpoint_prompts(torch.zeros(1, 256, 64, 64)) == 8
    assert model.checkpoint_prompts(torch.zeros(1, 32, 16, 16)) == 1024  # tiny, 256 px: never limits
    assert model.checkpoint_prompts(torch.zeros(1, 256, 64, 64, device="meta")) >= 1 << 20  # off the CPU: none
    model.checkpoint_chunk = 5
    assert model.checkpoint_prompts(torch.zeros(1, 256, 64, 64)) == 5


@pytest.mark.parametrize("seed", [0, 1])
def test_ignore_counts_equal_the_float_product(seed):
    # The bool-count form of `_ignored` against the float matmul it replaced, on random candidates.
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(40, 16, 16, generator=g) + torch.linspace(-3, 3, 16)  # some mostly inside
    ignore = torch.zeros(16, 16, dtype=torch.bool)
    ignore[:, 10:] = True
    fg = torch.rand(40, generator=g) < 0.3
    pred = (logits > 0).flatten(1).float()
    inside = pred @ ignore.flatten().float()
    area = pred.sum(1)
    expected = (~fg) & (area > 0) & (inside >= 0.5 * area)
    got = EverythingLoss._ignored(logits, fg, ignore)
    assert expected.any() and (~expected).any()
    assert torch.equal(got, expected)
