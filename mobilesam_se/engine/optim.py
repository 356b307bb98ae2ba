"""The optimizer (AdamW, or Muon for weight matrices with AdamW for the rest) over decay / no-decay
groups, and a warm-up + cosine schedule stepped per optimizer step (restarted where a run changes
phase)."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Collection, List, Mapping, Optional, Sequence, Set, Tuple

import torch
import torch.nn as nn

from mobilesam_se.engine.muon import MuonAdamW

OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class MuonRule:
    """Which weights Muon updates (trainer.muon_*): every nn.Linear weight, and with `convs` every
    convolution filter but depthwise ones, unless its name matches an `exclude` pattern (the input
    layer and output heads, kept on AdamW as Muon's authors do)."""

    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.95
    convs: bool = True
    exclude: Tuple[str, ...] = ()

    def names(self, model: nn.Module, skip: Collection[str] = ()) -> Set[str]:
        kinds: tuple = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d) if self.convs else (nn.Linear,)
        out = set()
        for mod_name, mod in model.named_modules():
            if not isinstance(mod, kinds) or mod.weight is None:
                continue
            name = f"{mod_name}.weight"
            depthwise = isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and mod.groups > 1
            if depthwise or name in skip or any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude):
                continue
            out.add(name)
        return out


def muon_rule(cfg: Optional[Mapping[str, Any]]) -> MuonRule:
    """The `MuonRule` of the trainer.muon group (lr, weight_decay, momentum, convs, exclude)."""
    if cfg is None:
        raise ValueError("trainer.optimizer=muon needs the trainer.muon group (lr, momentum, ...)")
    cfg = dict(cfg)
    unknown = set(cfg) - {"lr", "weight_decay", "momentum", "convs", "exclude"}
    if unknown:
        raise ValueError(f"trainer.muon: unknown keys {sorted(unknown)} (known: lr, weight_decay, momentum, convs, exclude)")
    return MuonRule(lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)),
                    momentum=float(cfg.get("momentum", 0.95)), convs=bool(cfg.get("convs", True)),
                    exclude=tuple(cfg.get("exclude") or ()))


def param_groups(model: nn.Module, weight_decay: float, names: Optional[Collection[str]] = None,
                 tag: str = "", muon: Optional[MuonRule] = None) -> List[dict]:
    """Optimizer groups of `model`'s trainable parameters (only those named in `names`, when given).

    As timm does: no decay for 1-d parameters (biases, norm weights) and for the names the model
    declares in `no_weight_decay()` (its embeddings, tokens, attention biases); every other
    weight decays, convolutions included. With `muon`, the weights it selects form a group of
    their own (`muon: True`, its own learning rate and decay).
    """
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    muon_names = muon.names(model, skip) if muon is not None else set()
    decay, no_decay, matrices = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (names is not None and name not in names):
            continue
        if name in muon_names:
            matrices.append(p)
        elif p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if matrices:
        groups.append({"params": matrices, "weight_decay": muon.weight_decay, "lr": muon.lr, "muon": True,
                       "name": f"{tag}muon"})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "name": f"{tag}decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": f"{tag}no_decay"})
    return groups


# How AdamW runs its update: one fused kernel per parameter group, a few multi-tensor ops per group,
# or PyTorch's per-parameter loop (~10 small ops per parameter: a tenth of the default run's CPU step).
OPTIMIZER_IMPLS = ("fused", "foreach", "for_loop")


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    impl: str = "for_loop", name: str = "adamw",
                    muon: Optional[MuonRule] = None) -> torch.optim.Optimizer:
    """`name` (trainer.optimizer): AdamW over `param_groups(model)`, or `MuonAdamW` with the weights
    `muon` selects on Muon; `impl` (trainer.optimizer_impl, one of OPTIMIZER_IMPLS) runs the AdamW."""
    if impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"trainer.optimizer_impl must be one of {OPTIMIZER_IMPLS}, got {impl!r}")
    if name not in OPTIMIZERS:
        raise ValueError(f"trainer.optimizer must be one of {OPTIMIZERS}, got {name!r}")
    if name == "muon" and muon is None:
        raise ValueError("trainer.optimizer=muon needs its rule (trainer.muon_lr, trainer.muon_exclude, ...)")
    groups = param_groups(model, weight_decay, muon=muon if name == "muon" else None)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen (see the freeze.* options)")
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for_loop": dict(foreach=False)}[impl]
    if name == "muon":
        opt = MuonAdamW(groups, lr=lr, betas=betas, momentum=muon.momentum, adamw_flags=flags)
        opt.muon_rule = muon  # unfreezing splits new parameters by the same rule
        return opt
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
