"""COCO-style segmentations (polygons, compressed and uncompressed RLE) -> boolean masks.

Shared by the COCO and SA-1B datasets. Areas are measured on the RLEs, so that
`max_masks_per_image` can pick the largest objects *before* decoding: an SA-1B image holds ~100
masks of 1500x2250 pixels, and decoding only what is kept saves most of the time and memory.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools import mask as mask_utils

from mobilesam_se.data.errors import Problem
from mobilesam_se.data.targets import largest_indices

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_pycocotools():
    """pycocotools' Cython code trips a NumPy 2 DeprecationWarning on every call; harmless noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"__array__ implementation doesn't accept a copy keyword", category=DeprecationWarning
        )
        yield


# pycocotools' `area` sizes its output with np.array((n,), dtype=np.uint8), which NumPy 2 refuses
# for n >= 256 RLEs (OverflowError); asked in pieces below that, it returns the same areas.
AREA_CHUNK = 255


def rle_areas(rles: Sequence[dict]) -> np.ndarray:
    """(N,) int64 pixel counts of COCO RLEs; any N (pycocotools' `area` alone fails from 256)."""
    if len(rles) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.asarray(mask_utils.area(list(rles[s : s + AREA_CHUNK])), dtype=np.int64)
                           for s in range(0, len(rles), AREA_CHUNK)])


def to_rle(segmentation: Any, hw: Tuple[int, int]) -> dict:
    """One COCO segmentation -> one compressed RLE; ValueError says what is wrong with it."""
    h, w = hw
    if isinstance(segmentation, list):
        # Fewer than 3 points has no area; pycocotools would also read a lone 4-number polygon
        # as a box, so such polygons are removed before it sees them.
        polygons = [p for p in segmentation if isinstance(p, (list, tuple)) and len(p) >= 6]
        if not polygons:
            return mask_utils.encode(np.zeros((h, w), dtype=np.uint8, order="F"))
        return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = [int(v) for v in segmentation["size"]]
        if size != [h, w]:
            raise ValueError(f"its RLE is {size[1]}x{size[0]} (WxH) but the image is {w}x{h}")
        counts = segmentation["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            return mask_utils.frPyObjects(segmentation, h, w)
        if isinstance(counts, str):
            counts = counts.encode("ascii")
        if not isinstance(counts, bytes):
            raise ValueError(f"RLE counts must be a string or a list, got {type(counts).__name__}")
        return {"size": size, "counts": counts}
    raise ValueError("segmentation is neither a list of polygons nor an RLE dict with 'size' and 'counts'")


def decode_segmentations(
    segmentations: Sequence[Tuple[str, Any]],
    hw: Tuple[int, int],
    cap: Optional[int],
    where: Path,
) -> Tuple[np.ndarray, List[Problem], Optional[np.ndarray]]:
    """[(label, segmentation)] -> ((K, H, W) bool masks of the `cap` largest, problems, dropped).

    `dropped` is the union (H, W) of the objects the cap left out (None when none were), so the
    loss can ignore candidates that segment them instead of pushing them to background.

    `label` names the annotation in messages; `where` is the file the annotations come from.
    Annotations that rasterise to nothing (degenerate polygons, which real COCO files contain)
    carry no training signal and are dropped without complaint.
    """
    with _quiet_pycocotools():
        return _decode_segmentations(segmentations, hw, cap, where)


def _decode_segmentations(
    segmentations: Sequence[Tuple[str, Any]],
    hw: Tuple[int, int],
    cap: Optional[int],
    where: Path,
) -> Tuple[np.ndarray, List[Problem], Optional[np.ndarray]]:
    rles: List[dict] = []
    problems: List[Problem] = []
    for label, segmentation in segmentations:
        try:
            rles.append(to_rle(segmentation, hw))
        except (ValueError, TypeError, KeyError, UnicodeEncodeError) as exc:
            problems.append(Problem(where, f"{label}: bad segmentation ({exc}); fix or remove the annotation"))
    if problems or not rles:
        return np.zeros((0, *hw), dtype=bool), problems, None
    try:
        areas = rle_areas(rles)
        nonempty = np.flatnonzero(areas > 0)
        if len(nonempty) < len(rles):
            logger.debug("%s: dropped %d empty annotation(s)", where, len(rles) - len(nonempty))
        keep = nonempty[largest_indices(areas[nonempty], cap)]
        if len(keep) == 0:
            return np.zeros((0, *hw), dtype=bool), problems, None
        decoded = mask_utils.decode([rles[i] for i in keep])  # (H, W, K), Fortran order
        rest = sorted(set(nonempty.tolist()) - set(keep.tolist()))
        # One merged RLE decodes the union of the capped-out objects in a single pass.
        dropped = mask_utils.decode(mask_utils.merge([rles[i] for i in rest])).astype(bool) if rest else None
    except ValueError:  # pycocotools' "Invalid RLE mask representation"; find which ones
        bad = [label for (label, _), rle in zip(segmentations, rles) if not _decodes(rle)]
        return np.zeros((0, *hw), dtype=bool), [
            Problem(
                where, f"{label}: corrupt RLE (its counts do not add up to the mask size); fix or remove the annotation"
            )
            for label in bad or ["an annotation"]
        ], None
    return np.ascontiguousarray(decoded.transpose(2, 0, 1), dtype=bool), problems, dropped


def _decodes(rle: dict) -> bool:
    try:
        mask_utils.decode(rle)
        return True
    except ValueError:
        return False
