"""Simulated user clicks on full-resolution masks: an object's centre and corrective clicks.

A simulated user clicks as far from any boundary as possible (the maximum of the distance
transform), the usual protocol of interactive-segmentation benchmarks: such a click is
unambiguous about which region it means. The mask is zero-padded first so the image border counts
as a boundary too; otherwise a region touching the border would be clicked on the border.
Coordinates are (x, y) pixel indices of the original image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    positive: bool  # True: a missed region (add it); False: a false-positive region (remove it)


def _as_bool(mask) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, dtype=bool)


def interior_point(mask) -> Optional[Tuple[int, int]]:
    """(x, y) of the pixel of `mask` farthest from its boundary; None for an empty mask.

    Elongated shapes have a ridge of equally distant pixels (a rectangle's mid-line): among those
    ties the one nearest their mean is taken, so the click lands mid-ridge rather than at its
    raster-order first end (first in raster order if still tied).
    """
    m = _as_bool(mask)
    if not m.any():
        return None
    padded = np.pad(m, 1).astype(np.uint8)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    ys, xs = np.nonzero(dist == dist.max())
    d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    i = int(np.argmin(d2))
    return int(xs[i]), int(ys[i])


def _largest_component(region: np.ndarray) -> Tuple[int, Optional[np.ndarray]]:
    """(area, mask) of the largest 8-connected component of `region`; (0, None) when empty."""
    if not region.any():
        return 0, None
    n, labels, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    best = int(np.argmax(areas))
    return int(areas[best]), labels == best + 1


def corrective_click(pred, gt) -> Optional[Click]:
    """The next click of a simulated user correcting `pred` (H, W) towards `gt` (H, W).

    Missed pixels (gt and not pred) and false positives (pred and not gt) are split into
    8-connected components; the click goes to the interior point of the largest one, positive
    if it is missed, negative if it is a false positive (a missed region wins a tie, since
    adding the object is what the user came for). None when pred == gt.
    """
    p, g = _as_bool(pred), _as_bool(gt)
    fn_area, fn = _largest_component(g & ~p)
    fp_area, fp = _largest_component(p & ~g)
    if fn is None and fp is None:
        return None
    positive = fn_area >= fp_area
    point = interior_point(fn if positive else fp)
    assert point is not None
    return Click(x=point[0], y=point[1], positive=positive)
