"""FolderDataset: layout, bad-input messages, skip mode, EXIF and pixel-format conversion."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import List, Sequence

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from mobilesam_se.data import DatasetError, FolderDataset, Problem, check_dataset, write_folder_sample

S = 64  # tiny model input keeps every test fast


def rect_mask(hw, y0, y1, x0, x1) -> np.ndarray:
    m = np.zeros(hw, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def scene(hw=(24, 32), seed=0):
    """A random image and two disjoint rectangles of different areas."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    return image, [rect_mask(hw, 2, 10, 3, 20), rect_mask(hw, 14, 20, 22, 30)]


def good_dataset(root: Path, ids: Sequence[str] = ("a", "b")) -> Path:
    for i, image_id in enumerate(ids):
        image, masks = scene(seed=i)
        write_folder_sample(root, image_id, image, masks)
    return root


def problem_for(problems: List[Problem], path: Path) -> Problem:
    hits = [p for p in problems if p.path == str(path)]
    assert hits, f"no problem names {path}; got {problems}"
    return hits[0]


def raised(fn) -> List[Problem]:
    with pytest.raises(DatasetError) as info:
        fn()
    return info.value.problems


# ---- the good case ----------------------------------------------------------------------------
def test_loads_images_and_masks_exactly(tmp_path):
    good_dataset(tmp_path)
    ds = FolderDataset(tmp_path, image_size=S, grid_points=4)
    assert ds.ids == ["a", "b"] and len(ds) == 2
    image, masks = scene(seed=1)
    sample = ds[1]
    assert sample.image_id == "b" and sample.file_name == str(tmp_path / "image" / "b.png")
    assert sample.orig_size == (24, 32) and sample.masks.shape == (2, 24, 32)
    assert sample.masks.dtype == torch.bool
    np.testing.assert_array_equal(sample.masks.numpy(), np.stack(masks))
    assert sample.image_uint8 is None
    assert FolderDataset(tmp_path, image_size=S, keep_original=True)[1].image_uint8.tobytes() == image.tobytes()
    assert check_dataset(ds) == []


def test_mask_files_in_natural_order_and_hidden_files_ignored(tmp_path):
    good_dataset(tmp_path, ["a"])
    folder = tmp_path / "mask" / "a"
    for p in folder.iterdir():
        p.unlink()
    hw = (24, 32)
    # Areas 1..11 rows tell the files apart; obj_10 must come after obj_2.
    for k in (1, 2, 10):
        cv2.imwrite(str(folder / f"obj_{k}.png"), rect_mask(hw, 0, k, 0, 4).astype(np.uint8) * 255)
    (folder / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "image" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "mask" / ".hidden").write_bytes(b"junk")
    sample = FolderDataset(tmp_path, image_size=S)[0]
    assert sample.masks.sum(dim=(1, 2)).tolist() == [4, 8, 40]


# ---- bad input: each message names the file ---------------------------------------------------
def test_corrupt_and_truncated_images_are_named(tmp_path):
    good_dataset(tmp_path, ["a", "b", "c"])
    bad = tmp_path / "image" / "a.png"
    bad.write_bytes(b"this is not an image")
    truncated = tmp_path / "image" / "b.png"
    truncated.write_bytes(truncated.read_bytes()[:200])
    ds = FolderDataset(tmp_path, image_size=S)  # indexing does not decode, so it succeeds
    problems = raised(lambda: ds[0])
    assert problem_for(problems, bad).message.startswith("cannot decode image")
    (truncated_problem,) = raised(lambda: ds[1])
    assert truncated_problem.path == str(truncated) and "corrupt" in truncated_problem.message
    assert ds[2].image_id == "c"
    # validate() reports both at once
    assert {p.path for p in ds.validate()} == {str(bad), str(truncated)}


def test_mask_size_mismatch(tmp_path):
    good_dataset(tmp_path, ["a"])
    mask = tmp_path / "mask" / "a" / "obj_001.png"
    cv2.imwrite(str(mask), np.full((20, 32), 255, np.uint8))
    problems = raised(lambda: FolderDataset(tmp_path, image_size=S)[0])
    msg = problem_for(problems, mask).message
    assert "32x20" in msg and "32x24" in msg and "a.png" in msg


