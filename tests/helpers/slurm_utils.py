"""A real single-node SLURM for tests: start it, submit through submitit, stop it.

Usage (in a test module; tests/ is on sys.path under pytest's default import mode)::

    import pytest
    from helpers.slurm_utils import make_executor, job_result  # the fixtures slurm, slurm_cluster: tests/conftest.py

    pytestmark = pytest.mark.slurm

    def test_x(slurm, tmp_path):                    # in-process submitit
        ex = make_executor(slurm, tmp_path, timeout_min=5)
        job = ex.submit(my_module_level_fn, 1)      # fn importable: see below
        assert job_result(job, timeout=60) == ...

    def test_y(slurm_cluster, tmp_path):            # subprocess, e.g. a Hydra sweep
        subprocess.run([...], env=slurm_cluster.env, timeout=120, check=True)

Both fixtures must be imported into the module (there is no conftest.py).

* ``local_slurm(tmp_dir, *, start_timeout=60, patch_environ=True)``: context
  manager. Runs ``scripts/slurm/install.sh`` when binaries are missing and we
  are root, ``scripts/slurm/start.sh <tmp_dir>``, yields a :class:`LocalSlurm`
  and always runs ``scripts/slurm/stop.sh`` (kills only the PIDs start.sh
  recorded). With ``patch_environ`` os.environ points at the cluster while
  inside (see ``LocalSlurm.activate``).
* ``LocalSlurm``: ``.env`` (full environment dict for subprocesses: SLURM_CONF,
  PATH with the sacct shim first, inherited SLURM_* job variables dropped),
  ``.partition`` ("debug"), ``.node``, ``.state_dir``, ``.conf``,
  ``.run(cmd)``, ``.logs()``, ``.activate()`` (context manager patching
  os.environ; in-process submitit calls sbatch/scancel/sacct without env=).
* ``slurm_cluster``: session-scoped fixture (one cluster per session,
  os.environ untouched). ``slurm``: function-scoped, same cluster, os.environ
  patched for that test only.
* ``make_executor``, ``wait_job``, ``job_result``: see below.

Skip or fail: if SLURM cannot be started (not root, no apt-get, install or
start failure) the tests are skipped with the reason, EXCEPT when ``CI=true``
and we are root: then it is a test failure (CI must really run them).

The "sacct without slurmdbd" trap, and how it is closed:
  * slurm.conf uses ``AccountingStorageType=accounting_storage/none`` and
    ``JobAcctGatherType=jobacct_gather/none``; the real ``sacct`` then errors.
    submitit 1.5.4's ``SlurmInfoWatcher`` polls job states ONLY with
    ``sacct -o JobID,State,NodeList --parsable2 -j ID``; on error it keeps the
    state "UNKNOWN", which counts as unfinished, so ``job.result()`` /
    ``job.wait()`` loop forever on a job that died without a result pickle.
  * start.sh therefore puts ``<state_dir>/bin/sacct`` (scripts/slurm/sacct_shim.py)
    first on PATH: it answers from ``squeue -r -t all`` (slurmctld keeps
    finished jobs for MinJobAge=3600 s), so FAILED/CANCELLED/TIMEOUT/COMPLETED
    are real states; ids slurmctld no longer knows are answered FAILED.
  * Every wait in tests has a hard deadline anyway: :func:`wait_job` polls
    with a forced state refresh and, past the deadline, scancels the job and
    fails with its state and stderr. :func:`job_result` also shortens
    submitit's 15 s wait for a missing result pickle.

Job functions are pickled by reference: define them at module level in an
importable module (e.g. tests/helpers/slurm_jobs.py). :func:`make_executor` adds an
``export PYTHONPATH=<tests dir>:...`` line to the sbatch script so the job's
Python finds them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO / "tests"  # on the job's PYTHONPATH: job functions import as helpers.<module>
SCRIPTS = REPO / "scripts" / "slurm"
BINARIES = ("slurmctld", "slurmd", "munged", "sinfo", "squeue", "sbatch", "scancel", "scontrol", "srun")


@dataclasses.dataclass
class LocalSlurm:
    state_dir: Path
    env: Dict[str, str]  # full environment for subprocesses (SLURM_CONF, PATH with the sacct shim)
    partition: str = "debug"
    node: str = ""
    start_s: float = 0.0  # seconds taken by install + start.sh
    delta: Dict[str, str] = dataclasses.field(default_factory=dict)  # what env.sh sets

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    def run(self, cmd: Sequence[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command (sinfo, squeue, ...) against this cluster; text output captured."""
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )

    @contextlib.contextmanager
    def activate(self) -> Iterator["LocalSlurm"]:
        """Point os.environ at this cluster (sets what env.sh sets: SLURM_CONF,
        PATH with the sacct shim first; removes inherited SLURM_* job
        variables; other variables untouched) and clear submitit's
        job-state cache; restore both on exit. Needed for in-process submitit,
        which runs sbatch/scancel/sacct without an env=."""
        saved = dict(os.environ)
        for k in list(os.environ):
            if k.startswith(_JOB_VAR_PREFIXES):
                del os.environ[k]
        os.environ.update(self.delta)
        _clear_submitit_cache()
        try:
            yield self
        finally:
            _clear_submitit_cache()
            os.environ.clear()
            os.environ.update(saved)

    def logs(self, lines: int = 40) -> str:
        out = []
        for f in sorted((self.state_dir / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            if text:
                out.append(f"===== {f.name} =====\n" + "\n".join(text))
        return "\n".join(out)


def _must_run() -> bool:
    return os.environ.get("CI") == "true" and os.geteuid() == 0


def _unavailable(reason: str) -> None:
    if _must_run():
        pytest.fail(f"local SLURM could not be started (CI=true, running as root): {reason}", pytrace=False)
    pytest.skip(f"local SLURM unavailable: {reason}")


def _missing_binaries() -> List[str]:
    return [b for b in BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]


def _read_env(env_sh: Path, base: Dict[str, str]) -> Dict[str, str]:
    """The environment after `source env.sh` on top of `base`."""
    out = subprocess.run(
        ["bash", "-c", f'source "{env_sh}" && env -0'],
        env=base, capture_output=True, check=True, timeout=30,
    ).stdout.decode()
    env = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    return env


_JOB_VAR_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")


def _clean_base_env() -> Dict[str, str]:
    # Inherited job variables (pytest itself running inside a SLURM job) would
    # leak into sbatch/srun of the test cluster.
    return {k: v for k, v in os.environ.items() if not k.startswith(_JOB_VAR_PREFIXES)}


def _clear_submitit_cache() -> None:
    try:
        from submitit.slurm.slurm import SlurmJob
    except ImportError:  # pragma: no cover
        return
    SlurmJob.watcher.clear()
    SlurmJob.watcher._registered.clear()  # clear() keeps the registered ids


@contextlib.contextmanager
def local_slurm(
    tmp_dir: os.PathLike, *, start_timeout: int = 60, patch_environ: bool = True
) -> Iterator[LocalSlurm]:
    """Start a private single-node SLURM with state in `tmp_dir`; always stop it.

    Skips (or fails under CI=true as root) when it cannot be started.
    """
    state = Path(tmp_dir).resolve()
    t0 = time.monotonic()
    if os.geteuid() != 0:
        _unavailable("needs root to run slurmctld/slurmd/munged (SlurmUser=root)")
    missing = _missing_binaries()
    if missing:
        if shutil.which("apt-get") is None:
            _unavailable(f"SLURM binaries missing ({', '.join(missing)}) and no apt-get to install them")
        proc = subprocess.run(
            ["bash", str(SCRIPTS / "install.sh")], capture_output=True, text=True, timeout=900
        )
        if proc.returncode != 0 or _missing_binaries():
            _unavailable(f"scripts/slurm/install.sh failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    state.mkdir(parents=True, exist_ok=True)
    base_env = _clean_base_env()
    try:
        try:
            proc = subprocess.run(
                ["bash", str(SCRIPTS / "start.sh"), str(state)],
                env={**base_env, "LOCAL_SLURM_START_TIMEOUT": str(start_timeout)},
                capture_output=True, text=True, timeout=start_timeout + 60,
            )
        except subprocess.TimeoutExpired as e:
            _unavailable(f"scripts/slurm/start.sh timed out:\n{e.stdout}\n{e.stderr}")
        if proc.returncode != 0:
            _unavailable(f"scripts/slurm/start.sh failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        env = _read_env(state / "env.sh", base_env)
        node = subprocess.run(
            ["sinfo", "-h", "-o", "%N"], env=env, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        delta = {k: v for k, v in env.items() if base_env.get(k) != v and not k.startswith(("_", "SHLVL", "PWD", "OLDPWD"))}
        cluster = LocalSlurm(state_dir=state, env=env, node=node, start_s=time.monotonic() - t0, delta=delta)

        with cluster.activate() if patch_environ else contextlib.nullcontext(cluster):
            yield cluster
    finally:
        subprocess.run(
            ["bash", str(SCRIPTS / "stop.sh"), str(state)],
            env=base_env, capture_output=True, text=True, timeout=120,
        )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[LocalSlurm]:
    """Session-scoped LocalSlurm; os.environ is NOT patched (use `.env` for
    subprocesses, or the function-scoped `slurm` fixture for in-process submitit)."""
    with local_slurm(tmp_path_factory.mktemp("slurm"), patch_environ=False) as cluster:
        yield cluster


@pytest.fixture
def slurm(slurm_cluster) -> Iterator[LocalSlurm]:
    """The session's LocalSlurm with os.environ pointed at it for this test only."""
    with slurm_cluster.activate():
        yield slurm_cluster


def make_executor(cluster: LocalSlurm, folder: os.PathLike, **params: Any):
    """submitit.AutoExecutor(cluster="slurm") on `cluster`'s partition; the job's
    Python gets tests/ on PYTHONPATH (for job functions in e.g. slurm_jobs.py)."""
    import submitit

    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    setup = [f'export PYTHONPATH="{TESTS_DIR}${{PYTHONPATH:+:$PYTHONPATH}}"']
    setup += list(params.pop("slurm_setup", []))
    params.setdefault("timeout_min", 5)
    params.setdefault("slurm_partition", cluster.partition)
    ex.update_parameters(slurm_setup=setup, **params)
    return ex


def wait_job(job, timeout: float = 60.0, poll_s: float = 0.5) -> str:
    """Wait until `job` is finished (result written or a final SLURM state),
    at most `timeout` seconds; then scancel it and fail with its state and logs.
    Returns the final SLURM state."""
    deadline = time.monotonic() + timeout
    while True:
        if job.done() or job.watcher.is_done(job.job_id, mode="force"):
            return job.watcher.get_state(job.job_id, mode="force")
        if time.monotonic() > deadline:
            state = job.watcher.get_state(job.job_id, mode="force")
            subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=30)
            pytest.fail(
                f"SLURM job {job.job_id} not finished after {timeout:.0f}s (state {state}).\n"
                f"stdout:\n{job.stdout()}\nstderr:\n{job.stderr()}",
                pytrace=False,
            )
        time.sleep(poll_s)


def job_result(job, timeout: float = 60.0, results_timeout_s: float = 2.0, all_tasks: bool = False):
    """job.result() (or job.results() if `all_tasks`) with a hard deadline.

    submitit waits 15 s for a missing result pickle after the job ended; a job
    that died without one raises UncompletedJobError after `results_timeout_s`.
    """
    wait_job(job, timeout)
    for j in [job, *getattr(job, "_sub_jobs", [])]:
        j._results_timeout_s = results_timeout_s
    return job.results() if all_tasks else job.result()
