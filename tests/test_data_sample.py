"""Sample assembly: low-res target geometry, prompts, capping, collation, the factory."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mobilesam_se.data import (
    Batch,
    FolderDataset,
    SyntheticDataset,
    collate_samples,
    lowres_targets,
    write_folder_sample,
)
from mobilesam_se.data.targets import largest_indices
from mobilesam_se.prompts import grid_points_for_model
from mobilesam_se.transforms import preprocess_image, preprocess_shape


def rect(hw, y0, y1, x0, x1):
    m = np.zeros(hw, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def one_image_dataset(root, hw, masks, seed=0, **kwargs) -> FolderDataset:
    image = np.random.default_rng(seed).integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    write_folder_sample(root, "img", image, masks)
    return FolderDataset(root, keep_original=True, **kwargs)


def test_lowres_rectangle_lands_where_expected(tmp_path):
    # 40x80 image, S = 64: resized to 32x64, so the low-res frame is 16x16 with the image in
    # its top 8 rows; every 5x5 original block becomes one low-res cell.
    ds = one_image_dataset(tmp_path, (40, 80), [rect((40, 80), 10, 30, 20, 60)], image_size=64)
    sample = ds[0]
    assert sample.input_size == (32, 64)
    expected = np.zeros((16, 16), dtype=bool)
    expected[2:6, 4:12] = True
    np.testing.assert_array_equal(sample.masks_lowres[0].numpy(), expected)
    assert sample.masks_lowres.dtype == torch.bool and sample.masks_lowres.shape == (1, 16, 16)


def test_lowres_matches_a_single_area_resize_and_padding_is_false(tmp_path):
    hw = (37, 53)  # awkward sizes: h'/4 is not an integer
    rng = np.random.default_rng(1)
    blob = cv2.GaussianBlur(rng.random(hw).astype(np.float32), (0, 0), 3) > 0.5
    full = np.ones(hw, dtype=bool)  # covers the whole image: shows where padding starts
    sample = one_image_dataset(tmp_path, hw, [blob, full], image_size=64)[0]
    h_in, w_in = preprocess_shape(*hw, 64)
    assert sample.input_size == (h_in, w_in) == (45, 64)
    h4, w4 = round(h_in / 4), round(w_in / 4)
    for k, mask in enumerate([blob, full]):
        reference = np.zeros((16, 16), dtype=bool)
        reference[:h4, :w4] = cv2.resize(mask.astype(np.float32), (w4, h4), interpolation=cv2.INTER_AREA) >= 0.5
        np.testing.assert_array_equal(sample.masks_lowres[k].numpy(), reference)
    lowres_full = sample.masks_lowres[1].numpy()
    assert lowres_full[:h4, :w4].all() and not lowres_full[h4:].any() and not lowres_full[:, w4:].any()


def test_lowres_of_no_masks():
    out = lowres_targets(np.zeros((0, 10, 12), dtype=bool), (53, 64), 64)
    assert out.shape == (0, 16, 16) and out.dtype == bool


def test_sample_fields_follow_sam_geometry(tmp_path):
    hw = (30, 20)
    ds = one_image_dataset(tmp_path, hw, [rect(hw, 0, 5, 0, 5)], image_size=64, grid_points=3)
    sample = ds[0]
    assert sample.orig_size == hw and sample.input_size == preprocess_shape(*hw, 64)
    assert sample.image.dtype == torch.float32 and sample.image.shape == (3, 64, 64)
    torch.testing.assert_close(sample.image, preprocess_image(sample.image_uint8, 64))
    torch.testing.assert_close(sample.points, grid_points_for_model(3, hw, 64))
    assert sample.points.shape == (9, 2) and sample.points.dtype == torch.float32


def test_max_masks_keeps_the_largest_in_original_order(tmp_path):
    hw = (20, 20)
    masks = [rect(hw, 0, 1, 0, 10), rect(hw, 2, 7, 0, 10), rect(hw, 8, 11, 0, 10), rect(hw, 12, 20, 0, 10)]
    sample = one_image_dataset(tmp_path, hw, masks, image_size=64, max_masks_per_image=2)[0]
    assert sample.masks.sum(dim=(1, 2)).tolist() == [50, 80]  # 10 and 30 pixel objects dropped
    assert sample.masks_lowres.shape[0] == 2
    assert FolderDataset(tmp_path, image_size=64)[0].masks.shape[0] == 4


def test_largest_indices_ties_and_no_cap():
    assert largest_indices(np.array([5, 9, 9, 1]), 2).tolist() == [1, 2]
    assert largest_indices(np.array([9, 5, 9, 9]), 2).tolist() == [0, 2]
    assert largest_indices(np.array([3, 1]), None).tolist() == [0, 1]


def test_collate_stacks_fixed_fields_and_lists_the_rest(tmp_path):
    ds = SyntheticDataset(root=tmp_path, num_images=3, image_hw=(48, 64), image_size=64, grid_points=4)
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_samples)))
    assert isinstance(batch, Batch) and len(batch) == 3
    assert batch.image.shape == (3, 3, 64, 64) and batch.points.shape == (3, 16, 2)
    ks = [ds[i].num_masks for i in range(3)]
    assert [m.shape[0] for m in batch.masks] == ks and [m.shape[0] for m in batch.masks_lowres] == ks
    assert batch.image_id == ds.ids and len(batch.orig_size) == 3
    assert batch.orig_size[0] == tuple(batch.masks[0].shape[1:])
    with pytest.raises(ValueError):
        collate_samples([])

    # .to moves what a training step reads; the full-resolution masks stay; on its device a tensor is kept.
    moved = batch.to(torch.device("meta"))
    assert {t.device.type for t in [moved.image, moved.points, *moved.masks_lowres]} == {"meta"}
    assert all(m.device.type == "cpu" for m in moved.masks) and moved.image_id == batch.image_id
    assert batch.image.device.type == "cpu"  # a copy: the batch itself is untouched
    same = batch.to(torch.device("cpu"))
    assert same.image is batch.image and same.masks_lowres[0] is batch.masks_lowres[0]


def test_option_checks(tmp_path):
    write_folder_sample(tmp_path, "a", np.zeros((8, 8, 3), np.uint8), [rect((8, 8), 0, 4, 0, 4)])
    ds = FolderDataset(root=tmp_path, image_size=32)
    assert ds[0].masks_lowres.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="on_error"):
        FolderDataset(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="image_size"):
        FolderDataset(tmp_path, image_size=30)
