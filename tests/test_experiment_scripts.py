"""The diagnostic scripts under experiments/ still run against the package as it is now.

They are run by hand on real checkpoints (experiments/learning, experiments/default_run); here each
runs as written on a random tiny model's best.pt, so a renamed function or flag breaks CI, not the
next round of experiments.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import export_official

REPO = Path(__file__).resolve().parents[1]
VAL_IMAGES, GRID, TOKENS = 32, 8, 3  # the default config's val split and grid; multimask


@pytest.fixture(scope="module")
def tiny_best(tmp_path_factory):
    """A bare best.pt of a tiny model at the default's 256 px (the scripts read its size from the
    weights), and a data folder shared by the scripts' runs."""
    root = tmp_path_factory.mktemp("scripts")
    torch.manual_seed(0)
    export_official(build_mobilesam(256, size="tiny").eval(), root / "best.pt")
    return root / "best.pt", root / "data"


def run_script(path: str, *args, data: Path) -> str:
    env = dict(os.environ, MOBILESAM_SE_DATA=str(data))
    proc = subprocess.run([sys.executable, str(REPO / path), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_stability_and_iou_resolution_scripts(tiny_best):
    ckpt, data = tiny_best
    out = run_script("experiments/learning/stability.py", ckpt, data=data)
    images, masks, kept = map(int, re.search(r"(\d+) images, (\d+) masks;.*keeps\): (\d+)", out).groups())
    assert images == VAL_IMAGES and 0 < masks <= VAL_IMAGES * GRID * GRID * TOKENS and kept == 0
    out = run_script("experiments/learning/iou_resolution.py", ckpt, data=data)
    n, pred, low, full = re.search(r"(\d+) candidates; mean predicted ([\d.-]+), low-res ([\d.]+), full-res ([\d.]+)",
                                   out).groups()
    assert int(n) == VAL_IMAGES * GRID * GRID * TOKENS
    assert 0.0 <= float(low) <= 1.0 and 0.0 <= float(full) <= 1.0


def test_best_masks_script(tiny_best):
    ckpt, data = tiny_best
    out = run_script("experiments/learning/best_masks.py", ckpt, data=data)
    total = int(re.search(r"(\d+) objects", out).group(1))
    per_size = [int(n) for n in re.findall(r"n=(\d+)", out)]
    assert len(per_size) == 3 and sum(per_size) == total > 0  # every object in one size bin


def test_overlay_script(tiny_best, tmp_path, monkeypatch):
    ckpt, data = tiny_best
    png = tmp_path / "overlay.png"
    out = run_script("experiments/default_run/overlay.py", ckpt, "-o", png, "--scenes", "0,1", data=data)
    assert "stock" in out  # no best.amg.yaml beside this checkpoint
    import cv2

    from hydra.utils import instantiate

    from helpers.hydra_utils import compose_cfg

    monkeypatch.setenv("MOBILESAM_SE_DATA", str(data))  # the scenes the script read
    val = instantiate(compose_cfg([]).dataset.val, keep_original=True)
    sizes = [val[i].orig_size for i in (0, 1)]
    pic = cv2.imread(str(png))
    assert pic is not None
    # the two scenes stacked with a 4-px gap, each ground truth | AMG side by side
    assert pic.shape[0] == sum(h + 4 for h, _ in sizes)
    assert pic.shape[1] == max(2 * w + 4 for _, w in sizes)
    assert np.unique(pic.reshape(-1, 3), axis=0).shape[0] > 10  # a picture, not a blank
