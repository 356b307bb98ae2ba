"""Numerical parity with the official MobileSAM (mobilesam-mirror) and segment-anything code."""
import numpy as np
import pytest
import torch

from conftest import perturbed_official_state_dict
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import (
    CheckpointError,
    export_official,
    load_model_weights,
    load_official_state_dict,
    official_state_dict,
)
from mobilesam_se.prompts import grid_points_for_model

mobile_sam = pytest.importorskip("mobile_sam")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.fixture(scope="module")
def weights():
    torch.manual_seed(0)
    ref = mobile_sam.build_sam_vit_t()
    return perturbed_official_state_dict(ref)


@pytest.fixture(scope="module")
def reference(weights):
    ref = mobile_sam.build_sam_vit_t()
    ref.load_state_dict(weights)
    return ref.eval()


@pytest.fixture(scope="module")
def ours(weights):
    model = build_mobilesam(1024).eval()
    load_official_state_dict(model, weights, "test weights")
    return model


@pytest.fixture(scope="module")
def ref_predictor(reference, coffee):
    pred = mobile_sam.SamPredictor(reference)
    pred.set_image(coffee)
    return pred


@pytest.fixture(scope="module")
def our_embedding(ours, coffee):
    with torch.no_grad():
        return ours.encode(ours.preprocess([coffee]))


def test_preprocessing_and_embedding_match(ours, ref_predictor, our_embedding, coffee):
    pixels = ours.preprocess([coffee])
    ref_pixels = ref_predictor.model.preprocess(
        torch.as_tensor(ref_predictor.transform.apply_image(coffee)).permute(2, 0, 1)[None].float()
    )
    assert torch.equal(pixels, ref_pixels)
    assert rel_err(our_embedding, ref_predictor.features) < 1e-4


def test_grid_points_match_amg(coffee):
    from mobile_sam.utils.amg import build_all_layer_point_grids
    from mobile_sam.utils.transforms import ResizeLongestSide

    h, w = coffee.shape[:2]
    amg_points = build_all_layer_point_grids(16, 0, 1)[0] * np.array([w, h])[None]
    amg_points = ResizeLongestSide(1024).apply_coords(amg_points, (h, w))
    ours = grid_points_for_model(16, (h, w), 1024).numpy()
    np.testing.assert_allclose(ours, amg_points, rtol=0, atol=1e-4)
    assert ours[1, 0] > ours[0, 0] and ours[1, 1] == ours[0, 1]  # x varies fastest


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("num_prompts", [1, 7])
def test_decoder_matches_reference(ours, ref_predictor, our_embedding, coffee, multimask, num_prompts):
    pts = grid_points_for_model(4, coffee.shape[:2], 1024)[:num_prompts]
    with torch.no_grad():
        out = ours.predict_grid(our_embedding, pts[None], multimask_output=multimask, points_per_batch=3)
        _, ref_iou, ref_low = ref_predictor.predict_torch(
            pts[:, None, :], torch.ones(num_prompts, 1, dtype=torch.long), multimask_output=multimask, return_logits=True
        )
    m = 3 if multimask else 1
    assert out.masks.shape == (1, num_prompts, m, 256, 256)
    assert rel_err(out.masks[0], ref_low) < 1e-4
    assert rel_err(out.iou_pred[0], ref_iou) < 1e-4


def test_round_trip_into_official_code(ours, ref_predictor, our_embedding, coffee, tmp_path):
    path = tmp_path / "exported.pt"
    export_official(ours, path)
    ref = mobile_sam.build_sam_vit_t(checkpoint=str(path)).eval()  # strict load inside
    pred = mobile_sam.SamPredictor(ref)
    pred.set_image(coffee)
    assert rel_err(pred.features, our_embedding) < 1e-4
    pts = grid_points_for_model(2, coffee.shape[:2], 1024)
    with torch.no_grad():
        _, iou, low = pred.predict_torch(pts[:, None], torch.ones(4, 1, dtype=torch.long), multimask_output=True, return_logits=True)
        out = ours.predict_grid(our_embedding, pts[None])
    assert rel_err(out.masks[0], low) < 1e-4 and rel_err(out.iou_pred[0], iou) < 1e-4
    # and back: our loader reads the file it wrote
    again = build_mobilesam(1024)
    load_model_weights(again, path)
    for k, v in official_state_dict(again).items():
        assert torch.equal(v, official_state_dict(ours)[k]), k


def test_strict_load_names_file_and_keys(weights, tmp_path):
    sd = dict(weights)
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_model_weights(build_mobilesam(1024, size="mobilesam"), path)
    msg = str(e.value)
    assert str(path) in msg and "mask_decoder.iou_token.weight" in msg and "mask_decoder.extra.weight" in msg
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model_weights(build_mobilesam(256, size="tiny"), tmp_path / "nope.pt")


def test_no_stale_attention_bias_cache_after_loading():
    torch.manual_seed(0)
    a, b = build_mobilesam(256, size="tiny").eval(), build_mobilesam(256, size="tiny").eval()
    sd = official_state_dict(b)
    for k in sd:
        if "attention_biases" in k:
            sd[k] = torch.randn_like(sd[k])
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        a.encode(x)  # fills a's eval-mode cache
        load_official_state_dict(a, sd)
        load_official_state_dict(b, sd)
        assert torch.equal(a.encode(x), b.encode(x))
