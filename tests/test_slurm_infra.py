"""End-to-end checks of the local SLURM test cluster (scripts/slurm) with submitit.

Needs root (daemons); skipped otherwise, but FAILS under CI=true as root.
Job functions live in tests/helpers/slurm_jobs.py (submitit pickles them by reference).
"""
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import submitit

# tests/ is not a package: make the helpers importable under any import mode
# (the job functions must be imported as "helpers.slurm_jobs", as in the job).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import slurm_jobs  # noqa: E402
from helpers.slurm_utils import job_result, make_executor, wait_job  # noqa: E402 (fixtures slurm, slurm_cluster: tests/conftest.py)

pytestmark = pytest.mark.slurm


def test_cluster_is_up(slurm_cluster):
    out = slurm_cluster.run(["sinfo", "-h", "-o", "%P %a %T %c %D"]).stdout.split()
    assert out[:3] == ["debug*", "up", "idle"], out
    assert int(out[3]) >= 2  # a 2-task job fits


def test_function_result(slurm, tmp_path):
    job = make_executor(slurm, tmp_path).submit(slurm_jobs.add, 2, 3)
    res = job_result(job, timeout=60)
    assert res["sum"] == 5
    assert res["job_id"] == str(job.job_id)
    # the result pickle exists before SLURM marks the job finished: poll the state
    deadline = time.monotonic() + 30
    while (state := job.watcher.get_state(job.job_id, mode="force")) != "COMPLETED":
        assert time.monotonic() < deadline and state in ("RUNNING", "COMPLETING"), state
        time.sleep(0.3)


def test_two_tasks_see_both_ranks(slurm, tmp_path):
    ex = make_executor(slurm, tmp_path, nodes=1, tasks_per_node=2, cpus_per_task=1)
    job = ex.submit(slurm_jobs.rank_info)
    results = job_result(job, timeout=60, all_tasks=True)
    assert sorted(r["global_rank"] for r in results) == [0, 1]
    assert {r["world_size"] for r in results} == {2}
    assert {r["num_nodes"] for r in results} == {1}


def test_hard_exit_is_reported_failed(slurm, tmp_path):
    """A job that dies before writing its result pickle must not hang the waiter
    (without slurmdbd, real sacct fails and submitit would poll forever)."""
    t0 = time.monotonic()
    job = make_executor(slurm, tmp_path).submit(slurm_jobs.hard_exit, 3)
    assert wait_job(job, timeout=60) == "FAILED"
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="has not produced any output"):
        job_result(job, timeout=10)
    assert "about to die" in (job.stdout() or "")
    assert time.monotonic() - t0 < 60


def test_exception_is_reported(slurm, tmp_path):
    job = make_executor(slurm, tmp_path).submit(slurm_jobs.raise_error, "boom-42")
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom-42"):
        job_result(job, timeout=60)


def test_cancelled_job_finishes(slurm, tmp_path):
    job = make_executor(slurm, tmp_path).submit(slurm_jobs.sleep, 300)
    deadline = time.monotonic() + 30
    while job.watcher.get_state(job.job_id, mode="force") != "RUNNING":
        assert time.monotonic() < deadline, "job never started"
        time.sleep(0.3)
    job.cancel()
    assert wait_job(job, timeout=30).startswith("CANCELLED")
    with pytest.raises(submitit.core.utils.UncompletedJobError):
        job_result(job, timeout=10)


HYDRA_APP = textwrap.dedent(
    """
    import os
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base=None, config_path=None)
    def main(cfg):
        with open(os.path.join(HydraConfig.get().runtime.output_dir, "out.txt"), "w") as f:
            f.write(f"{cfg.x} {os.environ['SLURM_ARRAY_JOB_ID']}")
        return cfg.x

    if __name__ == "__main__":
        main()
    """
)


def test_hydra_submitit_sweep(slurm_cluster, tmp_path):
    """A Hydra multirun through hydra-submitit-launcher (a job array) in a subprocess
    driven only by `slurm_cluster.env`."""
    (tmp_path / "app.py").write_text(HYDRA_APP)
    sweep = tmp_path / "multirun"
    proc = subprocess.run(
        [sys.executable, "app.py", "-m", "+x=1,2", "hydra/launcher=submitit_slurm",
         f"hydra.launcher.partition={slurm_cluster.partition}", "hydra.launcher.timeout_min=5",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, env=slurm_cluster.env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outs = sorted((sweep / str(i) / "out.txt").read_text().split()[0] for i in range(2))
    assert outs == ["1", "2"]
