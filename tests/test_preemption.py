"""Preemption: a signal mid-epoch saves last.ckpt and stops; the resumed run ends where an
uninterrupted one does; the exit protocol requeues the right way (plain SLURM, submitit, local);
and, with real processes, a submitit_local job signalled with USR2 is requeued by submitit and
resumes in the same run directory with the same W&B run."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers.hydra_utils import compose_cfg
from mobilesam_se.engine import preemption
from mobilesam_se.models.checkpoint import official_state_dict, read_checkpoint
from mobilesam_se.assembly import build_run

REPO = Path(__file__).resolve().parents[1]

# 4 images x batch 1 = 4 steps per epoch, 2 epochs; one validation at the end.
SMALL = [
    "debug=default", "model.image_size=128", "dataset.batch_size=1", "dataset.val.num_images=1", "trainer.val_every=2",
    "visual.num_images=0",
]


pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Runs here and in the job subprocess (OMP_NUM_THREADS=1) use one thread: bit-identical results."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run; a SIGTERM after its last step must not count as a preemption."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOBILESAM_SE_DATA", str(tmp_path_factory.getbasetemp() / "data"))
        trainer, res = _fit(tmp_path_factory.mktemp("reference"), signal_after_step=8, signum=signal.SIGTERM)
    assert res["step"] == 8 and res["epoch"] == 2
    assert res["preempted"] is None  # finished: nothing to requeue
    return official_state_dict(trainer.model)


def _fit(out_dir, signal_after_step=None, signum=signal.SIGUSR1):
    trainer, cleanup = build_run(compose_cfg(SMALL), out_dir=out_dir)
    if signal_after_step is not None:
        step = trainer._optimizer_step

        def stepped():
            ok = step()
            if trainer.step == signal_after_step:
                signal.raise_signal(signum)  # the real thing: handled by the trainer's handler
            return ok

        trainer._optimizer_step = stepped
    try:
        return trainer, trainer.fit()
    finally:
        cleanup()


def _assert_same_params(a, b, tol=0.0):
    a, b = (official_state_dict(x) if isinstance(x, torch.nn.Module) else x for x in (a, b))
    assert a.keys() == b.keys()
    bad = [(k, (a[k].float() - b[k].float()).abs().max().item()) for k in a
           if a[k].is_floating_point() and not torch.allclose(a[k].float(), b[k].float(), rtol=0, atol=tol)]
    assert not bad, sorted(bad, key=lambda kv: -kv[1])[:5]


def test_signal_mid_epoch_saves_and_resumes_exactly(tmp_path, reference):
    before = signal.getsignal(signal.SIGUSR1)
    stopped, res = _fit(tmp_path / "cut", signal_after_step=1)
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers restored after fit
    assert res["preempted"] == signal.SIGUSR1 and res["step"] == 1 and res["epoch"] == 0
    state = read_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (1, 0, 1)  # mid-epoch

    resumed, res2 = _fit(tmp_path / "cut")
    assert res2["preempted"] is None and (res2["step"], res2["epoch"]) == (8, 2)
    _assert_same_params(reference, resumed.model)
    assert len((tmp_path / "cut" / "checkpoints" / "training_log.txt").read_text().splitlines()) == 2


# -- the exit protocol --------------------------------------------------------------------------
@pytest.fixture
def no_job_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(k)
    monkeypatch.setattr(preemption, "_SAVED_HANDLERS", {})


def test_exit_outside_slurm(no_job_env):
    with pytest.raises(SystemExit) as e:
        preemption.exit_after_checkpoint(signal.SIGUSR1)
    assert e.value.code == 128 + signal.SIGUSR1
    with pytest.raises(SystemExit) as e:
        preemption.exit_after_checkpoint(signal.SIGTERM)
    assert e.value.code == 143


def test_exit_in_plain_slurm_job_requeues(no_job_env, monkeypatch, tmp_path):
    log = tmp_path / "calls"
    (tmp_path / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    with pytest.raises(SystemExit):
        preemption.exit_after_checkpoint(signal.SIGUSR2)
    assert log.read_text().split() == ["requeue", "1234"]
    with pytest.raises(SystemExit):  # SIGTERM: SLURM decides (scancel / PreemptMode=REQUEUE)
        preemption.exit_after_checkpoint(signal.SIGTERM)
    assert log.read_text().split() == ["requeue", "1234"]


def test_exit_under_submitit_uses_submitits_handler(no_job_env, monkeypatch):
    calls = []

    def submitit_handler(signum, frame):  # stands for SignalHandler.checkpoint_and_try_requeue
        calls.append(signum)
        sys.exit(-1)

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    preemption._SAVED_HANDLERS[signal.SIGUSR2] = submitit_handler
    with pytest.raises(SystemExit):
        preemption.exit_after_checkpoint(signal.SIGUSR1, rank=0)  # USR1 too: submitit's signal is USR2
    assert calls == [signal.SIGUSR2]
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    with pytest.raises(SystemExit) as e:  # local executor, rank 1: the controller's requeue code
        preemption.exit_after_checkpoint(signal.SIGUSR2, rank=1)
    assert e.value.code == preemption.SUBMITIT_LOCAL_REQUEUE_CODE and calls == [signal.SIGUSR2]


# -- real processes: submitit_local, signal, requeue, resume ------------------------------------
class _Tail:
    """Follows a growing file; `wait_for(text)` with a deadline."""

    def __init__(self, path_glob_root: Path, pattern: str) -> None:
        self.root, self.pattern = path_glob_root, pattern

    def wait_for(self, text: str, timeout: float, proc=None) -> Path:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for f in self.root.glob(self.pattern):
                if text in f.read_text(errors="replace"):
                    return f
            if proc is not None and proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not seen in {self.root}/{self.pattern} within {timeout:.0f}s")


def _children(pid: int):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.slow
def test_submitit_local_job_is_requeued_and_resumes(tmp_path, reference):
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               MOBILESAM_SE_DATA=os.environ["MOBILESAM_SE_DATA"])
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=15",
           f"hydra.sweep.dir={sweep}", *[o for o in SMALL if not o.startswith("logger")], "logger=wandb"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        log_file = _Tail(sweep / ".submitit", "*/*_0_log.*").wait_for("preemption:", timeout=240, proc=proc)
        controller = int(log_file.name.split("_")[0])
        tasks = _children(controller)
        assert len(tasks) == 1, (controller, tasks)
        os.kill(tasks[0], signal.SIGUSR2)  # what SLURM sends signal_delay_s before the time limit
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=10)
    text = "".join(out)
    assert proc.returncode == 0, text[-4000:]
    logs = "".join(f.read_text(errors="replace") for f in (sweep / ".submitit").glob("*/*_0_log.*"))
    assert "stopped by SIGUSR2: last.ckpt saved; requeueing" in logs, logs[-4000:]
    assert "Requeued job" in logs and "resumed from" in logs, logs[-4000:]

    run = sweep / "0"  # the requeued job came back to the same run directory
    state = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert (state["step"], state["epoch"]) == (8, 2)
    assert len((run / "checkpoints" / "training_log.txt").read_text().splitlines()) == 2
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs  # the first attempt and the resumed one ...
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # ... under one W&B run id
    assert state["wandb_run_id"] == runs[0].name.rsplit("-", 1)[1]
    # the resumed run ends where an uninterrupted one does
    _assert_same_params(reference, state["model"])
