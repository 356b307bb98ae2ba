"""The headline command: `python run.py distillation=full model.multimask_output=false`.

Composition (MobileSAM student at 1024, teachers by name), the one clear message offline and for
other user errors, the order of the start-up checks, the cached dataset check, and a short CPU run
of the preset with stand-in teachers in the official layout (random weights, generated here).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import yaml

from helpers.hydra_utils import compose_cfg
from mobilesam_se import weights
from mobilesam_se.data import DatasetError, FolderDataset, write_folder_sample
from mobilesam_se.data.check import check_dataset
from mobilesam_se.distill import build_distiller
from mobilesam_se.distill.cache import precompute
from mobilesam_se.models import teachers as teachers_mod
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import official_state_dict
from mobilesam_se.models.sam_vit import SAM_VIT_CONFIGS
from mobilesam_se.models.teachers import EncoderNotLoaded, build_sam_vit_teacher
from mobilesam_se.assembly import build_datasets, build_run

REPO = Path(__file__).resolve().parents[1]
HEADLINE = ["distillation=full", "model.multimask_output=false"]
SMALL = 128  # smoke size of the short runs: 8x8 embeddings


def run_py(args: List[str], env: Dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def env(tmp_path) -> Dict[str, str]:
    """A subprocess environment whose caches all live in tmp_path."""
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            weights.ENV_DIR: str(tmp_path / "weights"), "MOBILESAM_SE_DATA": str(tmp_path / "data"),
            "MOBILESAM_SE_CACHE": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": ""}


# -- composition --------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["seed", "full", "encoder"])
def test_official_teacher_presets_compose_the_mobilesam_student_at_1024(preset):
    cfg = compose_cfg([f"distillation={preset}", "model.multimask_output=false"])
    assert (cfg.model.name, cfg.model.size, cfg.model.image_size) == ("mobilesam", "mobilesam", 1024)
    assert [(t.model, t.checkpoint) for t in cfg.distillation.teachers] == [("sam_vit_h", "sam_vit_h"), ("mobilesam", "mobile_sam")]
    assert cfg.distillation.name == preset and cfg.model.multimask_output is False
    # The user's choices win over the preset's.
    small = compose_cfg([f"distillation={preset}", "model=tiny", "model.image_size=256"])
    assert (small.model.size, small.model.image_size) == ("tiny", 256)
    assert compose_cfg(["distillation=none"]).model.size == "small"  # no teacher: run.py's CPU default stays


def test_headline_command_composes_on_the_command_line(env):
    done = run_py(HEADLINE + ["--cfg", "job"], env)
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load(done.stdout)
    assert (job["model"]["name"], job["model"]["image_size"], job["model"]["multimask_output"]) == ("mobilesam", 1024, False)
    assert [t["checkpoint"] for t in job["distillation"]["teachers"]] == ["sam_vit_h", "mobile_sam"]


# -- one clear message --------------------------------------------------------------------------------
def _refused_port() -> int:
    with socket.socket() as s:  # nobody listens here: the download fails at once, on this host only
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_headline_command_prints_one_clear_message(tmp_path, env):
    port = _refused_port()
    table = {n: {"url": f"http://127.0.0.1:{port}/{e.filename}", "sha256": e.sha256, "filename": e.filename}
             for n, e in weights.OFFICIAL.items()}
    (tmp_path / "table.json").write_text(json.dumps(table))
    env[weights.ENV_TABLE] = str(tmp_path / "table.json")
    done = run_py(HEADLINE, env)
    assert done.returncode == 2, done.stdout + done.stderr
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), done.stderr
    msg = err[0]
    for name in ("sam_vit_h", "mobile_sam"):
        assert f"{table[name]['url']} -> {tmp_path / 'weights' / table[name]['filename']}" in msg
    assert "python -m mobilesam_se.weights fetch sam_vit_h mobile_sam" in msg
    assert "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "cache").exists()  # nothing decoded or generated
    # The debug switch shows where it came from.
    env["HYDRA_FULL_ERROR"] = "1"
    env[weights.ENV_OFFLINE] = "1"
    debug = run_py(HEADLINE, env)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "MOBILESAM_SE_OFFLINE" in debug.stderr


def _bad_folder(root: Path) -> None:
    """3 images; 5 problems: 2 found by indexing, 3 only by decoding."""
    rng = np.random.default_rng(0)
    for image_id in ("a", "b", "c", "d", "e"):
        mask = np.zeros((16, 20), bool)
        mask[2:8, 3:9] = True
        write_folder_sample(root, image_id, rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), [mask])
    (root / "image" / "a.png").write_bytes(b"broken")  # corrupt image (decode)
    write_folder_sample(root, "b", rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), [np.zeros((16, 20), bool)])  # all-zero (decode)
    from PIL import Image

    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(root / "mask" / "c" / "obj_000.png")  # size mismatch (decode)
    (root / "image" / "notes.txt").write_text("x")  # stray file (index)
    (root / "mask" / "d" / "obj_000.png").unlink()  # empty mask folder (index)


@pytest.mark.parametrize("case", ["missing_key", "width", "single_mode", "dataset"])
def test_user_errors_are_one_plain_message(case, tmp_path, env):
    args = {
        "missing_key": ["dataset=folder"],
        "width": HEADLINE + ["model=tiny"],
        "single_mode": HEADLINE + ["prompted.mode=single"],
        "dataset": ["dataset=folder", f"dataset.root={tmp_path / 'ds'}", "logger=none", "model=tiny"],
    }[case]
    if case == "dataset":
        _bad_folder(tmp_path / "ds")
    done = run_py(args, env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("error: ") == 1 and "Traceback" not in done.stderr and "HYDRA_FULL_ERROR" not in done.stderr
    assert "Error in call to target" not in done.stderr
    first = done.stderr[done.stderr.index("error: "):].splitlines()[0]
    if case == "dataset":
        assert "checking " in done.stderr  # the dataset check's progress bar
    if case == "missing_key":
        assert "dataset.root is not set" in first and "dataset.root=<path>" in first
    elif case == "width":
        assert "width 256" in first and "32" in first and "model=mobilesam" in first
    elif case == "single_mode":
        assert "prompted.mode=single" in first and "prompted.mode=mixed" in first
    else:
        assert "5 problems" in first
        for needle in ("a.png: cannot decode", "b/obj_000.png: mask is empty", "c/obj_000.png: mask is 10x10",
                       "notes.txt: not an image", "mask/d: mask folder is empty"):
            assert needle in done.stderr, (needle, done.stderr)


# -- the dataset check: all problems, cached ------------------------------------------------------------
def test_dataset_check_lists_everything_and_is_cached_per_dataset_version(tmp_path, monkeypatch):
    root = tmp_path / "ds"
    _bad_folder(root)
    cfg = compose_cfg(["dataset=folder", f"dataset.root={root}", "model=tiny", f"paths.cache_dir={tmp_path / 'checks'}"])
    with pytest.raises(DatasetError) as info:
        build_datasets(cfg)
    assert len(info.value.problems) == 5
    decoded = []
    orig = FolderDataset._decode
    monkeypatch.setattr(FolderDataset, "_decode", lambda self, r: decoded.append(r.image_id) or orig(self, r))
    with pytest.raises(DatasetError) as again:
        build_datasets(cfg)  # train and val: the same folder, both served by the cache
    assert decoded == [] and [str(p) for p in again.value.problems] == [str(p) for p in info.value.problems]
    # A fixed file is a new dataset version: decoded again, and the problem is gone.
    write_folder_sample(root, "b", np.zeros((16, 20, 3), np.uint8), [np.pad(np.ones((4, 4), bool), ((0, 12), (0, 16)))])
    skip = compose_cfg(["dataset=folder", f"dataset.root={root}", "model=tiny", "dataset.on_error=skip",
                        f"paths.cache_dir={tmp_path / 'checks'}"])
    train, val = build_datasets(skip)
    assert decoded and len(train) == 2 and sorted(train.ids) == ["b", "e"]
    ds = FolderDataset(root, image_size=64, grid_points=2, on_error="skip")
    decoded.clear()
    assert len(check_dataset(ds, cache_dir=tmp_path / "checks")) == 4 and decoded == [] and len(ds) == 2


# -- stand-in teachers of the official layout -----------------------------------------------------------
@pytest.fixture
def stand_in_teachers(tmp_path, monkeypatch) -> Path:
    """sam_vit_h / mobile_sam files of the official layouts (a tiny ViT as "ViT-H"), cached by name."""
    monkeypatch.setitem(teachers_mod.SAM_VIT_CONFIGS, "vit_h", SAM_VIT_CONFIGS["tiny"])
    folder = tmp_path / "weights"
    folder.mkdir()
    torch.manual_seed(0)
    files = {
        "sam_vit_h": official_state_dict(build_sam_vit_teacher(SAM_VIT_CONFIGS["tiny"], 1024, "mobilesam")),
        "mobile_sam": official_state_dict(build_mobilesam(1024, "mobilesam")),
    }
    table = {}
    for name, sd in files.items():
        entry = weights.OFFICIAL[name]
        torch.save(sd, folder / entry.filename)
        digest = hashlib.sha256((folder / entry.filename).read_bytes()).hexdigest()
        table[name] = {"url": entry.url, "sha256": digest, "filename": entry.filename}  # the stand-in's own hash
    (tmp_path / "table.json").write_text(json.dumps(table))
    monkeypatch.setenv(weights.ENV_TABLE, str(tmp_path / "table.json"))
    monkeypatch.setenv(weights.ENV_DIR, str(folder))
    monkeypatch.setenv(weights.ENV_OFFLINE, "1")  # everything must come from the cache
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(tmp_path / "data"))
    return folder


SMOKE = ["logger=none", f"model.image_size={SMALL}", "dataset.train.num_images=1", "dataset.val.num_images=1",
         "dataset.grid_points=2", "dataset.batch_size=1", "dataset.val_batch_size=1", "trainer.max_epochs=1",
         "trainer.max_steps=1", "trainer.log_every=1", "trainer.warmup_steps=1", "trainer.progress=false",
         "visual.num_images=1"]


def test_headline_preset_trains_with_stand_in_teachers(stand_in_teachers, tmp_path, caplog):
    cfg = compose_cfg(HEADLINE + SMOKE)
    assert cfg.model.size == "mobilesam" and [t.checkpoint for t in cfg.distillation.teachers] == ["sam_vit_h", "mobile_sam"]
    with caplog.at_level(logging.WARNING):
        trainer, cleanup = build_run(cfg, out_dir=tmp_path / "run")
    try:
        result = trainer.fit()
    finally:
        cleanup()
    assert [t.spec.checkpoint for t in trainer.distiller.teachers] == [
        str(stand_in_teachers / "sam_vit_h_4b8939.pth"), str(stand_in_teachers / "mobile_sam.pt")]
    assert sum("below its native 1024" in r.getMessage() for r in caplog.records) == 2
    train = result["history"][-1]
    for teacher in ("sam_h", "mobilesam"):
        for term in ("encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits"):
            v = train[f"train/distill/{teacher}/{term}"]
            assert math.isfinite(v) and v > 0, (teacher, term)
    assert result["step"] == 1 and math.isfinite(train["train/loss"])


def test_full_cache_means_no_teacher_encoder_and_bad_entries_are_misses(stand_in_teachers, tmp_path, caplog):
    root = tmp_path / "ds"
    write_folder_sample(root, "a", np.zeros((16, 20, 3), np.uint8), [np.pad(np.ones((4, 4), bool), ((0, 12), (0, 16)))])
    folder = [o for o in SMOKE if not o.startswith("dataset.train.num") and not o.startswith("dataset.val.num")]
    overrides = ["distillation=encoder", "dataset=folder", f"dataset.root={root}"] + folder + [
        f"distillation.cache_dir={tmp_path / 'emb'}"]
    cfg = compose_cfg(overrides)
    assert precompute(cfg, progress=False) == {"images": 1, "computed": 2}
    cfg = compose_cfg(overrides)
    from mobilesam_se.assembly import resolve_checkpoints

    specs = resolve_checkpoints(cfg)
    train, _ = build_datasets(cfg)
    d = build_distiller(cfg, specs=specs, train_files=train.image_paths)
    assert all(isinstance(t.model.image_encoder, EncoderNotLoaded) for t in d.teachers)
    # Another image size is another key: both configs share the folder, nothing is overwritten.
    small = compose_cfg(overrides[:-1] + [f"model.image_size={SMALL // 2}", f"distillation.cache_dir={tmp_path / 'emb'}"])
    assert precompute(small, progress=False)["computed"] == 2
    assert len(list((tmp_path / "emb").rglob("*.pt"))) == 4
    # A foreign entry (not a dict), a wrong-shaped one: warned, recomputed (the encoder loads), overwritten.
    t0, t1 = d.teachers
    k0 = t0.cache.key(train.image_paths[0], None)
    k1 = t1.cache.key(train.image_paths[0], None)
    torch.save([1, 2, 3], t0.cache.path(k0))
    torch.save({"key": k1, "embeddings": torch.zeros(3, 2, 2, dtype=torch.float16)}, t1.cache.path(k1))
    from torch.utils.data import DataLoader

    from mobilesam_se.data.sample import collate_samples

    batch = next(iter(DataLoader(train, batch_size=1, collate_fn=collate_samples)))
    with caplog.at_level(logging.WARNING):
        assert d.fill_cache(batch, torch.device("cpu")) == 2
    text = caplog.text
    assert "is not a teacher-cache entry" in text and "has shape (3, 2, 2)" in text and "loading its image encoder" in text
    assert not any(isinstance(t.model.image_encoder, EncoderNotLoaded) for t in d.teachers)
    assert t0.cache.hit_rate == 0.0 and t0.cache.misses == 1  # the bad entry was a miss, not a hit
    assert t0.cache.load(k0).shape == (256, SMALL // 16, SMALL // 16) and t0.cache.hit_rate == 0.5  # overwritten
    assert t1.cache.load(k1).shape == (256, SMALL // 16, SMALL // 16)
