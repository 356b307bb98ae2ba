"""Muon (momentum + Newton-Schulz orthogonalised updates) for weight matrices, with AdamW for the
rest, as one optimizer for the scheduler, gradient clipping and checkpoints.

`torch.optim.Muon` orthogonalises one matrix at a time in bf16 and takes 2-D parameters only. On the
default CPU run that costs ~50 ms a step for 58 small matrices (about 0.4x the whole step), so
`Muon` here runs the same quintic iteration in fp32, batched over the matrices of one shape, and
takes convolution filters as their (out, in*k*k) matrix (experiments/learning, twelfth round).
The step size follows Moonlight's scaling, 0.2 * sqrt(max(rows, cols)), which gives the update the
RMS of an AdamW update, so one learning rate schedule serves both halves.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# Keller Jordan's quintic coefficients (also torch.optim.Muon's): steep at 0, ~5 steps to converge.
NS_COEFFICIENTS: Tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def orthogonalise(x: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate U V^T of each matrix of a (N, A, B) batch by a Newton-Schulz iteration (fp32)."""
    if x.ndim != 3:
        raise ValueError(f"orthogonalise takes a (N, A, B) batch, got shape {tuple(x.shape)}")
    a, b, c = NS_COEFFICIENTS
    tall = x.shape[1] > x.shape[2]
    if tall:  # iterate on the wide side: the Gram matrix is the small one
        x = x.transpose(1, 2)
    x = x / x.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.transpose(1, 2)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return x.transpose(1, 2) if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then each update orthogonalised as a matrix (its first dim: rows)."""

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_steps: int = 5) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"trainer.muon_momentum must lie in [0, 1), got {momentum}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            m = group["momentum"]
            torch._foreach_lerp_(bufs, grads, 1 - m)
            nesterov = [g.lerp(b, m).reshape(g.shape[0], -1).float() for g, b in zip(grads, bufs)]
            by_shape: Dict[Tuple[int, int], List[int]] = defaultdict(list)
            for i, u in enumerate(nesterov):
                by_shape[tuple(u.shape)].append(i)
            updates: List[Optional[torch.Tensor]] = [None] * len(params)
            for (rows, cols), idx in by_shape.items():
                ortho = orthogonalise(torch.stack([nesterov[i] for i in idx]), group["ns_steps"])
                scale = 0.2 * math.sqrt(max(rows, cols))
                for j, i in enumerate(idx):
                    updates[i] = (ortho[j] * scale).view(params[i].shape).to(params[i].dtype)
            lr, wd = group["lr"], group["weight_decay"]
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_add_(params, updates, alpha=-lr)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Groups flagged `muon: True` go to `Muon`, the others to torch's AdamW. `param_groups` is the
    list of both optimizers' own group dicts, so a scheduler or clipping that walks it reaches
    every parameter; `add_param_group` (unfreezing) routes a group by its flag."""

    def __init__(self, groups: Sequence[dict], lr: float, betas: Sequence[float], momentum: float = 0.95,
                 adamw_flags: Optional[dict] = None) -> None:
        groups = [dict(g) for g in groups]
        muon = [g for g in groups if g.get("muon")]
        adamw = [g for g in groups if not g.get("muon")]
        self.muon = Muon(muon, lr=lr, momentum=momentum) if muon else None
        self.adamw = torch.optim.AdamW(adamw, lr=lr, betas=tuple(betas), **(adamw_flags or {})) if adamw else None
        self._lr, self._betas, self._momentum, self._adamw_flags = lr, tuple(betas), momentum, dict(adamw_flags or {})
        self._routing = False
        super().__init__([p for g in groups for p in g["params"]], dict(lr=lr, **self._adamw_flags))
        self._routing = True
        self._collect_groups()

    def _parts(self) -> List[torch.optim.Optimizer]:
        return [o for o in (self.adamw, self.muon) if o is not None]

    def _collect_groups(self) -> None:
        self.param_groups = [g for o in self._parts() for g in o.param_groups]

    def add_param_group(self, param_group: dict) -> None:
        if not self._routing:  # the base constructor's bookkeeping; the parts hold the real groups
            return super().add_param_group(param_group)
        if param_group.get("muon"):
            if self.muon is None:
                self.muon = Muon([param_group], lr=self._lr, momentum=self._momentum)
            else:
                self.muon.add_param_group(param_group)
        elif self.adamw is None:
            self.adamw = torch.optim.AdamW([param_group], lr=self._lr, betas=self._betas, **self._adamw_flags)
        else:
            self.adamw.add_param_group(param_group)
        self._collect_groups()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self._parts():
            o.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon_adamw": {"adamw": self.adamw.state_dict() if self.adamw else None,
                               "muon": self.muon.state_dict() if self.muon else None}}

    def load_state_dict(self, state_dict: dict) -> None:
        if "muon_adamw" not in state_dict:
            raise ValueError("the checkpoint's optimizer state is AdamW's alone (trainer.optimizer=adamw); "
                             "resume it with trainer.optimizer=adamw, or start a new run")
        parts = state_dict["muon_adamw"]
        for name in ("adamw", "muon"):
            mine, saved = getattr(self, name), parts[name]
            if (mine is None) != (saved is None):
                raise ValueError(f"the checkpoint's optimizer has {'no' if saved is None else 'a'} {name} part "
                                 f"and this one {'has' if saved is None else 'has none'}: resume with the run's own "
                                 "trainer.optimizer / trainer.muon_* settings")
            if mine is not None:
                mine.load_state_dict(saved)
        self._collect_groups()
