"""`python -m mobilesam_se.data.check`: output and exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from mobilesam_se.data import write_folder_sample

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mobilesam_se.data.check", *args, "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


def make_dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for image_id in ("a", "b", "c"):
        mask = np.zeros((16, 20), bool)
        mask[2:8, 3:9] = True
        write_folder_sample(root, image_id, rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), [mask])


def test_cli_good_and_bad_folder(tmp_path):
    make_dataset(tmp_path)
    good = run_cli(str(tmp_path))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK: 3 image(s)" in good.stdout

    (tmp_path / "image" / "a.png").write_bytes(b"broken")  # found only by decoding
    (tmp_path / "mask" / "b" / "obj_000.png").unlink()  # empty mask folder, found by indexing
    (tmp_path / "image" / "notes.txt").write_text("x")
    bad = run_cli(str(tmp_path))
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert any(line.startswith(f"{tmp_path / 'image' / 'a.png'}: cannot decode image") for line in lines)
    assert any(line.startswith(f"{tmp_path / 'mask' / 'b'}: mask folder is empty") for line in lines)
    assert any(line.startswith(f"{tmp_path / 'image' / 'notes.txt'}: not an image") for line in lines)
    assert lines[-1].startswith("3 problem(s) in 3 file(s)")
    assert "Traceback" not in bad.stderr


def test_cli_coco_and_missing_root(tmp_path):
    (tmp_path / "img").mkdir()
    ann = tmp_path / "ann.json"
    images = [{"id": 1, "file_name": "gone.jpg", "height": 4, "width": 4}]
    ann.write_text(json.dumps({"images": images, "annotations": []}))
    out = run_cli(str(tmp_path / "img"), "--annotations", str(ann))
    assert out.returncode == 1 and f"{tmp_path / 'img' / 'gone.jpg'}: image listed in ann.json not found" in out.stdout
    missing = run_cli(str(tmp_path / "nope"), "--kind", "sa1b")
    assert missing.returncode == 1 and "SA-1B folder not found" in missing.stdout
