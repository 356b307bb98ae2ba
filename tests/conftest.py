import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

# The official `mobile_sam` package re-registers timm names on import and timm warns about old paths.
warnings.filterwarnings("ignore", message="Overwriting tiny_vit")
warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from helpers.slurm_utils import slurm, slurm_cluster  # noqa: E402,F401 (fixtures: one local SLURM for the session)

REPO = Path(__file__).resolve().parents[1]
COCO_SAMPLE = REPO.parent / "shared" / "data" / "coco_sample"


@pytest.fixture
def synthetic_data(tmp_path_factory, monkeypatch) -> Path:
    """One folder of generated scenes for the session (paths.data_dir, from $MOBILESAM_SE_DATA), so
    each set of scenes is generated once however many tests train on it."""
    path = tmp_path_factory.getbasetemp() / "data"
    monkeypatch.setenv("MOBILESAM_SE_DATA", str(path))
    return path


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    """A real photograph (skimage's coffee cup, 400 x 600 RGB)."""
    from skimage import data

    return data.coffee()


def perturbed_official_state_dict(ref: torch.nn.Module, seed: int = 0, scale: float = 0.05):
    """The reference's random init, perturbed so that biases, norms and BN stats are all non-trivial."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ref.state_dict().items():
        if not v.dtype.is_floating_point:
            sd[k] = v
        elif "running_var" in k:
            sd[k] = v.abs() + 0.5 + 0.1 * torch.rand(v.shape, generator=g)
        else:
            sd[k] = v + scale * torch.randn(v.shape, generator=g)
    return sd

# The start-up dataset check caches its results (mobilesam_se/data/check.py): one folder per test session.
if "MOBILESAM_SE_CACHE" not in os.environ:
    import tempfile

    os.environ["MOBILESAM_SE_CACHE"] = tempfile.mkdtemp(prefix="mobilesam_se_cache_")
