"""trainer.optimizer=muon: the batched Newton-Schulz step against torch.optim.Muon, which weights it
takes, one optimizer for the scheduler / checkpoints / unfreezing, and a run that resumes exactly."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers.hydra_utils import compose_cfg
from mobilesam_se.assembly import build_run
from mobilesam_se.engine.muon import Muon, MuonAdamW, orthogonalise
from mobilesam_se.engine.optim import build_optimizer, build_scheduler, muon_rule, param_groups
from mobilesam_se.models.build import build_mobilesam

EXCLUDE = compose_cfg([]).trainer.muon.exclude


@pytest.mark.parametrize("shape", [(6, 16), (16, 6), (8, 8)])
def test_orthogonalise_brings_singular_values_near_one(shape):
    torch.manual_seed(0)
    x = torch.randn(3, *shape) * torch.tensor([1e-3, 1.0, 50.0])[:, None, None]  # scale-free
    s = torch.linalg.svdvals(orthogonalise(x))
    assert s.shape == (3, min(shape))
    # the quintic iteration is tuned for speed, not convergence: singular values land in ~[0.6, 1.2]
    assert s.min() > 0.5 and s.max() < 1.3, s
    s_in = torch.linalg.svdvals(x)
    assert (s_in.max(1).values / s_in.min(1).values).min() > 2  # the input was far from orthogonal


def test_muon_step_matches_torch_muon():
    """Same momentum, Nesterov, Newton-Schulz and Moonlight scaling as torch.optim.Muon
    (adjust_lr_fn=match_rms_adamw); torch's iterates in bf16, ours in fp32, hence the tolerance."""
    torch.manual_seed(0)
    w0 = [torch.randn(12, 20), torch.randn(20, 12), torch.randn(12, 20)]  # two share a shape: batched
    ours = [nn.Parameter(w.clone()) for w in w0]
    ref = [nn.Parameter(w.clone()) for w in w0]
    opt = Muon(ours, lr=0.01, momentum=0.9, weight_decay=0.1)
    ref_opt = torch.optim.Muon(ref, lr=0.01, momentum=0.9, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        grads = [torch.randn_like(w) for w in w0]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p, q, w in zip(ours, ref, w0):
            moved = (q.detach() - w).norm()
            assert moved > 0.01
            assert (p.detach() - q.detach()).norm() < 0.03 * moved, step


def test_muon_takes_conv_filters_as_matrices():
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(8, 4, 3, 3))
    conv.grad = torch.randn_like(conv)
    before = conv.detach().clone()
    Muon([conv], lr=0.1, momentum=0.0).step()
    update = (before - conv.detach()).reshape(8, -1) / 0.1
    # the update is an orthogonalised (8, 36) matrix at AdamW's RMS: 0.2 * sqrt(36) x near-orthonormal rows
    s = torch.linalg.svdvals(update / (0.2 * 36 ** 0.5))
    assert s.min() > 0.5 and s.max() < 1.3


def test_which_weights_muon_takes():
    model = build_mobilesam(image_size=64, size="tiny")
    rule = muon_rule(dict(lr=2e-3, exclude=list(EXCLUDE)))
    groups = {g["name"]: g for g in param_groups(model, 0.01, muon=rule)}
    assert set(groups) == {"muon", "decay", "no_decay"}
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[id(p)] for p in groups["muon"]["params"]}
    assert groups["muon"]["lr"] == 2e-3 and groups["muon"]["muon"] is True
    assert "mask_decoder.transformer.layers.0.self_attn.q_proj.weight" in on_muon
    assert "image_encoder.trunk.stages.0.blocks.0.conv1.conv.weight" in on_muon  # a pointwise conv
    assert "mask_decoder.output_upscaling.0.weight" in on_muon  # a transposed conv
    assert "image_encoder.trunk.stages.0.blocks.0.conv2.conv.weight" not in on_muon  # depthwise
    assert "image_encoder.trunk.patch_embed.conv1.conv.weight" not in on_muon  # the input layer
    assert "mask_decoder.iou_prediction_head.layers.2.weight" not in on_muon  # output heads
    assert "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight" not in on_muon
    assert not any(n.endswith(".bias") for n in on_muon)
    all_in = [p for g in groups.values() for p in g["params"]]
    assert len(all_in) == len({id(p) for p in all_in}) == sum(p.requires_grad for p in model.parameters())
    linear_only = muon_rule(dict(lr=2e-3, convs=False, exclude=list(EXCLUDE)))
    on_linear = {names[id(p)] for g in param_groups(model, 0.01, muon=linear_only) if g.get("muon") for p in g["params"]}
    assert on_linear < on_muon and all(model.get_parameter(n).ndim == 2 for n in on_linear)
    with pytest.raises(ValueError, match="trainer.muon: unknown keys"):
        muon_rule(dict(lr=1e-3, ns_stepz=3))
    with pytest.raises(ValueError, match="trainer.optimizer must be one of"):
        build_optimizer(model, 1e-3, 0.01, name="lion")


