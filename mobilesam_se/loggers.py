"""Experiment logging: a real Weights & Biases run, offline unless the user has set W&B up."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

log = logging.getLogger(__name__)


def wandb_is_configured() -> bool:
    """True when an API key is available (env var or ~/.netrc entry written by `wandb login`)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


class WandbLogger:
    """Thin wrapper over `wandb.init` / `log`; resumes the same run id after a restart."""

    def __init__(
        self,
        project: str = "mobilesam-se",
        entity: Optional[str] = None,
        mode: str = "auto",
        group: Optional[str] = None,
        name: Optional[str] = None,
        tags: Optional[List[str]] = None,
        log_images: bool = True,
    ) -> None:
        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if wandb_is_configured() else "offline")
        self.mode = mode
        self.project, self.entity, self.group, self.name = project, entity, group, name
        self.tags = list(tags or [])
        self.log_images = log_images
        self.run = None

    @property
    def run_id(self) -> Optional[str]:
        return None if self.run is None else self.run.id

    @property
    def run_dir(self) -> Optional[str]:
        return None if self.run is None else self.run.dir

    def start(self, out_dir: Path, config: Dict[str, Any], run_id: Optional[str] = None) -> None:
        import wandb

        self.run = wandb.init(
            project=self.project, entity=self.entity, group=self.group, name=self.name, tags=self.tags,
            mode=self.mode, dir=str(out_dir), config=config, id=run_id, resume="allow" if run_id else None,
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        log.info("W&B run %s (%s) in %s", self.run.id, self.mode, self.run.dir)

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_image(self, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
        if self.run is not None and self.log_images:
            import wandb

            self.run.log({key: wandb.Image(image, caption=caption)}, step=step)

    def summary(self, values: Dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
