"""Settings the model declares, as timm's models do: which weights decay, gradient checkpointing,
and timm's LayerNorm2d in SAM's place."""
import pytest
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d

import mobilesam_se.models.sam as sam_module
from helpers.hydra_utils import compose_cfg
from mobilesam_se.engine.freeze import freeze_parts, unfreeze_parts
from mobilesam_se.engine.optim import build_optimizer, build_scheduler, param_groups
from mobilesam_se.models.build import build_mobilesam


def decay_of(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict:
    """parameter name -> the weight decay its optimizer group applies."""
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


@pytest.fixture(scope="module")
def model():
    return build_mobilesam(256, size="tiny")


def test_weight_decay_follows_what_the_model_declares(model):
    wd = decay_of(build_optimizer(model, lr=1e-3, weight_decay=0.1), model)
    assert wd.keys() == {n for n, _ in model.named_parameters()}
    # The patch embedding's convolutions are ordinary weights (an old substring rule on "embed" exempted them) ...
    assert wd["image_encoder.trunk.patch_embed.conv1.conv.weight"] == 0.1
    assert wd["image_encoder.trunk.patch_embed.conv2.conv.weight"] == 0.1
    assert wd["prompt_encoder.mask_downscaling.0.weight"] == 0.1
    # ... norms (BatchNorm, LayerNorm, LayerNorm2d) and biases are not,
    for name in ("image_encoder.trunk.patch_embed.conv1.bn.weight", "image_encoder.neck.1.weight",
                 "mask_decoder.transformer.layers.0.norm1.weight", "mask_decoder.output_upscaling.1.weight",
                 "mask_decoder.iou_prediction_head.layers.0.bias"):
        assert wd[name] == 0.0, name
    # and of the other weights exactly the declared ones: attention biases, prompt embeddings, output tokens.
    exempt = {n for n, p in model.named_parameters() if p.ndim > 1 and wd[n] == 0.0}
    assert exempt == model.no_weight_decay()
    assert {n for n in exempt if "attention_biases" in n} == {
        n for n, _ in model.named_parameters() if n.endswith("attention_biases")} != set()
    assert {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight", "prompt_encoder.no_mask_embed.weight",
            "prompt_encoder.not_a_point_embed.weight", "prompt_encoder.point_embeddings.3.weight"} <= exempt


def test_unfreeze_adds_groups_by_the_same_rule():
    model = build_mobilesam(256, size="tiny")
    freeze_parts(model, ["image_encoder"])
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=10)
    assert unfreeze_parts(model, ["image_encoder"], opt, 0.1, sched) == len(list(model.image_encoder.parameters()))
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "unfrozen_decay", "unfrozen_no_decay"]
    fresh = build_mobilesam(256, size="tiny")
    assert decay_of(opt, model) == decay_of(build_optimizer(fresh, lr=1e-3, weight_decay=0.1), fresh)
    assert len(sched.base_lrs) == len(opt.param_groups)


def test_param_groups_of_named_parameters_only(model):
    names = {"mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight", "image_encoder.neck.0.weight"}
    groups = param_groups(model, 0.1, names=names, tag="x_")
    params = dict(model.named_parameters())
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in groups] == [("x_decay", 0.1, 1), ("x_no_decay", 0.0, 2)]
    assert groups[0]["params"][0] is params["image_encoder.neck.0.weight"]


def test_grad_checkpointing_is_a_model_flag_set_from_the_config(monkeypatch):
    assert not build_mobilesam(256, size="tiny").grad_checkpointing
    from hydra.utils import instantiate

    on = instantiate(compose_cfg(["model=tiny", "model.activation_checkpointing=true"]).model.net)
    assert on.grad_checkpointing
    assert not instantiate(compose_cfg(["model=tiny"]).model.net).grad_checkpointing

    calls = []
    real = sam_module.checkpoint
    monkeypatch.setattr(sam_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, pts = torch.randn(1, 3, 256, 256), torch.rand(1, 6, 2) * 250
    on.train()(x, pts, points_per_batch=2).masks.sum().backward()
    assert len(calls) == 3  # one checkpointed piece per 2 prompts
    on.set_grad_checkpointing(False)
    on(x, pts, points_per_batch=2)
    assert len(calls) == 3
    with torch.no_grad():  # nothing to recompute without a graph
        on.set_grad_checkpointing(True)
        on(x, pts, points_per_batch=2)
    assert len(calls) == 3


def test_layernorm2d_is_timms_with_sams_numerics_and_names(model):
    norms = [model.image_encoder.neck[1], model.image_encoder.neck[3], model.prompt_encoder.mask_downscaling[1],
             model.prompt_encoder.mask_downscaling[4], model.mask_decoder.output_upscaling[1]]
    assert all(type(m) is LayerNorm2d and m.eps == 1e-6 for m in norms)  # SAM's eps
    sam_common = pytest.importorskip("segment_anything.modeling.common")
    ref, ours = sam_common.LayerNorm2d(8), LayerNorm2d(8)
    with torch.no_grad():
        ref.weight.normal_(), ref.bias.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)  # the same names: weight, bias
    x = torch.randn(2, 8, 5, 7) * 3 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_tied_attention_init_starts_local():
    torch.manual_seed(0)
    plain = build_mobilesam(256, size="tiny", attention_init="default")
    torch.manual_seed(0)
    tied = build_mobilesam(256, size="tiny", attention_init="tied_qk")
    from mobilesam_se.models.transformer import Attention

    layers = [m for m in tied.mask_decoder.modules() if isinstance(m, Attention)]
    assert layers and all(torch.equal(m.k_proj.weight, m.q_proj.weight) and torch.equal(m.k_proj.bias, m.q_proj.bias)
                          for m in layers)
    assert not any(torch.equal(m.k_proj.weight, m.q_proj.weight)
                   for m in plain.mask_decoder.modules() if isinstance(m, Attention))
    # Only the keys change: the rest of the init is the same draw.
    diff = {n for n, p in tied.state_dict().items() if not torch.equal(p, plain.state_dict()[n])}
    assert diff and all(".k_proj." in n for n in diff)
    # What it is for: every score form W_q^T W_k starts symmetric positive semi-definite, so the
    # positional part of a score is largest where a prompt's position meets its own.
    for m in layers:
        form = m.q_proj.weight.T @ m.k_proj.weight
        assert torch.allclose(form, form.T, atol=1e-6) and torch.linalg.eigvalsh(form).min() > -1e-5

