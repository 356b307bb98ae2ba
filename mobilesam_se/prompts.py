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