def test_empty_mask_folder_is_an_error_unless_listed(tmp_path):
    good_dataset(tmp_path, ["a", "b"])
    folder = tmp_path / "mask" / "b"
    for p in folder.iterdir():
        p.unlink()
    problems = raised(lambda: FolderDataset(tmp_path, image_size=S))
    assert "empty" in problem_for(problems, folder).message and "empty.txt" in problem_for(problems, folder).message
    (tmp_path / "empty.txt").write_text("# images without objects\nb\n")
    sample = FolderDataset(tmp_path, image_size=S)[1]
    assert sample.image_id == "b"
    assert sample.masks.shape == (0, 24, 32) and sample.masks_lowres.shape == (0, S // 4, S // 4)


def test_listed_empty_image_needs_no_mask_folder_but_masks_contradict(tmp_path):
    good_dataset(tmp_path, ["a", "b"])
    for p in (tmp_path / "mask" / "b").iterdir():
        p.unlink()
    (tmp_path / "mask" / "b").rmdir()
    (tmp_path / "empty.txt").write_text("b\n")
    assert FolderDataset(tmp_path, image_size=S)[1].masks.shape[0] == 0
    (tmp_path / "empty.txt").write_text("a\nb\nghost\n")
    problems = raised(lambda: FolderDataset(tmp_path, image_size=S))
    assert "listed in empty.txt" in problem_for(problems, tmp_path / "mask" / "a").message
    assert "'ghost'" in problem_for(problems, tmp_path / "empty.txt").message


def test_all_zero_mask(tmp_path):
    good_dataset(tmp_path, ["a"])
    mask = tmp_path / "mask" / "a" / "obj_000.png"
    cv2.imwrite(str(mask), np.zeros((24, 32), np.uint8))
    problems = raised(lambda: FolderDataset(tmp_path, image_size=S)[0])
    assert len(problems) == 1 and "all zero" in problem_for(problems, mask).message


def test_image_without_mask_folder(tmp_path):
    good_dataset(tmp_path, ["a"])
    image, _ = scene()
    Image.fromarray(image).save(tmp_path / "image" / "lonely.jpg")
    problems = raised(lambda: FolderDataset(tmp_path, image_size=S))
    msg = problem_for(problems, tmp_path / "image" / "lonely.jpg").message
    assert "no mask folder" in msg and "empty.txt" in msg


def test_stray_files_orphans_and_duplicates_are_all_reported(tmp_path):
    good_dataset(tmp_path, ["a", "b"])
    stray_image = tmp_path / "image" / "notes.txt"
    stray_image.write_text("hello")
    stray_mask = tmp_path / "mask" / "a" / "obj_9.jpg"
    stray_mask.write_bytes(b"jpeg-ish")
    orphan = tmp_path / "mask" / "zzz"
    orphan.mkdir()
    dup = tmp_path / "image" / "b.jpg"
    Image.fromarray(scene()[0]).save(dup)
    problems = raised(lambda: FolderDataset(tmp_path, image_size=S))
    assert "not an image" in problem_for(problems, stray_image).message
    assert "not a mask" in problem_for(problems, stray_mask).message
    assert "without an image" in problem_for(problems, orphan).message
    same_id = [p for p in problems if "same id" in p.message]
    assert len(same_id) == 1 and "b.png" in str(same_id[0]) and "b.jpg" in str(same_id[0])
    assert len(problems) == 4
    assert str(stray_image) in str(DatasetError(problems))


def test_missing_image_folder_raises_even_in_skip_mode(tmp_path):
    with pytest.raises(DatasetError, match="no image folder"):
        FolderDataset(tmp_path / "nowhere", on_error="skip")


# ---- skip mode ----------------------------------------------------------------------------------
def test_skip_mode_drops_and_reports(tmp_path, caplog):
    good_dataset(tmp_path, ["a", "b", "c", "d"])
    for p in (tmp_path / "mask" / "b").iterdir():
        p.unlink()
    (tmp_path / "mask" / "b").rmdir()  # indexing problem
    corrupt = tmp_path / "image" / "c.png"
    corrupt.write_bytes(b"garbage")  # decoding problem
    with pytest.raises(DatasetError):
        FolderDataset(tmp_path, image_size=S)
    with caplog.at_level(logging.WARNING, logger="mobilesam_se.data"):
        ds = FolderDataset(tmp_path, image_size=S, on_error="skip")
    assert ds.ids == ["a", "c", "d"]
    assert [p.path for p in ds.skipped] == [str(tmp_path / "image" / "b.png")]
    assert "skipped 1 problem" in caplog.text
    # The corrupt image is replaced by the next good one, and recorded.
    with caplog.at_level(logging.WARNING, logger="mobilesam_se.data"):
        assert ds[1].image_id == "d"
    assert str(corrupt) in caplog.text
    assert str(corrupt) in [p.path for p in ds.skipped]
    problems = ds.validate()
    assert ds.ids == ["a", "d"] and len(ds) == 2
    assert {p.path for p in problems} == {str(tmp_path / "image" / "b.png"), str(corrupt)}


def test_skip_mode_with_nothing_left_raises(tmp_path):
    good_dataset(tmp_path, ["a"])
    (tmp_path / "image" / "a.png").write_bytes(b"garbage")
    ds = FolderDataset(tmp_path, image_size=S, on_error="skip")
    with pytest.raises(DatasetError, match="no readable image"):
        ds[0]


# ---- EXIF and pixel formats -------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    raw = np.zeros((32, 48, 3), np.uint8)  # stored 48 wide, 32 high
    raw[:, :24] = (255, 0, 0)  # left half red
    raw[:, 24:] = (0, 0, 255)
    (tmp_path / "image").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(raw).save(tmp_path / "image" / "r.jpg", exif=exif, quality=95)
    (tmp_path / "mask" / "r").mkdir(parents=True)
    mask_path = tmp_path / "mask" / "r" / "m.png"
    cv2.imwrite(str(mask_path), rect_mask((48, 32), 0, 24, 0, 32).astype(np.uint8) * 255)
    sample = FolderDataset(tmp_path, image_size=S, keep_original=True)[0]
    assert sample.orig_size == (48, 32)
    expected = np.rot90(raw, k=-1)  # clockwise, computed without Pillow
    away_from_edge = np.r_[0:20, 28:48]  # JPEG chroma subsampling blurs the red/blue edge
    assert np.abs(sample.image_uint8.astype(int) - expected)[away_from_edge].max() < 40
    assert sample.image_uint8[:20, :, 0].min() > 200 and sample.image_uint8[28:, :, 2].min() > 200
    # A mask drawn on the stored (unrotated) pixels is caught, with a hint.
    cv2.imwrite(str(mask_path), rect_mask((32, 48), 0, 10, 0, 10).astype(np.uint8) * 255)
    msg = raised(lambda: FolderDataset(tmp_path, image_size=S)[0])[0].message
    assert "EXIF" in msg and "rotated" in msg


@pytest.mark.parametrize("kind", ["rgba", "gray", "gray16", "palette", "rgb16"])
def test_image_modes_convert_to_rgb8_without_warnings(tmp_path, kind):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    path = tmp_path / "image" / "x.png"
    path.parent.mkdir()
    if kind == "rgba":
        Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (24, 32), dtype=np.uint8)])).save(path)
        expected = rgb
    elif kind == "gray":
        Image.fromarray(rgb[..., 0]).save(path)
        expected = np.repeat(rgb[..., :1], 3, axis=2)
    elif kind == "gray16":
        cv2.imwrite(str(path), rgb[..., 0].astype(np.uint16) * 257)  # full 16-bit range
        expected = np.repeat(rgb[..., :1], 3, axis=2)
    elif kind == "rgb16":
        cv2.imwrite(str(path), rgb[..., ::-1].astype(np.uint16) * 257)
        expected = rgb
    else:
        pal = Image.fromarray(rgb[..., 0] // 64)  # 4 colours
        pal = pal.convert("P")
        pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
        pal.info["transparency"] = 0
        pal.save(path, transparency=0)
        lut = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
        expected = lut[rgb[..., 0] // 64]
    (tmp_path / "mask" / "x").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "mask" / "x" / "m.png"), rect_mask((24, 32), 0, 5, 0, 5).astype(np.uint8) * 255)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = FolderDataset(tmp_path, image_size=S, keep_original=True)[0]
    assert sample.image_uint8.dtype == np.uint8 and sample.image_uint8.shape == (24, 32, 3)
    np.testing.assert_array_equal(sample.image_uint8, expected)