def test_attention_init_is_checked_and_set_from_the_config():
    with pytest.raises(ValueError, match="attention_init"):
        build_mobilesam(64, size="tiny", attention_init="tied")
    cfg = compose_cfg(["model=tiny"])
    assert cfg.model.attention_init == "tied_qk" and cfg.model.net.attention_init == "tied_qk"


def test_pe_scale_spreads_the_positional_frequencies_and_a_checkpoint_overwrites_them():
    torch.manual_seed(0)
    sam = build_mobilesam(256, size="tiny", pe_scale=1.0)
    torch.manual_seed(0)
    low = build_mobilesam(256, size="tiny", pe_scale=0.5)
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    torch.testing.assert_close(low.state_dict()[key], 0.5 * sam.state_dict()[key], rtol=0, atol=0)
    # Only the frequencies change: the rest of the init is the same draw.
    assert all(torch.equal(p, sam.state_dict()[n]) for n, p in low.state_dict().items() if n != key)

    def neighbour_similarity(model):  # mean cosine of the dense encoding at horizontally adjacent tokens
        pe = torch.nn.functional.normalize(model.prompt_encoder.get_dense_pe()[0], dim=0)
        return float((pe[:, :, 1:] * pe[:, :, :-1]).sum(0).mean())

    # What it is for: lower frequencies, so nearby positions encode alike (a smoother positional kernel).
    assert neighbour_similarity(low) > neighbour_similarity(sam) + 0.05
    low.load_state_dict(sam.state_dict())  # a checkpoint brings its own frequencies
    assert torch.equal(low.state_dict()[key], sam.state_dict()[key])
    with pytest.raises(ValueError, match="model.pe_scale"):
        build_mobilesam(64, size="tiny", pe_scale=0.0)
    cfg = compose_cfg(["model=tiny", "model.pe_scale=0.25"])
    assert cfg.model.net.pe_scale == 0.25


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_optimizer_impls_take_the_per_parameter_loops_steps(impl):
    """trainer.optimizer_impl changes how AdamW runs, not what it computes (also after an unfreeze)."""
    torch.manual_seed(0)
    ref, other = build_mobilesam(256, size="tiny"), build_mobilesam(256, size="tiny")
    other.load_state_dict(ref.state_dict())
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for m in (ref, other):
        freeze_parts(m, ["prompt_encoder"])
    opts = [build_optimizer(ref, lr=1e-2, weight_decay=0.1, impl="for_loop"),
            build_optimizer(other, lr=1e-2, weight_decay=0.1, impl=impl)]
    assert opts[1].defaults[impl] is True
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        if step == 2:
            for m, o in zip((ref, other), opts):
                unfreeze_parts(m, ["prompt_encoder"], o, 0.1)
        grads = {n: torch.randn(p.shape, generator=gen) for n, p in ref.named_parameters() if p.requires_grad}
        for m, o in zip((ref, other), opts):
            for n, p in m.named_parameters():
                p.grad = grads[n].clone() if n in grads else None
            o.step()
    for (n, a), (_, b) in zip(ref.named_parameters(), other.named_parameters()):
        assert not torch.equal(a, start[n]), f"{n} never moved"  # the unfrozen part too
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)


def test_unknown_optimizer_impl_names_the_key(model):
    with pytest.raises(ValueError, match="trainer.optimizer_impl"):
        build_optimizer(model, lr=1e-3, weight_decay=0.1, impl="apex")
