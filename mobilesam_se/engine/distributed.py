"""torch.distributed set-up: nccl on CUDA, gloo on CPU; ranks from torchrun, SLURM (srun / submitit)
or submitit's local executor. See docs/scaling.md.

Where the ranks come from, first match wins:

* torchrun (or any launcher that sets RANK and WORLD_SIZE): RANK / WORLD_SIZE / LOCAL_RANK,
  MASTER_ADDR / MASTER_PORT as set by the launcher.
* submitit's local executor (hydra/launcher=submitit_local with tasks_per_node > 1):
  SUBMITIT_LOCAL_GLOBALID / SUBMITIT_LOCAL_NTASKS / SUBMITIT_LOCAL_LOCALID; master 127.0.0.1.
* a SLURM job step (srun, which is how submitit starts SLURM tasks: one task per GPU):
  SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID; MASTER_ADDR = first host of the step's
  (else the job's) node list, MASTER_PORT derived from the job id, so that several jobs sharing
  a node do not collide. Only a *step* counts: the batch script itself also sees
  SLURM_NTASKS=N but is one process; treating it as rank 0 of N would wait for N-1 peers forever.
* otherwise: one process, no process group.
"""
from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PORT_BASE, PORT_SPAN = 12000, 20000  # job-id-derived ports: 12000-31999, below Linux's ephemeral range


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # single | torchrun | submitit_local | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass
class LaunchEnv:
    """What the environment says about this process's place in a multi-process job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None  # None: leave MASTER_ADDR / MASTER_PORT as the launcher set them
    master_port: Optional[int] = None
    source: str = "single"


def port_from_job_id(job_id: str) -> int:
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def expand_nodelist(nodelist: str) -> List[str]:
    """SLURM's compressed host list ("gpu[01-03,07],cpu5") as host names: `scontrol show hostnames`,
    else submitit's parser (same syntax; for machines without the SLURM client)."""
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=15, check=True).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    from submitit.slurm.slurm import _parse_node_list

    return list(_parse_node_list(nodelist))


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank / world size / master address from the environment (see the module docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), source="torchrun")
    if env.get("SUBMITIT_EXECUTOR") == "local" and "SUBMITIT_LOCAL_NTASKS" in env:
        world = int(env["SUBMITIT_LOCAL_NTASKS"])
        return LaunchEnv(int(env.get("SUBMITIT_LOCAL_GLOBALID", 0)), world, int(env.get("SUBMITIT_LOCAL_LOCALID", 0)),
                         "127.0.0.1", port_from_job_id(env.get("SUBMITIT_LOCAL_JOB_ID", "0")), "submitit_local")
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        world = int(env["SLURM_STEP_NUM_TASKS"])
        if world <= 1:
            return LaunchEnv(source="slurm")
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        return LaunchEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)),
                         nodes[0] if nodes else "127.0.0.1", port_from_job_id(env.get("SLURM_JOB_ID", "0")), "slurm")
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        log.warning("SLURM_NTASKS=%s but this is not a job step (no srun): running as a single process. "
                    "Start one task per GPU with srun, or use hydra/launcher=slurm.", env["SLURM_NTASKS"])
    return LaunchEnv()


def init_distributed(device_type: str, timeout_min: Optional[float] = None) -> DistInfo:
    """Initialise the process group (nccl on CUDA, gloo on CPU) when launched with several processes;
    no-op otherwise. Ranks and master address: see `detect_launch`."""
    le = detect_launch()
    if le.world_size <= 1:
        return DistInfo(source=le.source)
    if not dist.is_initialized():
        if le.master_addr is not None:
            os.environ["MASTER_ADDR"] = le.master_addr
            os.environ["MASTER_PORT"] = str(le.master_port)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(cuda_index(le.local_rank))
        kwargs: Dict[str, Any] = {}
        if timeout_min is not None:
            kwargs["timeout"] = datetime.timedelta(minutes=timeout_min)
        log.info("init_process_group(%s): rank %d/%d (local %d) via %s, master %s:%s", backend, le.rank,
                 le.world_size, le.local_rank, le.source, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
        dist.init_process_group(backend=backend, rank=le.rank, world_size=le.world_size, **kwargs)
    return DistInfo(rank=le.rank, world_size=le.world_size, local_rank=le.local_rank, source=le.source)


def cuda_index(local_rank: int) -> int:
    """The GPU of a local rank: SLURM may show each task all of the node's GPUs (index = local rank)
    or only its own (--gpus-per-task / gpu binding: index 0)."""
    n = torch.cuda.device_count()
    return local_rank % n if n else 0


def all_reduce_mean(values: dict, info: DistInfo, device: torch.device) -> dict:
    """Mean of scalar floats across ranks (for logging and validation scores)."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= info.world_size
    return {k: v.item() for k, v in zip(keys, t)}


def all_reduce_max(values: Sequence[int], info: DistInfo, device: torch.device) -> List[int]:
    """Element-wise maximum of small integers across ranks (flags every rank must agree on)."""
    if not info.enabled:
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s value on every rank (e.g. the output directory each rank's Hydra resolved)."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