def test_mask_value_encodings(tmp_path):
    """0/1, 0/255, 16-bit and paletted masks: any nonzero value is the object."""
    good_dataset(tmp_path, ["a"])
    folder = tmp_path / "mask" / "a"
    for p in folder.iterdir():
        p.unlink()
    hw = (24, 32)
    cv2.imwrite(str(folder / "m0.png"), rect_mask(hw, 0, 2, 0, 5).astype(np.uint8))  # 0/1
    m16 = rect_mask(hw, 5, 8, 0, 5).astype(np.uint16) * 1000  # 16-bit, values > 1
    m16[5, 0] = 2
    cv2.imwrite(str(folder / "m1.png"), m16)
    pal = Image.fromarray(rect_mask(hw, 10, 14, 0, 5).astype(np.uint8) * 3).convert("P")
    pal.save(folder / "m2.png")
    cv2.imwrite(str(folder / "m3.png"), np.dstack([rect_mask(hw, 20, 21, 0, 5).astype(np.uint8) * 255] * 3))  # colour
    masks = FolderDataset(tmp_path, image_size=S)[0].masks.numpy()
    rows = [(0, 2), (5, 8), (10, 14), (20, 21)]
    np.testing.assert_array_equal(masks, np.stack([rect_mask(hw, y0, y1, 0, 5) for y0, y1 in rows]))
