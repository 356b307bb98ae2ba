"""Compose the project's Hydra config in-process, as `run.py` would.

Training tests start from `debug=default` (conf/debug/default.yaml, the tiny run) and add their
own overrides, which win over it.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from mobilesam_se.assembly import register_resolvers

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_cfg(overrides: Optional[List[str]] = None, return_hydra_config: bool = False) -> DictConfig:
    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides or []), return_hydra_config=return_hydra_config)
