"""Preemption and time limits: save `last.ckpt` at the next step boundary, then exit so that the job
is requeued and resumes where it stopped (same run directory, same W&B run id). See docs/scaling.md.

Signals (while `Trainer.fit` runs; other times the previous handlers apply):

* SIGUSR1 / SIGUSR2 -- "about to be stopped, please requeue": SLURM's `--signal=USR2@<delay>`
  before the time limit (hydra/launcher=slurm: `signal_delay_s`; submitit uses USR2 unless
  SUBMITIT_PREEMPT_SIGNAL says otherwise), `scancel --signal=USR1|USR2 <job>`, or by hand.
  After the checkpoint, rank 0 requeues the job:
    - under submitit (hydra/launcher=slurm or submitit_local) through submitit's own handler, which
      pickles the launcher's `checkpoint()` (hydra-submitit-launcher resubmits the same job with the
      same overrides, so the same `hydra.sweep.dir/<job num>`), runs `scontrol requeue` and exits;
      submitit's `max_num_timeout` bounds requeues after time-outs (preemptions are not counted);
    - in a plain SLURM batch job (sbatch + srun run.py) with `scontrol requeue $SLURM_JOB_ID`
      (set `hydra.run.dir` to something stable, e.g. outputs/${oc.env:SLURM_JOB_ID}, so the requeued
      job finds its checkpoint);
    - elsewhere (torchrun, a terminal): nothing to requeue; the process exits with 128 + signal.
* SIGTERM -- SLURM is stopping the job (preemption with PreemptMode=REQUEUE, scancel, time limit):
  save and exit with 143; whether the job comes back is SLURM's decision (`--requeue`). SLURM sends
  SIGKILL KillWait seconds (often 30) after SIGTERM, so this is best effort; the USR signal with a
  `signal_delay_s` longer than a step plus a validation is the reliable way.

In a multi-process run every rank gets the signal, but not at the same instant: the ranks agree
(all-reduce MAX) at each step boundary, so they all stop after the same step and rank 0 saves once.
Non-zero ranks then wait (bounded) to be stopped by the requeue, without writing a submitit result.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

log = logging.getLogger(__name__)

HANDLED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)
# All-reduce codes: a requeue request wins over a plain stop when ranks saw different signals.
NONE, TERMINATE, REQUEUE = 0, 1, 2
SUBMITIT_LOCAL_REQUEUE_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE


def code_of(signum: Optional[int]) -> int:
    if signum is None:
        return NONE
    return REQUEUE if signum in REQUEUE_SIGNALS else TERMINATE


def signal_of(code: int) -> Optional[int]:
    if code == REQUEUE:
        return submitit_signal() or signal.SIGUSR2
    if code == TERMINATE:
        return signal.SIGTERM
    return None


def submitit_signal() -> Optional[int]:
    """The signal submitit's job-side handler listens to (USR2 unless SUBMITIT_PREEMPT_SIGNAL), or None
    outside a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), signal.SIGUSR2)


class SignalCatcher:
    """Installs handlers that only record the signal and call `on_signal(signum)`; restores the previous
    handlers on `restore()`. Remembers submitit's handler so that the requeue can be done later."""

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self.on_signal = on_signal
        self.previous: Dict[int, Any] = {}
        self.received: Optional[int] = None

    def _handle(self, signum: int, frame: Any = None) -> None:
        # A signal handler: only record (logging here could re-enter a held lock).
        if self.received is None or code_of(signum) > code_of(self.received):
            self.received = signum
        self.on_signal(signum)

    def install(self) -> "SignalCatcher":
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: preemption signals are not handled")
            return self
        for s in HANDLED:
            self.previous[s] = signal.signal(s, self._handle)
        log.info("preemption: on %s the trainer saves last.ckpt at the next step and exits%s",
                 "/".join(signal.Signals(s).name for s in HANDLED),
                 " (submitit requeues on " + signal.Signals(submitit_signal()).name + ")" if submitit_signal() else "")
        return self

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        _SAVED_HANDLERS.update(self.previous)
        self.previous = {}


# Handlers that were in place before the trainer's (submitit's SignalHandler among them).
_SAVED_HANDLERS: Dict[int, Any] = {}


def _requeue_plain_slurm(job_id: str) -> bool:
    try:
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, text=True, timeout=60)
        log.warning("requeued SLURM job %s", job_id)
        return True
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", "") or e
        log.error("could not requeue SLURM job %s (%s): resume by resubmitting with the same hydra.run.dir",
                  job_id, str(err).strip())
        return False


def _wait_to_be_stopped(seconds: float, code: int) -> None:
    """Non-zero ranks: rank 0 requeues, which stops every task; do not write a result meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
    log.warning("still running %.0f s after the preemption checkpoint: exiting", seconds)
    raise SystemExit(code)


def exit_after_checkpoint(signum: int, rank: int = 0, wait_s: float = 120.0) -> None:
    """Called once `last.ckpt` is written and the process group / logger are closed. Never returns."""
    name = signal.Signals(signum).name
    executor = os.environ.get("SUBMITIT_EXECUTOR")
    requeue = signum in REQUEUE_SIGNALS
    log.warning("stopped by %s: last.ckpt saved; %s", name,
                "requeueing" if requeue and (executor or os.environ.get("SLURM_JOB_ID")) else "exiting")
    sys.stdout.flush()
    sys.stderr.flush()
    if executor and requeue:
        if rank != 0:
            if executor == "local":  # submitit's local controller requeues on this exit code
                raise SystemExit(SUBMITIT_LOCAL_REQUEUE_CODE)
            _wait_to_be_stopped(wait_s, 128 + signum)
        usr = submitit_signal()
        handler = _SAVED_HANDLERS.get(usr)
        if callable(handler):
            # submitit.core.job_environment.SignalHandler.checkpoint_and_try_requeue: calls the
            # launcher's checkpoint() (same job again), requeues and exits; raises UncompletedJobError
            # when it may not requeue (e.g. timed out more than max_num_timeout times).
            handler(usr, None)
        raise SystemExit(128 + signum)
    if requeue and os.environ.get("SLURM_JOB_ID") and not executor:
        if rank == 0:
            _requeue_plain_slurm(os.environ["SLURM_JOB_ID"])  # an array task's own id requeues just it
        else:
            _wait_to_be_stopped(wait_s, 128 + signum)
    raise SystemExit(128 + signum)
