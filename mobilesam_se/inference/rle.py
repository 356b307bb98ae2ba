"""Masks <-> COCO run-length encodings, through pycocotools, and mask boxes.

All RLEs here are COCO's compressed form with `counts` as `str` (JSON-ready), as in SA-1B.
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils

Rle = Dict[str, Any]
ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_numpy_bool(masks: ArrayLike) -> np.ndarray:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().to("cpu", torch.bool).numpy()
    return np.asarray(masks, dtype=bool)


def rle_counts(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(k, H, W) bool masks on any device -> COCO run lengths, computed on that device.

    Returns (counts, lengths): int64 `counts` of all masks back to back and `lengths` (k,), the
    number of runs of each mask. Runs are over the column-major flattened mask, the first one
    counts zeros (0 when the mask starts with a one), as in pycocotools. Batched, with one
    `nonzero` (one host sync on a GPU) for the whole batch.

    With a zero pixel put in front of every mask, every mask starts with a run of zeros and its run
    boundaries are exactly its value changes; the first run is then one too long.
    """
    k, h, w = masks.shape
    n = h * w
    dev = masks.device
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=torch.long, device=dev)
    flat = masks.transpose(1, 2).reshape(k, n)
    ext = torch.cat([torch.zeros(k, 1, dtype=torch.bool, device=dev), flat.bool()], dim=1)
    rows, cols = torch.nonzero(ext[:, 1:] != ext[:, :-1], as_tuple=True)  # row-major, sorted
    pos = cols + 1  # boundary positions in ext
    changes = torch.bincount(rows, minlength=k)  # (k,)
    lengths = changes + 1
    first_change = torch.cumsum(changes, 0) - changes  # index of each row's first change in `rows`
    out_start = torch.cumsum(lengths, 0) - lengths
    idx = torch.arange(rows.numel(), device=dev)
    rank = idx - first_change[rows]  # rank of a change within its row
    prev = torch.where(rank > 0, pos[(idx - 1).clamp_min(0)], torch.zeros_like(pos))
    counts = torch.empty(rows.numel() + k, dtype=torch.long, device=dev)  # == lengths.sum(), without a sync
    counts[out_start[rows] + rank] = pos - prev
    # the last run of each row ends at n + 1 and starts at the row's last change (0 if none)
    last = torch.zeros(k, dtype=torch.long, device=dev).scatter_reduce_(0, rows, pos, "amax")
    counts[out_start + lengths - 1] = (n + 1) - last
    counts[out_start] -= 1  # the zero put in front
    return counts, lengths


