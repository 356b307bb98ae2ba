"""The distillation weight lambda, optionally moved on plateaus of the validation score."""
from __future__ import annotations

import math
from typing import Any, Dict


class PlateauLambda:
    """lambda_coef, multiplied by `factor` (clipped to [min, max]) once more than `patience`
    validations in a row have not improved the monitored score (as torch's ReduceLROnPlateau);
    then the count restarts.

    factor < 1 weakens distillation once the student stops improving (it has taken what the
    teachers give); factor > 1 strengthens it. A NaN score counts as no improvement. With
    `enabled=False` lambda stays fixed. All state is in `state_dict`, so a resumed run continues
    the same schedule.
    """

    def __init__(
        self, value: float, enabled: bool = False, factor: float = 0.5, patience: int = 3,
        min: float = 0.0, max: float = 10.0, mode: str = "max",
    ) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"distillation.dynamic_lambda.mode must be max or min, got {mode!r}")
        if patience < 0 or factor <= 0:
            raise ValueError("distillation.dynamic_lambda needs patience >= 0 and factor > 0")
        self.value = float(value)
        self.enabled, self.factor, self.patience = enabled, float(factor), int(patience)
        self.lo, self.hi, self.mode = float(min), float(max), mode
        self.best = -math.inf if mode == "max" else math.inf
        self.bad = 0

    def _improved(self, score: float) -> bool:
        if math.isnan(score):
            return False
        return score > self.best if self.mode == "max" else score < self.best

    def step(self, score: float) -> float:
        if not self.enabled:
            return self.value
        if self._improved(score):
            self.best, self.bad = float(score), 0
        else:
            self.bad += 1
            if self.bad > self.patience:
                self.value = min(self.hi, max(self.lo, self.value * self.factor))
                self.bad = 0
        return self.value

    def state_dict(self) -> Dict[str, Any]:
        return {"value": self.value, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.value, self.best, self.bad = float(state["value"]), float(state["best"]), int(state["bad"])
