"""An exponential moving average of the model's weights, validated and saved in their place."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
import torch.nn as nn


class WeightEMA:
    """Shadow copies of every floating-point parameter and buffer of `model`, updated after each
    optimizer step as shadow <- decay * shadow + (1 - decay) * weight.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so the first steps from the init
    are not averaged in with a large weight. `applied()` swaps the averages into the model (for
    validation and best.pt) and swaps the training weights back afterwards.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"trainer.ema_decay must lie in (0, 1) (or be null: off), got {decay}")
        self.decay = float(decay)
        self.names: List[str] = [k for k, v in model.state_dict().items() if v.is_floating_point()]
        self.live: List[torch.Tensor] = self._tensors(model)
        self.shadow: List[torch.Tensor] = [t.detach().clone() for t in self.live]
        self.updates = 0

    def _tensors(self, model: nn.Module) -> List[torch.Tensor]:
        # state_dict(keep_vars=True) gives the Parameters and buffers themselves, not copies.
        state = model.state_dict(keep_vars=True)
        return [state[k] for k in self.names]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [t.detach() for t in self.live], 1.0 - d)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block."""
        with torch.no_grad():
            saved = [t.detach().clone() for t in self.live]
            torch._foreach_copy_([t.data for t in self.live], self.shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([t.data for t in self.live], saved)

    def state_dict(self) -> Dict[str, object]:
        return {"decay": self.decay, "updates": self.updates,
                "shadow": {k: v.detach().cpu().clone() for k, v in zip(self.names, self.shadow)}}

    def load_state_dict(self, state: Dict[str, object], source: str) -> None:
        shadow = state["shadow"]
        missing = [k for k in self.names if k not in shadow]  # type: ignore[operator]
        if missing:
            raise KeyError(f"{source}: the EMA state lacks {missing[:3]}... (was it saved by another model?)")
        with torch.no_grad():
            for k, t in zip(self.names, self.shadow):
                t.copy_(shadow[k])  # type: ignore[index]
        self.updates = int(state["updates"])  # type: ignore[arg-type]
