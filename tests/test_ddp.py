"""DDP on CPU (gloo): rank detection, and 2 processes x batch 1 == 1 process x batch 2.

BatchNorm: the tiny model's TinyViT has BatchNorm layers. Under DDP each rank normalises with the
statistics of its own (per-rank) batch and SyncBatchNorm is CUDA-only, so 2 x 1 can only equal 1 x 2
with BatchNorm statistics frozen: the equivalence run uses `freeze=encoder` (which sets
`freeze.batchnorm_stats=true`) with `freeze.unfreeze_epoch=1`, which also checks that parameters
unfrozen mid-run are synchronised (DDP is re-wrapped when they join the optimizer).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.hydra_utils import compose_cfg
from mobilesam_se.engine.distributed import detect_launch, port_from_job_id
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import official_state_dict, read_checkpoint
from mobilesam_se.assembly import build_run

REPO = Path(__file__).resolve().parents[1]

EQUIV = [
    "debug=default", "dataset.batch_size=1", "model.image_size=128", "dataset.val.num_images=1", "trainer.val_every=2", "freeze=encoder",
    "freeze.unfreeze_epoch=1",
]


def clean_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SUBMITIT_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               MOBILESAM_SE_DATA=str(tmp_path.parent / "ddp_data"), **extra)
    return env


# -- where ranks come from ----------------------------------------------------------------------
def test_detect_torchrun():
    le = detect_launch({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0"})
    assert (le.rank, le.world_size, le.local_rank, le.source) == (3, 4, 1, "torchrun")
    assert le.master_addr is None  # torchrun's own MASTER_ADDR / MASTER_PORT are kept


def test_detect_slurm_step():
    env = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_STEP_NODELIST": "gpu[07-08,12]", "SLURM_JOB_NODELIST": "gpu[07-08,12]", "SLURM_JOB_ID": "4242424",
           "SUBMITIT_EXECUTOR": "slurm", "SLURM_CONF": "/nonexistent/slurm.conf"}
    le = detect_launch(env)
    assert (le.rank, le.world_size, le.local_rank, le.source) == (5, 8, 1, "slurm")
    assert le.master_addr == "gpu07"
    assert le.master_port == port_from_job_id("4242424") and 12000 <= le.master_port < 32000
    assert port_from_job_id("4242425") != le.master_port  # two jobs on one node


def test_detect_slurm_batch_step_is_single_process():
    # The batch script sees SLURM_NTASKS=2 but is one process: must not wait for a peer forever.
    le = detect_launch({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"})
    assert le.world_size == 1


def test_detect_submitit_local():
    le = detect_launch({"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1",
                        "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_JOB_ID": "31337"})
    assert (le.rank, le.world_size, le.master_addr, le.source) == (1, 2, "127.0.0.1", "submitit_local")


def test_single_process():
    assert detect_launch({}).world_size == 1


# -- 2 x batch 1 == 1 x batch 2 -----------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_equal_one_process_with_twice_the_batch(tmp_path, monkeypatch):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "run.py",
           f"hydra.run.dir={out}", *[o for o in EQUIV if not o.startswith("logger")], "logger=wandb",
           "dataset.batch_size=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    monkeypatch.setenv("MOBILESAM_SE_DATA", str(tmp_path.parent / "ddp_data"))
    cfg = compose_cfg(EQUIV + ["dataset.batch_size=2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each rank (OMP_NUM_THREADS=1)
    trainer, cleanup = build_run(cfg, out_dir=tmp_path / "single")
    try:
        single = trainer.fit()
    finally:
        cleanup()
        torch.set_num_threads(threads)
    assert single["step"] == 4  # 4 images / batch 2, 2 epochs

    ddp_state = read_checkpoint(out / "checkpoints" / "last.ckpt")
    assert ddp_state["step"] == 4 and ddp_state["epoch"] == 2
    got = ddp_state["model"]
    ref = official_state_dict(trainer.model)
    assert ref.keys() == got.keys()
    diffs = sorted((((ref[k].float() - got[k].float()).abs().max().item(), k) for k in ref
                    if ref[k].is_floating_point()), reverse=True)
    print(diffs[:8])
    # Attention key biases get a zero gradient in exact arithmetic (softmax ignores a constant
    # shift of the logits): theirs is rounding noise, which Adam scales up to ~lr-sized steps.
    worst = [d for d in diffs if not d[1].endswith("k_proj.bias")][0]
    assert worst[0] < 2e-5, diffs[:5]  # typically ~3e-6 (summation order)
    # the comparison is not vacuous: training moved the decoder and (after the unfreeze) the encoder
    torch.manual_seed(0)
    fresh = official_state_dict(build_mobilesam(256, size="tiny"))
    moved = {k.split(".")[0] for k in ref if ref[k].is_floating_point() and (ref[k] - fresh[k]).abs().max() > 1e-4}
    assert {"image_encoder", "mask_decoder"} <= moved, moved

    # validation: every rank validates the whole set -> the same score as the single process
    assert ddp_state["history"][-1]["val/dice"] == pytest.approx(single["history"][-1]["val/dice"], abs=1e-6)
    assert ddp_state["history"][-1]["train/loss"] == pytest.approx(single["history"][-1]["train/loss"], rel=1e-4)
    # rank 0 only: one W&B run, one log line per epoch, pictures once
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1
    assert len((out / "checkpoints" / "training_log.txt").read_text().splitlines()) == 2
    assert "init_process_group(gloo): rank 0/2" in proc.stdout + proc.stderr


# -- prompted (single) mode: the prompted decode is inside the wrapped forward --------------------
@pytest.mark.slow
def test_single_mode_ranks_stay_identical_under_ddp(tmp_path):
    """Each rank samples other objects, so the ranks' gradients differ; DDP must average all of
    them (the prompted decode runs inside the objective's forward), leaving identical weights."""
    out = tmp_path / "ddp_single"
    out.mkdir()
    overrides = [o for o in EQUIV if not o.startswith(("freeze", "trainer.val_every"))] + [
        "prompted.mode=single", "dataset.batch_size=1", "trainer.val_every=0", "trainer.max_epochs=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "helpers" / "ddp_rank_weights.py"), str(out), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(tmp_path), capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    info = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(i["wrapped"] == "DistributedDataParallel" and i["wraps_objective"] and i["step"] == 2 for i in info), info
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys()
    # BatchNorm running statistics are each rank's own (DDP broadcasts rank 0's before each forward).
    params = [k for k in a if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(params) > 100
    assert all(torch.equal(a[k], b[k]) for k in params), [k for k in params if not torch.equal(a[k], b[k])][:5]
    torch.manual_seed(0)
    fresh = official_state_dict(build_mobilesam(128, size="tiny"))
    assert any((a[k] - fresh[k]).abs().max() > 1e-6 for k in a if a[k].is_floating_point())  # it trained
