"""Write one image and its object masks in the folder layout that FolderDataset reads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence

import cv2
import numpy as np

# Fixed so the same arrays always give the same bytes.
_PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 3]
_JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 95]


def write_folder_sample(
    root: str | os.PathLike,
    image_id: str,
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    image_ext: str = ".png",
) -> List[Path]:
    """Write root/image/<id><ext> (HxWx3 uint8 RGB) and root/mask/<id>/obj_<k>.png (0/255).

    A mask-less image gets an empty mask folder *and* a line in root/empty.txt, which is how the
    layout says "no objects" on purpose. Returns the paths written.
    """
    root = Path(root)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {image.shape} {image.dtype}")
    (root / "image").mkdir(parents=True, exist_ok=True)
    mask_dir = root / "mask" / image_id
    mask_dir.mkdir(parents=True, exist_ok=True)
    image_path = root / "image" / f"{image_id}{image_ext}"
    params = _JPEG_PARAMS if image_ext.lower() in (".jpg", ".jpeg") else _PNG_PARAMS
    _imwrite(image_path, np.ascontiguousarray(image[..., ::-1]), params)  # cv2 wants BGR
    written = [image_path]
    for k, mask in enumerate(masks):
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask {k} is {mask.shape}, image is {image.shape[:2]}")
        path = mask_dir / f"obj_{k:03d}.png"
        _imwrite(path, (mask != 0).astype(np.uint8) * 255, _PNG_PARAMS)
        written.append(path)
    if len(masks) == 0:
        with open(root / "empty.txt", "a", encoding="utf-8") as f:
            f.write(f"{image_id}\n")
    return written


def _imwrite(path: Path, array: np.ndarray, params: List[int]) -> None:
    if not cv2.imwrite(str(path), array, params):
        raise OSError(f"{path}: could not write the file")
