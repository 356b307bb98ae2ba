"""Model behaviour beyond parity: image sizes, batching, gradients, chunking."""
import pytest
import torch

from conftest import perturbed_official_state_dict
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.prompts import grid_points_for_model

mobile_sam = pytest.importorskip("mobile_sam")


@pytest.mark.parametrize("image_size", [256, 512])
def test_image_size_end_to_end(image_size, coffee):
    model = build_mobilesam(image_size, size="tiny").eval()
    pts = grid_points_for_model(3, coffee.shape[:2], image_size)[None]
    with torch.no_grad():
        emb = model.encode(model.preprocess([coffee]))
        out = model.predict_grid(emb, pts, multimask_output=True)
    g = image_size // 16
    assert emb.shape == (1, 32, g, g)
    assert out.masks.shape == (1, 9, 3, image_size // 4, image_size // 4)
    assert model.prompt_encoder.get_dense_pe().shape[-2:] == (g, g)


def test_decoder_parity_at_512_embedding_grid():
    """The reference decoder is size-agnostic; ours must agree on a 32x32 grid (image_size 512)."""
    torch.manual_seed(1)
    ref = mobile_sam.build_sam_vit_t()
    sd = perturbed_official_state_dict(ref, seed=3)
    ref.load_state_dict(sd)
    ours = build_mobilesam(512).eval()
    from mobilesam_se.models.checkpoint import load_official_state_dict

    load_official_state_dict(ours, sd)
    emb = torch.randn(1, 256, 32, 32)
    pts = torch.rand(5, 2) * 500
    # reference prompt encoder sized for 512 input, same weights
    pe = mobile_sam.modeling.PromptEncoder(256, (32, 32), (512, 512), 16)
    pe.load_state_dict(ref.prompt_encoder.state_dict())
    with torch.no_grad():
        sp, de = pe(points=(pts[:, None], torch.ones(5, 1, dtype=torch.long)), boxes=None, masks=None)
        m, i = ref.mask_decoder(emb, pe.get_dense_pe(), sp, de, True)
        out = ours.predict_grid(emb, pts[None])
    assert ((out.masks[0] - m).abs().max() / m.abs().max()) < 1e-4
    assert ((out.iou_pred[0] - i).abs().max() / i.abs().max()) < 1e-4


def test_batch_of_images_uses_own_prompts():
    torch.manual_seed(0)
    model = build_mobilesam(256, size="tiny").eval()
    x = torch.randn(2, 3, 256, 256)
    pts = torch.rand(2, 6, 2) * 250
    with torch.no_grad():
        emb = model.encode(x)
        both = model.predict_grid(emb, pts, points_per_batch=4)
        for b in range(2):
            one = model.predict_grid(emb[b : b + 1], pts[b : b + 1], points_per_batch=4)
            torch.testing.assert_close(both.masks[b], one.masks[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(both.iou_pred[b], one.iou_pred[0], rtol=1e-4, atol=1e-5)


def test_each_point_is_its_own_prompt():
    """A prompt's output must not depend on the other grid points (64 prompts, not one of 64 points)."""
    torch.manual_seed(0)
    model = build_mobilesam(256, size="tiny").eval()
    emb = torch.randn(1, 32, 16, 16)
    pts = torch.rand(1, 5, 2) * 250
    with torch.no_grad():
        full = model.predict_grid(emb, pts)
        first = model.predict_grid(emb, pts[:, :1])
    torch.testing.assert_close(full.masks[:, :1], first.masks, rtol=1e-4, atol=1e-5)


def test_gradients_and_activation_checkpointing_agree():
    torch.manual_seed(0)
    model = build_mobilesam(256, size="tiny").train()
    x = torch.randn(1, 3, 256, 256)
    pts = torch.rand(1, 8, 2) * 250
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(ckpt)
        out = model.predict_grid(model.encode(x), pts, points_per_batch=3)
        (out.masks.sigmoid().mean() + out.iou_pred.pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any(n.startswith("image_encoder") for n in grads[0])
    assert any(n.startswith("mask_decoder.transformer") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)
