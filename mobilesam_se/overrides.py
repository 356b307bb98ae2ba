"""What the user typed on the command line, as opposed to what the config files default to.

The CLIs let a file beside the checkpoint decide some values (the model a checkpoint describes,
the AMG thresholds tuned for it) unless the user typed them. Hydra composes both into one config,
so the typed part is read back from the overrides: Hydra's own list under `@hydra.main`, or the
list an in-process caller composed with.
"""
from __future__ import annotations

from typing import List, Sequence, Set


def command_line_overrides() -> List[str]:
    """The overrides of this process's Hydra command line; [] outside `@hydra.main`."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def _override_key(override: str) -> str:
    """'model.image_size=512' -> 'model.image_size'; '+x=1', '++x=1' and '~x' name x."""
    return override.split("=", 1)[0].lstrip("+~")


def typed_keys(node: str, overrides: Sequence[str]) -> Set[str]:
    """The keys under config node `node` that `overrides` set: 'model.image_size=512' -> {'image_size'}."""
    prefix = node + "."
    return {key[len(prefix):] for key in map(_override_key, overrides) if key.startswith(prefix)}


def typed_model_keys(overrides: Sequence[str]) -> Set[str]:
    """The `model` keys `overrides` set; choosing a `model=` option sets its name and size."""
    keys = typed_keys("model", overrides)
    if any(_override_key(o) == "model" for o in overrides):
        keys |= {"name", "size"}
    return keys
