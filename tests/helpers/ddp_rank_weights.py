"""Run under torchrun by tests/test_ddp.py (a script, not a test): train with the given overrides, then every rank writes
its weights (rank<r>.pt) and whether DDP wrapped its objective, so the test can check that the
ranks ended identical (the gradients of every decode were averaged)."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package
from helpers.hydra_utils import compose_cfg  # noqa: E402

from mobilesam_se.models.checkpoint import official_state_dict  # noqa: E402
from mobilesam_se.assembly import build_run  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    trainer, cleanup = build_run(compose_cfg(sys.argv[2:]), out_dir=out)
    try:
        trainer.fit()
        rank = trainer.dist.rank
        torch.save(official_state_dict(trainer.model), out / f"rank{rank}.pt")
        (out / f"rank{rank}.json").write_text(json.dumps({
            "wrapped": type(trainer.wrapped).__name__, "wraps_objective": getattr(trainer.wrapped, "module", None) is trainer.objective,
            "step": trainer.step,
        }))
    finally:
        cleanup()


if __name__ == "__main__":
    main()
