"""Compose the project's Hydra config in-process, as `run.py` would."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from mobilesam_se.assembly import register_resolvers

CONF = Path(__file__).resolve().parents[1] / "conf"

# Small, fast settings for training tests.
TINY_RUN = [
    "logger=none",
    "model=tiny",
    "dataset.train.num_images=4",
    "dataset.val.num_images=2",
    "dataset.grid_points=4",
    "dataset.batch_size=2",
    "dataset.val_batch_size=2",
    "trainer.max_epochs=2",
    "trainer.val_every=1",
    "trainer.warmup_steps=1",
    "trainer.progress=false",
    "visual.num_images=1",
    "trainer.tune_amg=false",
]


def compose_cfg(overrides: Optional[List[str]] = None, return_hydra_config: bool = False) -> DictConfig:
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)
