"""The everything loss as conf/loss/everything.yaml builds it, for unit tests that construct it
directly (EverythingLoss has no defaults of its own)."""
from __future__ import annotations

from functools import lru_cache

from hydra.utils import get_class
from omegaconf import OmegaConf

from helpers.hydra_utils import compose_cfg


@lru_cache(maxsize=None)
def _loss_kwargs(matching: str) -> tuple:
    kw = OmegaConf.to_container(compose_cfg([f"matching={matching}"]).loss, resolve=True)
    return tuple(kw.items())


def everything_loss(matching: str = "default", **overrides):
    """The YAML's loss under the `matching` rule (default: the plain IoU >= 0.5, no point credit and
    no point supervision), with the keys in `overrides` replaced. Built by calling the class, so a
    bad value raises the constructor's own error."""
    kw = dict(_loss_kwargs(matching))
    return get_class(kw.pop("_target_"))(**{**kw, **overrides})
