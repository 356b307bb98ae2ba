"""Train MobileSAM to segment everything.

    python run.py                                   # short CPU run on the embedded synthetic data
    python run.py experiment=seed_everything ...    # the full-size recipe
    python run.py -m dataset.grid_points=16,32      # a sweep (add hydra/launcher=slurm for SLURM)
    torchrun --nproc_per_node 4 run.py ...          # one process per GPU (docs/scaling.md)

Builds the parts with `hydra.utils.instantiate`, runs the trainer, logs to Weights & Biases.
"""
from __future__ import annotations

import logging
from typing import Any, Dict

import hydra
from omegaconf import DictConfig

from mobilesam_se.engine.preemption import exit_after_checkpoint
from mobilesam_se.errors import report_user_errors
from mobilesam_se.assembly import build_run, register_resolvers

log = logging.getLogger("run")
register_resolvers()


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@report_user_errors  # bad config / data / checkpoint: one plain message (HYDRA_FULL_ERROR=1: the traceback)
def main(cfg: DictConfig) -> Dict[str, Any]:
    trainer, cleanup = build_run(cfg)
    try:
        result = trainer.fit()
    finally:
        cleanup()
    if result.get("preempted"):
        # last.ckpt is saved: requeue (SLURM / submitit) and exit without a result; the requeued job
        # resumes in the same run directory with the same W&B run (docs/scaling.md).
        exit_after_checkpoint(result["preempted"], rank=trainer.dist.rank)
    log.info("done: best val/%s = %.4f after %d epochs (%d steps); outputs in %s",
             cfg.trainer.monitor, result["best_score"], result["epoch"], result["step"], trainer.out_dir)
    return result


if __name__ == "__main__":
    import sys

    from mobilesam_se.config import check_moved_keys

    check_moved_keys(sys.argv[1:])  # an old key name: its new name, not just "unknown key"
    main()
