"""Grid point prompts placed exactly like SAM's automatic mask generator (AMG).

Every grid point is its own single-point prompt; this module only places the points.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from mobilesam_se.transforms import apply_coords


def build_point_grid(n: int) -> np.ndarray:
    """(n*n, 2) xy points at (k + 0.5) / n of a unit square, x varying fastest (as the AMG)."""
    if n < 1:
        raise ValueError(f"grid_points must be >= 1, got {n}")
    offset = 1.0 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    xs = np.tile(side[None, :], (n, 1))
    ys = np.tile(side[:, None], (1, n))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def grid_points_in_image(n: int, original_hw: Tuple[int, int]) -> np.ndarray:
    """(n*n, 2) grid in original-image pixel coordinates."""
    h, w = original_hw
    return build_point_grid(n) * np.array([w, h])[None, :]


def grid_points_for_model(n: int, original_hw: Tuple[int, int], image_size: int) -> torch.Tensor:
    """(n*n, 2) float32 grid in the model's resized frame, the AMG's `apply_coords` path."""
    pts = apply_coords(grid_points_in_image(n, original_hw), original_hw, image_size)
    return torch.as_tensor(pts, dtype=torch.float32)


def subsample_prompts(num_prompts: int, k: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of `k` prompts drawn without replacement (all of them when k is None or >= num)."""
    if k is None or k <= 0 or k >= num_prompts:
        return torch.arange(num_prompts)
    return torch.randperm(num_prompts, generator=generator)[:k].sort().values


PROMPT_SAMPLING = ("uniform", "balanced")


def _group_weights(groups: torch.Tensor) -> torch.Tensor:
    """Point p's sampling weight: 1 / (points in its group), so every group weighs the same."""
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].double()


def _gumbel_top_k(log_w: torch.Tensor, k: int, generator: torch.Generator | None, draws: int = 1) -> torch.Tensor:
    """(draws, k) indices: weighted sampling without replacement, as successive draws ~ w (the
    Gumbel top-k trick: the k largest log w + Gumbel noise)."""
    u = torch.rand((draws, log_w.numel()), generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    return (log_w[None] - torch.log(-torch.log(u))).topk(k, dim=1).indices


def balanced_subsample(groups: torch.Tensor, k: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of `k` prompts drawn without replacement so that every group (the object under each
    point; -1: background, one group of its own) has about the same chance: point p is weighted
    1 / (points in its group). A large object holds most of a grid's points and a small one one or
    two, so uniform sub-sampling spends the step's decoder on a few large objects and background.
    """
    n = int(groups.numel())
    if k is None or k <= 0 or k >= n:
        return torch.arange(n)
    return _gumbel_top_k(_group_weights(groups).log(), k, generator)[0].sort().values


def balanced_inclusion(groups: torch.Tensor, k: int, generator: torch.Generator | None = None,
                       draws: int = 512) -> torch.Tensor:
    """(n,) estimated probability that `balanced_subsample` keeps each point (Monte Carlo over
    `draws` samples; a point is kept once at least, so never 0). The IoU head's terms divide by it
    (over the uniform k / n) to stay calibrated on the whole grid, which the sample over-represents
    objects of."""
    n = int(groups.numel())
    if k >= n:
        return torch.ones(n, dtype=torch.float64)
    idx = _gumbel_top_k(_group_weights(groups).log(), k, generator, draws)
    counts = torch.bincount(idx.flatten(), minlength=n).double()
    return (counts + 1.0) / (draws + 1.0)
