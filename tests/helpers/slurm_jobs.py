"""Job functions for tests/test_slurm_infra.py.

They run inside SLURM jobs, so they must be importable there by module name
(submitit pickles functions by reference): slurm_utils.make_executor puts
tests/ on the job's PYTHONPATH (they import as helpers.slurm_jobs).
"""
import os
import socket
import time


def add(a, b):
    return {"sum": a + b, "host": socket.gethostname(), "job_id": os.environ.get("SLURM_JOB_ID")}


def rank_info():
    import submitit

    env = submitit.JobEnvironment()
    return {"global_rank": env.global_rank, "local_rank": env.local_rank, "world_size": env.num_tasks,
            "num_nodes": env.num_nodes, "job_id": env.job_id}


def hard_exit(code=3):
    print("about to die without a result", flush=True)
    os._exit(code)


def raise_error(msg):
    raise ValueError(msg)


def sleep(seconds):
    time.sleep(seconds)
    return seconds
