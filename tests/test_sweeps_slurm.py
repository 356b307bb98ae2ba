"""`run.py -m hydra/launcher=slurm` on the local single-node SLURM (scripts/slurm): a 2-job sweep is
one job array whose jobs run in <sweep dir>/<job num> of ONE sweep directory (the default pattern,
re-resolved in every job), with W&B group / name per job.

Needs root (daemons); skipped otherwise, but FAILS under CI=true as root (tests/helpers/slurm_utils.py).
"""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_sweeps import SWEEP_TINY  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]

# Jobs on the test cluster: no GPU, 1 CPU each, no memory request, short limit.
SLURM_LAUNCHER = [
    "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=null", "hydra.launcher.timeout_min=15",  # < 10 min: submitit counts any stop as a time-out
]


def slurm_env(cluster, tmp_path):
    env = dict(cluster.env)
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", MOBILESAM_SE_DATA=str(tmp_path.parent / "slurm_data"))
    return env


def test_slurm_sweep_is_one_array_in_one_directory(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *SLURM_LAUNCHER,
           f"hydra.launcher.partition={slurm_cluster.partition}", *SWEEP_TINY, "logger=wandb", "logger.mode=disabled",
           "dataset.grid_points=2,4"]
    # cwd = tmp_path: the default sweep dir multirun/train/<time>_<uid> lands there
    proc = subprocess.run(cmd, cwd=tmp_path, env=slurm_env(slurm_cluster, tmp_path), capture_output=True,
                          text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + slurm_cluster.logs()
    sweeps = list((tmp_path / "multirun" / "train").iterdir())
    assert len(sweeps) == 1, sweeps  # every job resolved the launcher's directory
    sweep = sweeps[0]
    array_ids = {p.name.split("_")[0] for p in (sweep / ".submitit").iterdir() if p.name[:1].isdigit()}
    assert len(array_ids) == 1, list((sweep / ".submitit").iterdir())  # one job array
    for num, grid in ((0, "2"), (1, "4")):
        run = sweep / str(num)
        assert (run / "checkpoints" / "last.ckpt").exists() and (run / "checkpoints" / "training_log.txt").exists()
        cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
        assert cfg["dataset"]["grid_points"] == int(grid)
        assert cfg["logger"]["group"] == f"train-{sweep.name}"
        assert f"dataset.grid_points={grid}" in cfg["logger"]["name"]
    print(f"SLURM sweep of 2 jobs: {time.monotonic() - t0:.0f}s")