def count_true(masks: torch.Tensor) -> torch.Tensor:
    """(k, ...) bool -> (k,) int64 number of True elements per mask, exactly.

    Why not `masks.sum(...)`: a bool sum first converts the whole tensor to int64 (8 bytes per
    pixel, a fresh buffer), ~7x slower on the CPU than reading the bools once. Here the bools are
    read 8 at a time as int64 words and words are added in groups of at most 127, so each byte lane
    of a group's sum counts at most 127 ones (no carry into the next lane, no signed overflow);
    the lanes are summed at the end. Works on any device (little-endian lanes are summed in any
    order, so endianness does not matter).
    """
    k = masks.shape[0]
    if masks.numel() == 0:
        return torch.zeros(k, dtype=torch.int64, device=masks.device)
    flat = masks.reshape(k, -1).view(torch.uint8)
    if flat.shape[1] % 8:  # zero-pad rows to whole words (a 1-byte copy, rare: odd mask sizes)
        flat = torch.nn.functional.pad(flat, (0, 8 - flat.shape[1] % 8))
    if flat.stride(1) != 1 or flat.stride(0) != flat.shape[1] or flat.storage_offset() % 8:
        flat = flat.contiguous()
        if flat.storage_offset() % 8:
            flat = flat.clone()
    w = flat.view(torch.int64)  # (k, words)
    words, g = w.shape[1], 127
    main = (words // g) * g
    parts = [w[:, :main].reshape(k, -1, g).sum(2)] if main else []
    if main < words:
        parts.append(w[:, main:].sum(1, keepdim=True))
    lanes = torch.cat(parts, 1).contiguous().view(torch.uint8)  # (k, groups * 8) byte lanes
    return lanes.sum(1, dtype=torch.int64)


def counts_to_rles(counts: np.ndarray, lengths: np.ndarray, hw: Tuple[int, int]) -> List[Rle]:
    """Host run lengths (from `rle_counts`) -> compressed COCO RLEs with str counts (pycocotools' C encoder)."""
    if len(lengths) == 0:
        return []
    h, w = hw
    parts = np.split(np.asarray(counts, dtype=np.int64), np.cumsum(lengths)[:-1])
    rles = mask_utils.frPyObjects([{"size": [h, w], "counts": p.tolist()} for p in parts], h, w)
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def encode(masks: ArrayLike) -> List[Rle]:
    """(k, H, W) binary masks -> k COCO RLEs ({"size": [H, W], "counts": str})."""
    m = _as_numpy_bool(masks)
    if m.ndim == 2:
        m = m[None]
    if m.shape[0] == 0:
        return []
    # pycocotools wants (H, W, k) uint8 in Fortran order (column-major per mask).
    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    for r in rles:
        r["counts"] = r["counts"].decode("ascii")
    return rles


def _to_coco(rle: Rle) -> Rle:
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": list(rle["size"]), "counts": counts.encode("ascii")}
    if isinstance(counts, list):  # uncompressed
        h, w = rle["size"]
        return mask_utils.frPyObjects(rle, h, w)
    return rle


def _decode(obj):
    with warnings.catch_warnings():  # pycocotools 2.0.x warns under numpy 2 about __array__(copy=)
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(obj)


def decode(rle: Rle) -> np.ndarray:
    """One RLE (compressed, str or bytes counts, or uncompressed) -> (H, W) bool."""
    return _decode(_to_coco(rle)).astype(bool)


def decode_many(rles: Sequence[Rle]) -> np.ndarray:
    """k RLEs of the same size -> (k, H, W) bool."""
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    m = _decode([_to_coco(r) for r in rles])  # (H, W, k)
    return np.ascontiguousarray(m.transpose(2, 0, 1)).astype(bool)


def area(rle: Rle) -> int:
    return int(mask_utils.area(_to_coco(rle)))


def iou_matrix(a: Sequence[Rle], b: Sequence[Rle]) -> np.ndarray:
    """(len(a), len(b)) mask IoUs."""
    if not a or not b:
        return np.zeros((len(a), len(b)))
    return np.asarray(mask_utils.iou([_to_coco(r) for r in a], [_to_coco(r) for r in b], [0] * len(b)))


def to_uncompressed(mask: np.ndarray) -> Rle:
    """(H, W) bool -> uncompressed RLE (column-major counts, first count is zeros), as SAM's AMG."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def uncrop(rle: Rle, crop_box: Sequence[int], orig_hw: Tuple[int, int]) -> Rle:
    """An RLE of a crop -> the same mask placed in the full image (zeros elsewhere)."""
    x0, y0, x1, y1 = crop_box
    h, w = orig_hw
    if (x0, y0, x1, y1) == (0, 0, w, h):
        return rle
    full = np.zeros((h, w), dtype=bool)
    full[y0:y1, x0:x1] = decode(rle)
    return encode(full[None])[0]


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(k, H, W) bool -> (k, 4) int64 XYXY boxes with inclusive max corners; [0, 0, 0, 0] if empty."""
    k, h, w = masks.shape
    if k == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    rows = masks.any(dim=2)  # (k, H)
    cols = masks.any(dim=1)  # (k, W)
    # argmax returns the first maximal index: the first True (or 0 if none).
    top = rows.to(torch.uint8).argmax(dim=1)
    bottom = h - 1 - rows.flip(1).to(torch.uint8).argmax(dim=1)
    left = cols.to(torch.uint8).argmax(dim=1)
    right = w - 1 - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1).long()
    return boxes * rows.any(dim=1, keepdim=True)
