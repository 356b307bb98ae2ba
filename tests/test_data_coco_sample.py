"""The real photographs in ../shared/data/coco_sample load as they are with FolderDataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mobilesam_se.data import FolderDataset, check_dataset

ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco_sample"


@pytest.mark.skipif(not ROOT.is_dir(), reason=f"real-data sample not present at {ROOT}")
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_sample_loads(split):
    ds = FolderDataset(ROOT / split, image_size=1024, grid_points=4, keep_original=True)
    assert len(ds) == {"train": 6, "val": 2}[split]
    assert check_dataset(ds) == []
    for i in range(len(ds)):
        sample = ds[i]
        h, w = sample.orig_size
        assert sample.image_uint8.shape == (h, w, 3)
        assert sample.masks.shape[0] > 0 and tuple(sample.masks.shape[1:]) == (h, w)
        assert sample.masks.flatten(1).any(dim=1).all()
        assert sample.masks_lowres.flatten(1).any(dim=1).all()  # at S=1024 even the 98-pixel object keeps low-res cells
        assert max(sample.input_size) == 1024 and sample.masks_lowres.shape[1:] == (256, 256)
        assert np.isfinite(sample.image.numpy()).all()
