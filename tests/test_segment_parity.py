"""EverythingGenerator vs the official SamAutomaticMaskGenerator (mobile_sam), same weights and parameters.

Random weights make every point's masks nearly the same full-image mask (NMS leaves one), so the
weights here are `structured_mobilesam_state_dict`: a perturbed random MobileSAM whose decoder is set
by hand to answer a point with three nested blobs around it and a prompt-dependent IoU. Parameters
are chosen so that every filter acts (some masks fail the predicted IoU, some the stability score,
NMS removes duplicates) and dozens of masks survive; the tests assert that they do. The stability
thresholds sit in gaps of the candidates' scores (no candidate within 2.5e-3), so fp32 rounding
differences between the two decoders (a pixel or two of a mask) cannot flip a candidate.

Full MobileSAM at 1024 px (the reference supports nothing else), small grids to keep it short.
"""
import hashlib

import numpy as np
import pytest
import torch

from conftest import COCO_SAMPLE, perturbed_official_state_dict
from mobilesam_se.inference import EverythingGenerator
from mobilesam_se.inference import rle as rle_utils
from mobilesam_se.inference.synthetic import structured_mobilesam_state_dict
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import load_official_state_dict

mobile_sam = pytest.importorskip("mobile_sam")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def weights(coffee):
    torch.manual_seed(0)
    sd = perturbed_official_state_dict(mobile_sam.build_sam_vit_t())
    return structured_mobilesam_state_dict(sd, coffee)


@pytest.fixture(scope="module")
def ours(weights):
    model = build_mobilesam(1024).eval()
    load_official_state_dict(model, weights, "structured weights")
    return model


@pytest.fixture(scope="module")
def reference(weights):
    ref = mobile_sam.build_sam_vit_t()
    ref.load_state_dict(weights)
    return ref.eval()


def portrait_photo(fallback: np.ndarray) -> np.ndarray:
    path = COCO_SAMPLE / "train" / "image" / "000000000036.jpg"  # 481 x 640, portrait
    if not path.is_file():
        return np.ascontiguousarray(fallback.transpose(1, 0, 2))
    from PIL import Image

    return np.array(Image.open(path).convert("RGB"))


def assert_same_records(mine, theirs, min_masks: int):
    assert len(theirs) >= min_masks, f"only {len(theirs)} reference masks: the test would be weak"
    assert len(mine) == len(theirs)
    ious = rle_utils.iou_matrix([r["segmentation"] for r in mine], [r["segmentation"] for r in theirs])
    pair = ious.argmax(1)
    assert len(set(pair.tolist())) == len(pair), "two of our masks pair with the same reference mask"
    assert ious.max(1).min() >= 0.99
    for a, j in zip(mine, pair):
        b = theirs[j]
        assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-3
        assert abs(a["stability_score"] - b["stability_score"]) < 1e-3
        assert a["crop_box"] == b["crop_box"]
        np.testing.assert_allclose(a["point_coords"], b["point_coords"], atol=1e-6)
        assert np.abs(np.array(a["bbox"]) - np.array(b["bbox"])).max() <= 1
        assert abs(a["area"] - b["area"]) <= 0.01 * b["area"]
        assert a["segmentation"]["size"] == b["segmentation"]["size"]
        assert isinstance(a["segmentation"]["counts"], str)
    # The same order, too (NMS keeps masks by score; the scores agree to fp32 rounding).
    assert (pair == np.arange(len(pair))).mean() > 0.9


def run_both(ours, reference, image, **params):
    mine = EverythingGenerator(ours, output_mode="coco_rle", **params)
    recs = mine.generate(image)
    ref = mobile_sam.SamAutomaticMaskGenerator(reference, output_mode="coco_rle", **params)
    return recs, ref.generate(image), mine.stats


def test_everything_matches_reference(ours, reference, coffee):
    params = dict(points_per_side=6, points_per_batch=16, pred_iou_thresh=0.88, stability_score_thresh=0.92)
    mine, theirs, stats = run_both(ours, reference, coffee, **params)
    # every filter acted: predicted IoU, stability, NMS
    assert stats["upsampled"] < 3 * 36
    assert stats["candidates"] < stats["upsampled"]
    assert len(mine) < stats["candidates"]
    assert_same_records(mine, theirs, min_masks=20)


def test_everything_with_crops_matches_reference(ours, reference, coffee, monkeypatch):
    # Five crops make ten image-encoder passes; the encoders' parity is tested elsewhere
    # (test_model_parity), so here both pipelines share one encoder pass per crop: ours gets the
    # reference's embedding of the same (identically preprocessed) pixels.
    cache = {}
    encode = reference.image_encoder.forward

    def shared_encoder(pixels):
        key = (tuple(pixels.shape), hashlib.sha1(pixels.detach().cpu().numpy().tobytes()).hexdigest())
        if key not in cache:
            cache[key] = encode(pixels)
        return cache[key]

    monkeypatch.setattr(reference.image_encoder, "forward", shared_encoder)
    monkeypatch.setattr(ours, "encode", shared_encoder)
    image = portrait_photo(coffee)
    params = dict(points_per_side=3, points_per_batch=8, crop_n_layers=1, pred_iou_thresh=0.88,
                  stability_score_thresh=0.917, min_mask_region_area=1500)
    mine, theirs, _ = run_both(ours, reference, image, **params)
    assert_same_records(mine, theirs, min_masks=20)
    assert len({tuple(r["crop_box"]) for r in mine}) > 1  # masks from the crops survive too
    assert len(cache) == 5  # one embedding per crop, found by both pipelines
