"""AdamW with decay/no-decay groups, and a warm-up + cosine schedule stepped per optimizer step
(restarted where a run changes phase)."""
from __future__ import annotations

import math
from typing import Collection, List, Optional, Sequence

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float, names: Optional[Collection[str]] = None,
                 tag: str = "") -> List[dict]:
    """AdamW groups of `model`'s trainable parameters (only those named in `names`, when given).

    As timm does: no decay for 1-d parameters (biases, norm weights) and for the names the model
    declares in `no_weight_decay()` (its embeddings, tokens, attention biases); every other
    weight decays, convolutions included.
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (names is not None and name not in names):
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": f"{tag}decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": f"{tag}no_decay"})
    return groups


# How AdamW runs its update: one fused kernel per parameter group, a few multi-tensor ops per group,
# or PyTorch's per-parameter loop (~10 small ops per parameter: a tenth of the default run's CPU step).
OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    impl: str = "for_loop") -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; `impl` (trainer.optimizer_impl) is one of OPTIMIZER_IMPLS."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"trainer.optimizer_impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    groups = param_groups(model, weight_decay)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (see the freeze.* options)")
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for_loop": dict(foreach=False)}[impl]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **flags)


def uses_foreach(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer runs multi-tensor kernels (then so should gradient clipping)."""
    defaults = optimizer.defaults
    return bool(defaults.get("fused") or defaults.get("foreach"))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear from 1/warmup to 1 over `warmup_steps`, then cosine to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if total_steps <= warmup_steps:
        return 1.0
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def phased_warmup_cosine(step: int, warmup_steps: int, boundaries: Sequence[int], total_steps: int,
                         min_ratio: float = 0.0) -> float:
    """`warmup_cosine` restarted at each step of `boundaries`: every phase has its own warm-up and
    cosine (a run's low-resolution epochs, then its full-resolution ones)."""
    start = 0
    for b in sorted(boundaries):
        if step < b:
            return warmup_cosine(step - start, warmup_steps, b - start, min_ratio)
        start = b
    return warmup_cosine(step - start, warmup_steps, total_steps - start, min_ratio)


def build_scheduler(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0,
                    restarts: Sequence[int] = ()):
    """Warm-up + cosine over `total_steps` optimizer steps, restarted at each step of `restarts`."""
    restarts = [int(b) for b in restarts if 0 < int(b) < total_steps]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: phased_warmup_cosine(s, warmup_steps, restarts, total_steps, min_ratio)
    )
