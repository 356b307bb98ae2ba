"""Freezing parts of the model, and unfreezing them into the optimizer for real.

An unfreeze that only flips `requires_grad` trains nothing: AdamW was built without those
parameters. `unfreeze` adds them to the optimizer as new parameter groups (with the current
learning-rate multiplier of the scheduler).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from mobilesam_se.engine.optim import param_groups

PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def freeze_parts(model: nn.Module, parts: Sequence[str]) -> List[str]:
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown model part {part!r}; choose from {PARTS}")
        for p in getattr(model, part).parameters():
            p.requires_grad_(False)
    return list(parts)


def unfreeze_parts(model: nn.Module, parts: Sequence[str], optimizer: torch.optim.Optimizer, weight_decay: float,
                   scheduler=None) -> int:
    """Make `parts` trainable and hand their parameters to `optimizer`. Returns how many tensors."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = set()
    for part in parts:
        for name, p in getattr(model, part).named_parameters():
            p.requires_grad_(True)
            if id(p) not in in_opt:
                new.add(f"{part}.{name}")
    # The same decay (the model's `no_weight_decay`) and Muon rules as the optimizer's first groups.
    for g in param_groups(model, weight_decay, names=new, tag="unfrozen_", muon=getattr(optimizer, "muon_rule", None)):
        base_lr = g.setdefault("lr", optimizer.defaults["lr"])  # a Muon group brings its own
        g["initial_lr"] = base_lr
        optimizer.add_param_group(g)
        if scheduler is not None:
            # LambdaLR keeps one lambda and base lr per group; extend them for the new group.
            scheduler.base_lrs.append(base_lr)
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
            g["lr"] = base_lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
    return len(new)


def freeze_batchnorm_stats(model: nn.Module) -> int:
    """Put BatchNorm layers in eval mode so running statistics stay fixed (call after .train())."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            n += 1
    return n


@torch.no_grad()
def estimate_batchnorm_stats(model: nn.Module, images: Sequence[torch.Tensor], batch_size: int = 8) -> int:
    """Replace every BatchNorm's running statistics by population statistics of `images` (each a
    (3, S, S) preprocessed image): a cumulative average over forwards of `batch_size` images, so
    the variance also holds the spread between images. Returns the number of BatchNorm layers.

    At batch 1-2 the running statistics of training are an EMA of per-image statistics, which
    an eval-mode network does not see (experiments/learning: the model trained that way loses
    more than half of its val recall in eval mode); estimated once and then kept fixed
    (`freeze.batchnorm_stats_epoch`), training and evaluation compute the same function."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(images) == 0:
        return len(bns)
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        m.train()
    encoder = getattr(model, "image_encoder", model)
    device = next(model.parameters()).device
    for s in range(0, len(images), batch_size):
        encoder(torch.stack(list(images[s : s + batch_size])).to(device))
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)
    return len(bns)

