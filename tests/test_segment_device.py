"""Device-side post-processing (issue 14, item 1): run lengths on the device against pycocotools, and
the GPU code paths of the generator (filters once per crop, big upsampling chunks, batched encoder)
run on CPU tensors with the same result as the CPU path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from mobilesam_se.inference import EverythingGenerator
from mobilesam_se.inference import rle as rle_utils
from mobilesam_se.models.build import build_mobilesam


def _masks(k: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(k, 1, h // 3 + 1, w // 3 + 1, generator=g)
    m = F.interpolate(low, (h, w), mode="bilinear")[:, 0] > 0.55
    m[0] = False  # empty
    m[1] = True  # full: the first run of zeros is empty
    m[2, 0, 0] = True  # a one at the very start
    m[3, -1, -1] = True  # and one at the very end
    return m


def _pycocotools(masks: torch.Tensor):
    rles = mask_utils.encode(np.asfortranarray(masks.numpy().transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]


@pytest.mark.parametrize("k,h,w,seed", [(6, 37, 53, 0), (8, 1, 40, 1), (5, 64, 1, 2), (12, 120, 90, 3)])
def test_device_run_lengths_equal_pycocotools(k, h, w, seed):
    masks = _masks(k, h, w, seed)
    counts, lengths = rle_utils.rle_counts(masks)
    assert counts.dtype == torch.long and lengths.shape == (k,)
    assert int(lengths.sum()) == counts.numel()
    parts = np.split(counts.numpy(), np.cumsum(lengths.numpy())[:-1])
    for m, p in zip(masks, parts):  # the uncompressed counts, mask by mask
        assert p.tolist() == rle_utils.to_uncompressed(m.numpy())["counts"]
        assert p.sum() == h * w
    assert rle_utils.counts_to_rles(counts.numpy(), lengths.numpy(), (h, w)) == _pycocotools(masks)


@pytest.mark.parametrize("shape", [(5, 400, 600), (3, 7, 9), (1, 13), (4, 8, 127 * 8 + 3), (2, 2000, 2000), (3, 1, 5)])
def test_count_true_equals_sum(shape):
    g = torch.Generator().manual_seed(sum(shape))
    m = torch.rand(shape, generator=g) > 0.3
    assert torch.equal(rle_utils.count_true(m), m.reshape(shape[0], -1).sum(1))
    full = torch.ones(shape, dtype=torch.bool)  # every byte lane at its maximum: no carry between lanes
    assert torch.equal(rle_utils.count_true(full), full.reshape(shape[0], -1).sum(1))


def test_count_true_of_views_and_empty():
    x = torch.rand(4, 100, 101) > 0.5
    for v in (x[:, 1:, 1:], x[1:], x.transpose(1, 2), x[:, :, 3]):
        assert torch.equal(rle_utils.count_true(v), v.reshape(v.shape[0], -1).sum(1))
    assert torch.equal(rle_utils.count_true(torch.zeros(0, 4, 4, dtype=torch.bool)), torch.zeros(0, dtype=torch.long))
    assert torch.equal(rle_utils.count_true(torch.zeros(3, 0, dtype=torch.bool)), torch.zeros(3, dtype=torch.long))


def test_device_run_lengths_of_no_masks():
    counts, lengths = rle_utils.rle_counts(torch.zeros(0, 5, 7, dtype=torch.bool))
    assert counts.numel() == 0 and lengths.numel() == 0
    assert rle_utils.counts_to_rles(counts.numpy(), lengths.numpy(), (5, 7)) == []


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = build_mobilesam(128, size="tiny").eval()
    # Random weights give logits near 0 (every stability score 0); sharper masks spread the scores,
    # so the stability filter keeps some and drops others.
    with torch.no_grad():
        for mlp in model.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(300.0)
    return model


@pytest.fixture(scope="module")
def photos(coffee):
    return [np.ascontiguousarray(coffee[::4, ::4]), np.ascontiguousarray(coffee[::5, ::3])]


def _same(a, b) -> None:
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert x["segmentation"] == y["segmentation"]
        assert x["bbox"] == y["bbox"] and x["crop_box"] == y["crop_box"] and x["point_coords"] == y["point_coords"]
        assert x["predicted_iou"] == pytest.approx(y["predicted_iou"], abs=1e-5)
        assert x["stability_score"] == pytest.approx(y["stability_score"], abs=1e-5)


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_gpu_path_on_cpu_tensors_equals_cpu_path(tiny, photos, crop_n_layers):
    # the tiny model's IoU estimates are around 0 (the filter only acts above 0, as the reference's)
    params = dict(points_per_side=6, points_per_batch=7, pred_iou_thresh=0.01, stability_score_thresh=0.3,
                  box_nms_thresh=0.95, crop_n_layers=crop_n_layers)
    cpu_path = EverythingGenerator(tiny, **params)
    # the path a GPU takes: all point batches filtered at once, upsampling in large chunks
    device_path = EverythingGenerator(tiny, filter_per_batch=False, upsample_chunk_elems=1 << 28, **params)
    small_chunks = EverythingGenerator(tiny, upsample_chunk_elems=1, **params)  # one mask per chunk
    for image in photos:
        ref = cpu_path.generate(image)
        _same(device_path.generate(image), ref)
        _same(small_chunks.generate(image), ref)
    # the predicted-IoU and the stability filters acted
    assert cpu_path.stats["upsampled"] < 3 * cpu_path.stats["points_decoded"]
    assert cpu_path.stats["candidates"] < cpu_path.stats["upsampled"]


def test_generate_batch_equals_one_image_at_a_time(tiny, photos):
    gen = EverythingGenerator(tiny, points_per_side=5, pred_iou_thresh=-0.2, stability_score_thresh=0.3, box_nms_thresh=0.95)
    batched = gen.generate_batch(photos)
    assert len(batched) == len(photos)
    for image, recs in zip(photos, batched):
        _same(recs, gen.generate(image))
    assert gen.generate_batch([]) == []


def test_bf16_mode_stays_close_to_fp32(tiny, photos):
    params = dict(points_per_side=6, pred_iou_thresh=-0.2, stability_score_thresh=0.3, box_nms_thresh=0.95)
    exact = EverythingGenerator(tiny, **params).generate(photos[0])
    fast = EverythingGenerator(tiny, precision="bf16", **params).generate(photos[0])
    assert exact and fast
    ious = rle_utils.iou_matrix([r["segmentation"] for r in exact], [r["segmentation"] for r in fast])
    assert np.median(ious.max(1)) >= 0.9  # most exact masks have a bf16 twin
    assert abs(len(fast) - len(exact)) <= 0.25 * len(exact)
    with pytest.raises(ValueError):
        EverythingGenerator(tiny, precision="fp16")


def test_bf16_on_a_cpu_without_native_bf16_warns(tiny, monkeypatch):
    import mobilesam_se.inference.amg as amg

    monkeypatch.setattr(amg, "cpu_has_fast_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulates"):
        EverythingGenerator(tiny, points_per_side=4, precision="bf16")
    monkeypatch.setattr(amg, "cpu_has_fast_bf16", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        EverythingGenerator(tiny, points_per_side=4, precision="bf16")
