"""COCO (polygons, compressed/uncompressed RLE, iscrowd) and SA-1B (RLE) datasets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from mobilesam_se.data import CocoDataset, DatasetError, SA1BDataset

S = 64
HW = (20, 30)


def rect(y0, y1, x0, x1, hw=HW):
    m = np.zeros(hw, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros, written out by hand."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def write_image(path: Path, hw=HW, seed=0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path)


def coco_fixture(tmp_path: Path):
    images = tmp_path / "images"
    write_image(images / "one.png")
    write_image(images / "two.png", seed=1)
    blob = rect(2, 9, 12, 20) | rect(9, 12, 14, 16)
    anns = [
        # polygon of the rectangle x in [3, 10), y in [4, 15)
        {"id": 10, "image_id": 1, "iscrowd": 0, "segmentation": [[3, 4, 10, 4, 10, 15, 3, 15]]},
        {"id": 11, "image_id": 1, "iscrowd": 0, "segmentation": compressed_rle(blob)},
        {"id": 12, "image_id": 1, "iscrowd": 0, "segmentation": uncompressed_rle(rect(15, 20, 20, 30))},
        {"id": 13, "image_id": 1, "iscrowd": 1, "segmentation": uncompressed_rle(rect(0, 20, 0, 30))},
    ]
    data = {
        "images": [
            {"id": 1, "file_name": "one.png", "height": HW[0], "width": HW[1]},
            {"id": 2, "file_name": "two.png", "height": HW[0], "width": HW[1]},
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "thing"}],
    }
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    expected = [rect(4, 15, 3, 10), blob, rect(15, 20, 20, 30)]
    return images, ann_file, data, expected


def test_coco_polygon_rle_and_iscrowd(tmp_path):
    images, ann_file, _, expected = coco_fixture(tmp_path)
    ds = CocoDataset(images, ann_file, image_size=S)
    assert ds.ids == ["1", "2"]
    first = ds[0]
    assert first.file_name == str(images / "one.png") and first.orig_size == HW
    np.testing.assert_array_equal(first.masks.numpy(), np.stack(expected))  # crowd: no object
    # ... but an ignore region: a candidate segmenting part of the crowd is not background.
    from mobilesam_se.data.targets import lowres_targets

    crowd = lowres_targets(rect(0, 20, 0, 30)[None], first.input_size, S)[0]
    assert first.ignore_lowres is not None and crowd.any()
    assert np.array_equal(first.ignore_lowres.numpy() & crowd, crowd)
    assert ds[1].ignore_lowres is None
    empty = ds[1]
    assert empty.masks.shape == (0, *HW) and empty.masks_lowres.shape == (0, S // 4, S // 4)
    assert ds.validate() == []


def test_coco_cap_keeps_largest(tmp_path):
    images, ann_file, _, expected = coco_fixture(tmp_path)
    ds = CocoDataset(image_dir=images, annotation_file=ann_file, image_size=S, max_masks_per_image=2)
    # areas 77, 62, 50: the 50-pixel rectangle goes
    np.testing.assert_array_equal(ds[0].masks.numpy(), np.stack(expected[:2]))


def test_coco_problems_name_the_file(tmp_path):
    images, ann_file, data, _ = coco_fixture(tmp_path)
    data["annotations"][1]["segmentation"]["size"] = [10, 30]
    data["images"][1]["height"] = 21
    data["images"].append({"id": 3, "file_name": "missing.png", "height": 5, "width": 5})
    data["annotations"].append({"id": 99, "image_id": 42, "segmentation": [[0, 0, 1, 0, 1, 1]]})
    ann_file.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as info:
        CocoDataset(images, ann_file, image_size=S)
    by_path = {p.path: p.message for p in info.value.problems}
    assert "not found" in by_path[str(images / "missing.png")]
    assert "annotation 99" in by_path[str(ann_file)] and "42" in by_path[str(ann_file)]
    ds = CocoDataset(images, ann_file, image_size=S, on_error="skip")
    assert len(ds) == 2 and len(ds.skipped) == 2
    problems = ds.validate()
    rle_problem = [p for p in problems if "annotation 11 of one.png" in p.message]
    assert rle_problem and rle_problem[0].path == str(ann_file) and "30x10" in rle_problem[0].message
    size_problem = [p for p in problems if p.path == str(images / "two.png")]
    assert size_problem and "30x21" in size_problem[0].message
    assert len(ds) == 0


def test_coco_unreadable_annotation_file(tmp_path):
    (tmp_path / "images").mkdir()
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="bad.json: cannot parse JSON"):
        CocoDataset(tmp_path / "images", bad)


def sa1b_fixture(root: Path):
    write_image(root / "sa_1.jpg")
    masks = [rect(0, 10, 0, 30), rect(10, 20, 5, 25) & ~rect(12, 14, 8, 10)]
    data = {
        "image": {"image_id": 1, "file_name": "sa_1.jpg", "height": HW[0], "width": HW[1]},
        "annotations": [
            {"id": k, "segmentation": compressed_rle(m), "area": int(m.sum())} for k, m in enumerate(masks)
        ],
    }
    (root / "sa_1.json").write_text(json.dumps(data))
    return data, masks


def test_sa1b_rle_round_trip(tmp_path):
    _, masks = sa1b_fixture(tmp_path)
    ds = SA1BDataset(tmp_path, image_size=S)
    sample = ds[0]
    assert sample.image_id == "sa_1" and sample.orig_size == HW
    np.testing.assert_array_equal(sample.masks.numpy(), np.stack(masks))


def test_sa1b_problems(tmp_path):
    data, _ = sa1b_fixture(tmp_path)
    write_image(tmp_path / "sa_2.jpg")
    (tmp_path / "sa_3.json").write_text("{}")
    (tmp_path / "README").write_text("hi")
    with pytest.raises(DatasetError) as info:
        SA1BDataset(tmp_path)
    by_path = {p.path: p.message for p in info.value.problems}
    assert "no annotation file sa_2.json" in by_path[str(tmp_path / "sa_2.jpg")]
    assert "without its image" in by_path[str(tmp_path / "sa_3.json")]
    assert "not an SA-1B file" in by_path[str(tmp_path / "README")]
    for extra in ("sa_2.jpg", "sa_3.json", "README"):
        (tmp_path / extra).unlink()
    data["annotations"][0]["segmentation"]["counts"] = "garbage"
    (tmp_path / "sa_1.json").write_text(json.dumps(data))
    ds = SA1BDataset(tmp_path)
    with pytest.raises(DatasetError) as info:
        ds[0]
    (problem,) = info.value.problems
    assert problem.path == str(tmp_path / "sa_1.json") and problem.message.startswith("annotation 0: corrupt RLE")
