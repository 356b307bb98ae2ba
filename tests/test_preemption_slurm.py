"""On the local SLURM (scripts/slurm): a 2-task DDP job (`hydra.launcher.tasks_per_node=2`, gloo)
is sent `scancel --signal=USR1` while it trains; the ranks agree to stop after the same step, rank 0
saves last.ckpt, submitit requeues the job, and the requeued job resumes in the same run directory
with the same W&B run id and finishes.

Needs root (daemons); skipped otherwise, but FAILS under CI=true as root (tests/helpers/slurm_utils.py).
"""
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ddp import EQUIV  # noqa: E402
from test_sweeps_slurm import SLURM_LAUNCHER, slurm_env  # noqa: E402

from mobilesam_se.models.checkpoint import read_checkpoint  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
EPOCHS = 30  # the signal comes after epoch 1; the rest (~0.2 s each) leaves it seconds to arrive while training, also on a loaded machine (8 were once too few)


def _submitit_logs(sweep):
    return "\n".join(f"== {f.name}\n" + f.read_text(errors="replace") for f in sorted((sweep / ".submitit").glob("*/*"))
                     if f.suffix in (".out", ".err"))


def _wait(cond, timeout, what, proc=None, poll=0.3, sweep=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            logs = _submitit_logs(sweep)[-6000:] if sweep is not None else ""
            raise AssertionError(f"the launcher exited (rc {proc.returncode}) while waiting for {what}\n{logs}")
        time.sleep(poll)
    raise AssertionError(f"timed out ({timeout:.0f}s) waiting for {what}")


def test_ddp_job_preempted_requeued_and_resumed(slurm_cluster, tmp_path):
    t0 = time.monotonic()
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *SLURM_LAUNCHER, "hydra.launcher.tasks_per_node=2",
           f"hydra.launcher.partition={slurm_cluster.partition}", f"hydra.sweep.dir={sweep}",
           *[o for o in EQUIV if not o.startswith(("logger", "trainer.max_epochs"))], "logger=wandb", "dataset.batch_size=1",
           f"trainer.max_epochs={EPOCHS}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slurm_env(slurm_cluster, tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    job_id = None
    try:
        # Signal only after the first epoch: by then every rank has passed the DDP all-reduce, so every
        # rank's handler is installed (a rank signalled before that dies of SIGUSR1's default action).
        def started():
            if not (sweep / "0" / "checkpoints" / "training_log.txt").is_file():
                return None
            for f in (sweep / ".submitit").glob("*/*_0_log.*"):
                if "preemption:" in f.read_text(errors="replace"):
                    return f.parent.name
            return None

        job_id = _wait(started, 240, "both ranks to finish their first epoch", proc, sweep=sweep)
        slurm_cluster.run(["scancel", "--signal=USR1", job_id])

        # SLURM holds a requeued batch job for ~2 min (BeginTime); release it now.
        def requeued():
            st = slurm_cluster.run(["squeue", "-h", "-j", job_id, "-o", "%T"], check=False).stdout.split()
            return st[:1] == ["PENDING"] or None

        _wait(requeued, 120, "the job to be requeued (was it still training when signalled?)", proc, poll=0.2,
              sweep=sweep)
        slurm_cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=False)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if job_id:
            slurm_cluster.run(["scancel", job_id], check=False)
        reader.join(timeout=10)
    text = "".join(out)
    logs = _submitit_logs(sweep)
    assert proc.returncode == 0, text[-3000:] + logs[-6000:]

    assert "stopped by SIGUSR1: last.ckpt saved; requeueing" in logs and "Requeued job" in logs, logs[-6000:]
    assert "this job is preempted" in logs  # not counted against max_num_timeout
    assert "resumed from" in logs
    run = sweep / "0"
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (state["step"], state["epoch"]) == (2 * EPOCHS, EPOCHS)  # 4 images / 2 ranks x batch 1 a step
    assert len((run / "checkpoints" / "training_log.txt").read_text().splitlines()) == EPOCHS
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs  # one W&B run, resumed
    print(f"SLURM DDP preempt + requeue: {time.monotonic() - t0:.0f}s")
