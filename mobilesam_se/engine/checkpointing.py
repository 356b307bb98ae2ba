"""The files a training run keeps beside its weights: last.ckpt (the whole state, for an exact
resume), best.pt (official layout), and the append-only text log. Only rank 0 writes."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from mobilesam_se.models.checkpoint import atomic_save, export_official


class RunCheckpoints:
    """`model_config`: the `model` group that built the model; best.pt gets its description beside
    it (best.model.yaml), so every CLI rebuilds the model with no model flags."""

    def __init__(self, folder: Path, is_main: bool = True, model_config: Optional[Mapping[str, Any]] = None) -> None:
        self.folder = Path(folder)
        self.is_main = is_main
        self.model_config = model_config

    @property
    def last_path(self) -> Path:
        return self.folder / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.folder / "best.pt"

    @property
    def log_path(self) -> Path:
        return self.folder / "training_log.txt"

    def has_last(self) -> bool:
        return self.last_path.exists()

    def save_last(self, state: Dict[str, Any]) -> None:
        if self.is_main:
            atomic_save(state, self.last_path)  # a preempted write never leaves a torn last.ckpt

    def load_last(self) -> Dict[str, Any]:
        return torch.load(self.last_path, map_location="cpu", weights_only=True)

    def save_best(self, model: nn.Module) -> None:
        if self.is_main:
            export_official(model, self.best_path, self.model_config)

    def append_log(self, record: Dict[str, Any]) -> None:
        """One line per epoch, appended and synced: a crash never loses an epoch already logged."""
        if not self.is_main:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        line = "\t".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        with open(self.log_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
