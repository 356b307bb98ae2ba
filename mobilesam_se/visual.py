"""Pictures people would rather look at than read: masks over images, grid points drawn."""
from __future__ import annotations

from typing import Optional, Sequence

import cv2
import numpy as np


def distinct_colors(n: int, seed: int = 0) -> np.ndarray:
    """(n, 3) uint8 RGB colours, well separated in hue, deterministic."""
    if n == 0:
        return np.zeros((0, 3), np.uint8)
    golden = 0.618033988749895
    rng = np.random.default_rng(seed)
    hues = (rng.random() + golden * np.arange(n)) % 1.0
    hsv = np.stack([hues * 179, np.full(n, 200), np.full(n, 255)], axis=-1).astype(np.uint8)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def overlay_masks_on_image(
    image: np.ndarray,
    masks: np.ndarray,
    points: Optional[np.ndarray] = None,
    alpha: float = 0.5,
    draw_contours: bool = True,
    point_colors: Optional[Sequence[Sequence[int]]] = None,
) -> np.ndarray:
    """Each mask of (K, H, W) in its own colour over an HxWx3 uint8 RGB image.

    Larger masks are painted first so small ones stay visible. `points` (N, 2) xy in image pixels
    are drawn as small dots (e.g. the prompt grid). Returns a new uint8 RGB image.
    """
    out = image.astype(np.float32).copy()
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.shape[0] and masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks {masks.shape[1:]} and image {image.shape[:2]} differ in size")
    colors = distinct_colors(len(masks))
    order = np.argsort([-int(m.sum()) for m in masks])
    for i in order:
        m = masks[i]
        out[m] = (1 - alpha) * out[m] + alpha * colors[i]
    out = out.clip(0, 255).astype(np.uint8)
    if draw_contours:
        for i in order:
            contours, _ = cv2.findContours(masks[i].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(out, contours, -1, tuple(int(c) for c in colors[i]), 1)
    if points is not None:
        r = max(1, round(max(image.shape[:2]) / 300))
        for j, (x, y) in enumerate(np.asarray(points)):
            color = tuple(int(c) for c in point_colors[j]) if point_colors is not None else (255, 255, 255)
            cv2.circle(out, (int(round(x)), int(round(y))), r + 1, (0, 0, 0), -1)
            cv2.circle(out, (int(round(x)), int(round(y))), r, color, -1)
    return out


def side_by_side(*images: np.ndarray, gap: int = 4) -> np.ndarray:
    """Concatenate same-height RGB images horizontally with a white gap."""
    h = max(im.shape[0] for im in images)
    parts = []
    for k, im in enumerate(images):
        pad = np.full((h, im.shape[1], 3), 255, np.uint8)
        pad[: im.shape[0]] = im
        parts.append(pad)
        if k < len(images) - 1:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
    return np.concatenate(parts, axis=1)


def save_rgb(path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
