"""Training targets derived from full-resolution masks."""
from __future__ import annotations

from typing import Optional, Tuple

import cv2
import numpy as np


def lowres_size(input_hw: Tuple[int, int], image_size: int) -> Tuple[int, int]:
    """(h, w) of the image region inside the (S/4, S/4) low-res frame: h'/4, w'/4 rounded half
    up (SAM's own rounding convention), at least 1 and at most S//4."""
    side = image_size // 4
    return tuple(min(side, max(1, int(v / 4 + 0.5))) for v in input_hw)  # type: ignore[return-value]


def lowres_coverage(masks: np.ndarray, input_hw: Tuple[int, int], image_size: int) -> np.ndarray:
    """(K, H, W) bool full-res masks -> (K, S/4, S/4) float32: the share of each low-res cell that the
    object covers, in the frame of the low-res logits (the padding beyond the region is 0).

    One area-average resampling straight from the original mask to the object's low-res region.
    Resizing to S first and then again would resample twice (nearest neighbour twice shifts and
    erodes thin objects).
    """
    side = image_size // 4
    h4, w4 = lowres_size(input_hw, image_size)
    out = np.zeros((masks.shape[0], side, side), dtype=np.float32)
    # One mask at a time: a float copy of all K masks at once can reach gigabytes (SA-1B).
    for k in range(masks.shape[0]):
        out[k, :h4, :w4] = cv2.resize(masks[k].astype(np.float32), (w4, h4), interpolation=cv2.INTER_AREA)
    return out


def lowres_targets(masks: np.ndarray, input_hw: Tuple[int, int], image_size: int) -> np.ndarray:
    """(K, H, W) bool full-res masks -> (K, S/4, S/4) bool targets in the low-res logits' frame: the
    cells an object covers at least half of."""
    return lowres_coverage(masks, input_hw, image_size) >= 0.5


def lowres_touched(mask: np.ndarray, input_hw: Tuple[int, int], image_size: int) -> np.ndarray:
    """(H, W) bool -> (S/4, S/4) bool: every low-res cell the mask covers at all (an ignore region
    for objects too small to own a cell under the >= 0.5 rule of `lowres_targets`)."""
    side = image_size // 4
    h4, w4 = lowres_size(input_hw, image_size)
    out = np.zeros((side, side), dtype=bool)
    out[:h4, :w4] = cv2.resize(mask.astype(np.float32), (w4, h4), interpolation=cv2.INTER_AREA) > 0
    return out


def largest_indices(areas: np.ndarray, cap: Optional[int]) -> np.ndarray:
    """Indices of the `cap` largest areas, in their original order (all of them when cap is None).

    Capping drops the smallest objects: it bounds memory and matching cost on images with
    hundreds of masks (SA-1B) at the price of never training on those small objects.
    """
    n = len(areas)
    if cap is None or n <= cap:
        return np.arange(n)
    # Stable sort on -area: among equal areas the earlier annotation wins, so the result is
    # deterministic.
    keep = np.argsort(-np.asarray(areas, dtype=np.int64), kind="stable")[:cap]
    return np.sort(keep)
