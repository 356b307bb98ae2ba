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


def overlay(image: np.ndarray, records: Sequence[Dict[str, Any]]) -> np.ndarray:
    """HxWx3 uint8 RGB with each record's mask in its own colour (`visual.overlay_masks_on_image`:
    larger masks first, so small ones stay visible on top)."""
    from mobilesam_se.visual import overlay_masks_on_image

    masks = [r["segmentation"] if isinstance(r["segmentation"], np.ndarray) else rle_utils.decode(r["segmentation"])
             for r in records]
    stacked = np.stack(masks).astype(bool) if masks else np.zeros((0, *image.shape[:2]), bool)
    return overlay_masks_on_image(image, stacked)


def write_overlay(image: np.ndarray, records: List[Dict[str, Any]], path: PathLike) -> None:
    from mobilesam_se.visual import save_rgb

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_rgb(path, overlay(image, records))