def _model_and_optimizer():
    torch.manual_seed(0)
    model = build_mobilesam(image_size=64, size="tiny")
    rule = muon_rule(dict(lr=2e-3, exclude=list(EXCLUDE)))
    return model, build_optimizer(model, 1e-3, 0.01, (0.9, 0.99), "fused", "muon", rule)


def _train(model, opt, sched, steps, seed):
    torch.manual_seed(seed)
    x = torch.randn(1, 3, 64, 64)
    for _ in range(steps):
        loss = model.image_encoder(x).square().mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def test_one_optimizer_for_scheduler_checkpoint_and_both_halves():
    model, opt = _model_and_optimizer()
    assert isinstance(opt, MuonAdamW) and isinstance(opt, torch.optim.Optimizer)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    kinds = {g["name"]: g for g in opt.param_groups}
    assert kinds["muon"]["lr"] == pytest.approx(1e-3) and kinds["decay"]["lr"] == pytest.approx(5e-4)  # warm-up 1/2
    _train(model, opt, sched, 3, seed=1)
    assert kinds["muon"]["lr"] / kinds["decay"]["lr"] == pytest.approx(2.0)  # one schedule, two peaks
    assert opt.muon.state and opt.adamw.state  # both halves stepped
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    state, sched_state = copy.deepcopy(opt.state_dict()), sched.state_dict()  # the live buffers move on
    _train(model, opt, sched, 2, seed=2)
    after = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2 = _model_and_optimizer()
    sched2 = build_scheduler(opt2, warmup_steps=2, total_steps=10)
    model2.load_state_dict(saved)
    opt2.load_state_dict(state)  # as the trainer resumes: optimizer (its groups' lr), then scheduler
    sched2.load_state_dict(sched_state)
    _train(model2, opt2, sched2, 2, seed=2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, after[k]), k
    plain = torch.optim.AdamW(model2.parameters()).state_dict()
    with pytest.raises(ValueError, match="trainer.optimizer=adamw"):
        opt2.load_state_dict(plain)


def test_muon_run_resumes_exactly_and_unfreezes_into_muon(synthetic_data, tmp_path):
    common = ["debug=default", "trainer.optimizer=muon", "dataset.batch_size=1", "dataset.prompts_per_step=6"]

    def fit(overrides, out):
        trainer, cleanup = build_run(compose_cfg(common + overrides), out_dir=Path(out))
        try:
            return trainer, trainer.fit()
        finally:
            cleanup()

    full, res = fit([], tmp_path / "a")
    assert isinstance(full.optimizer, MuonAdamW) and res["step"] == 8
    fit(["trainer.max_steps=5"], tmp_path / "b")
    resumed, res_c = fit([], tmp_path / "b")
    assert res_c["step"] == 8
    a, c = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)

    thawed, _ = fit(["freeze=encoder", "freeze.unfreeze_epoch=1"], tmp_path / "thawed")
    unfrozen = [g for g in thawed.optimizer.param_groups if g["name"].startswith("unfrozen_")]
    assert {g["name"] for g in unfrozen} == {"unfrozen_muon", "unfrozen_decay", "unfrozen_no_decay"}
    muon_group = next(g for g in unfrozen if g["name"] == "unfrozen_muon")
    assert muon_group["initial_lr"] == pytest.approx(compose_cfg(common).trainer.muon.lr)
    assert any(p in thawed.optimizer.muon.state for p in muon_group["params"])  # stepped by Muon
