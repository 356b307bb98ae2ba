"""Outputs of the segment-everything tool: SA-1B per-image JSON and a colour overlay PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import numpy as np

from mobilesam_se.inference import rle as rle_utils

PathLike = Union[str, os.PathLike]


def sa1b_record(records: Sequence[Dict[str, Any]], image_hw, file_name: str, image_id: int = 0) -> Dict[str, Any]:
    """AMG records (output_mode='coco_rle') -> one SA-1B image file's dict.

    {"image": {image_id, width, height, file_name}, "annotations": [{id, segmentation, area, bbox,
    predicted_iou, stability_score, point_coords, crop_box}, ...]}; RLE counts are str.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    anns = []
    for i, r in enumerate(records):
        seg = r["segmentation"]
        if not (isinstance(seg, dict) and isinstance(seg.get("counts"), str)):
            raise ValueError("SA-1B records need COCO RLE segmentations with str counts (output_mode='coco_rle')")
        anns.append(
            {
                "id": i,
                "segmentation": {"size": [int(seg["size"][0]), int(seg["size"][1])], "counts": seg["counts"]},
                "area": int(r["area"]),
                "bbox": [float(v) for v in r["bbox"]],
                "predicted_iou": float(r["predicted_iou"]),
                "stability_score": float(r["stability_score"]),
                "point_coords": [[float(v) for v in p] for p in r["point_coords"]],
                "crop_box": [float(v) for v in r["crop_box"]],
            }
        )
    return {"image": {"image_id": int(image_id), "width": w, "height": h, "file_name": file_name}, "annotations": anns}


def write_json(obj: Dict[str, Any], path: PathLike) -> None:
    """Write JSON atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def mask_colors(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 distinct-looking colours (golden-ratio hues, fixed saturation/value jitter)."""
    import colorsys

    rng = np.random.default_rng(seed)
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        h = (i * 0.618033988749895 + 0.1) % 1.0
        s = 0.65 + 0.35 * rng.random()
        v = 0.75 + 0.25 * rng.random()
        out[i] = np.round(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255)
    return out


def overlay(image: np.ndarray, records: Sequence[Dict[str, Any]], alpha: float = 0.45, outline: bool = True) -> np.ndarray:
    """HxWx3 uint8 RGB with each mask blended in its own colour; larger masks are painted first.

    Each mask is blended on the result so far, so small masks stay visible on top of large ones.
    """
    import cv2

    out = image.astype(np.float32).copy()
    order = sorted(range(len(records)), key=lambda i: -int(records[i]["area"]))
    colors = mask_colors(len(records))
    edges = np.zeros(image.shape[:2], dtype=bool)
    for rank, i in enumerate(order):
        seg = records[i]["segmentation"]
        m = seg if isinstance(seg, np.ndarray) else rle_utils.decode(seg)
        if not m.any():
            continue
        out[m] = (1 - alpha) * out[m] + alpha * colors[rank]
        if outline:
            m8 = m.astype(np.uint8)
            edges |= (cv2.dilate(m8, np.ones((3, 3), np.uint8)) - m8).astype(bool)
    res = np.clip(out, 0, 255).astype(np.uint8)
    if outline:
        res[edges] = (0.5 * res[edges] + 127).astype(np.uint8)
    return res


def write_overlay(image: np.ndarray, records: List[Dict[str, Any]], path: PathLike) -> None:
    import cv2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), overlay(image, records)[..., ::-1]):
        raise OSError(f"could not write {path}")
