"""Synthetic scenes: determinism, exact visible-part masks, caching, speed."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import torch
import pytest

from mobilesam_se.data import FolderDataset, SyntheticDataset, ensure_synthetic_dataset, generate_synthetic_dataset


def tree_bytes(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    a = tree_bytes(generate_synthetic_dataset(tmp_path / "a", 6, (48, 64), seed=7))
    b = tree_bytes(generate_synthetic_dataset(tmp_path / "b", 6, (48, 64), seed=7))
    c = tree_bytes(generate_synthetic_dataset(tmp_path / "c", 6, (48, 64), seed=8))
    assert a == b
    images = [k for k in a if k.startswith("image/")]
    assert len(images) == 6
    assert all(a[k] != c.get(k) for k in images)


def test_masks_are_exact_visible_parts(tmp_path):
    root = generate_synthetic_dataset(tmp_path / "d", 12, (64, 80), seed=3, min_visible_fraction=0.005)
    ds = FolderDataset(root, image_size=64, keep_original=True)
    sizes, counts = set(), []
    for i in range(len(ds)):
        sample = ds[i]
        masks = sample.masks.numpy()
        h, w = sample.orig_size
        sizes.add((h, w))
        assert h <= 64 and w <= 80
        counts.append(len(masks))
        # later objects occlude earlier ones: no pixel belongs to two masks
        assert masks.sum(axis=0).max() <= 1
        assert (masks.reshape(len(masks), -1).sum(axis=1) >= max(16, round(0.005 * h * w))).all()
        # each visible part is painted in its own texture, so it differs from the background
        # somewhere (the masks are not just labels drawn beside the image)
        image = sample.image_uint8.astype(int)
        background = ~masks.any(axis=0)
        if background.any():
            assert any(np.abs(image[m].mean(axis=0) - image[background].mean(axis=0)).max() > 1 for m in masks)
    assert len(sizes) > 3  # aspect ratios vary
    assert max(counts) >= 5 and min(counts) >= 1


def test_ensure_generates_once_and_regenerates_on_change(tmp_path):
    root = tmp_path / "cache" / "syn"
    assert ensure_synthetic_dataset(root, 3, (32, 32), seed=1) == root
    marker = root / "image" / "marker"
    marker.write_text("kept while the parameters match")
    ensure_synthetic_dataset(root, 3, (32, 32), seed=1)
    assert marker.exists()
    ensure_synthetic_dataset(root, 4, (32, 32), seed=1)
    assert not marker.exists() and len(list((root / "image").iterdir())) == 4
    assert sorted(p.name for p in root.parent.iterdir()) == [".syn.lock", "syn"]  # no temp folders left


def _ensure_then_read(root: str, start, out, generations) -> None:
    import time
    import mobilesam_se.data.synthetic as synthetic
    generate = synthetic.generate_synthetic_dataset

    def counted(*args, **kwargs):  # counts generations across processes; the sleep widens the race
        with generations.get_lock():
            generations.value += 1
        time.sleep(0.3)
        return generate(*args, **kwargs)

    synthetic.generate_synthetic_dataset = counted  # this forked child's module only
    start.wait()
    got = ensure_synthetic_dataset(root, 3, (32, 32), seed=1)
    inode = got.stat().st_ino
    FolderDataset(got).validate()  # reads every file: fails if root moves away meanwhile
    out.put((inode, got.stat().st_ino))


def test_concurrent_generators_generate_once_and_never_replace_a_finished_dataset(tmp_path):
    # Ranks that start together: one generates, the others wait on the lock and read its folder;
    # none may move a finished root away under a reader (the DDP test once saw that).
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    start, out, generations = ctx.Event(), ctx.Queue(), ctx.Value("i", 0)
    root = str(tmp_path / "syn")
    procs = [ctx.Process(target=_ensure_then_read, args=(root, start, out, generations)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    inodes = {out.get(timeout=5) for _ in procs}
    assert len({i for pair in inodes for i in pair}) == 1  # one folder, read by all, never replaced
    assert generations.value == 1


def test_synthetic_dataset_splits_and_default_root(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(tmp_path / "data"))
    train = SyntheticDataset(num_images=3, image_hw=(32, 40), split="train", image_size=64)
    val = SyntheticDataset(num_images=3, image_hw=(32, 40), split="val", image_size=64)
    assert train.root.parent == tmp_path / "data" / "synthetic" and val.root.parent == train.root.parent
    assert train.root != val.root
    assert not np.array_equal(train[0].image.numpy(), val[0].image.numpy())
    again = SyntheticDataset(num_images=3, image_hw=(32, 40), split="train", image_size=64)
    assert again.root == train.root
    with pytest.raises(ValueError, match="split"):
        SyntheticDataset(root=tmp_path, num_images=1, split="test")


def test_generation_writes_every_image(tmp_path):
    root = generate_synthetic_dataset(tmp_path / "many", 64, (256, 256), seed=0)
    assert len(list((root / "image").iterdir())) == 64


def test_stream_gives_fresh_repeatable_scenes_per_epoch():
    from mobilesam_se.data.synthetic import SyntheticStreamDataset

    kw = dict(num_images=3, image_hw=(48, 64), seed=5, image_size=64, grid_points=4)
    a, b = SyntheticStreamDataset(**kw), SyntheticStreamDataset(**kw)
    first = [a[i] for i in range(3)]
    assert all(torch.equal(x.image, b[i].image) and torch.equal(x.masks, b[i].masks) for i, x in enumerate(first))
    a.set_epoch(1)
    assert not any(torch.equal(a[i].image, first[i].image) for i in range(3))  # new scenes each epoch
    b.set_epoch(1)
    assert torch.equal(a[2].masks, b[2].masks)  # a resumed epoch sees the same scenes
    assert first[0].masks.shape[0] >= 1 and first[0].masks_lowres.shape[-1] == 16
    assert a.validate() == []
    val = SyntheticStreamDataset(split="val", **kw)
    assert not torch.equal(val[0].image, first[0].image)  # splits use independent seeds


def test_stream_ids_name_the_epoch():
    from mobilesam_se.data.synthetic import SyntheticStreamDataset

    ds = SyntheticStreamDataset(num_images=2, image_hw=(32, 40), image_size=64, grid_points=2)
    first = (ds[1].image_id, ds[1].file_name)
    ds.set_epoch(3)
    assert ds[1].image_id != first[0] and ds[1].file_name != first[1] and "0003" in ds[1].image_id
