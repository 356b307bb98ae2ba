"""SAM's image geometry: resize the longest side, normalise, then pad; map coordinates alike.

Shared by the datasets (which prepare training inputs) and the model (which prepares inference
inputs), so both agree to the pixel with `segment_anything.utils.transforms.ResizeLongestSide`.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

# SAM's statistics, in 0-255 pixel units.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def preprocess_shape(height: int, width: int, target: int) -> Tuple[int, int]:
    """Size after resizing the longest side to `target` (SAM rounds half up)."""
    scale = target * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def apply_coords(coords: np.ndarray | torch.Tensor, original_hw: Tuple[int, int], target: int):
    """Map (..., 2) xy coordinates of the original image into the resized frame."""
    old_h, old_w = original_hw
    new_h, new_w = preprocess_shape(old_h, old_w, target)
    if isinstance(coords, torch.Tensor):
        coords = coords.clone().to(torch.float32)
    else:
        coords = np.array(coords, dtype=np.float64, copy=True)
    coords[..., 0] = coords[..., 0] * (new_w / old_w)
    coords[..., 1] = coords[..., 1] * (new_h / old_h)
    return coords


def apply_boxes(boxes: np.ndarray | torch.Tensor, original_hw: Tuple[int, int], target: int):
    """Map (..., 4) XYXY boxes of the original image into the resized frame."""
    shape = boxes.shape
    return apply_coords(boxes.reshape(*shape[:-1], 2, 2), original_hw, target).reshape(shape)


def resize_image(image: np.ndarray, target: int) -> np.ndarray:
    """Resize an HxWx3 uint8 image so its longest side is `target`, as SAM does (PIL bilinear).

    SAM's ResizeLongestSide goes through torchvision's PIL path; we use the same PIL resize so the
    pixels match the reference exactly.
    """
    from PIL import Image

    h, w = image.shape[:2]
    new_h, new_w = preprocess_shape(h, w, target)
    return np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def normalize_and_pad(pixels: torch.Tensor, target: int) -> torch.Tensor:
    """(B, 3, h, w) float 0-255 -> normalised, then zero-padded bottom/right to target x target.

    Normalising before padding matters: the padded area must be 0 after normalisation, as in SAM.
    """
    mean = torch.tensor(PIXEL_MEAN, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=pixels.device, dtype=pixels.dtype).view(1, 3, 1, 1)
    x = (pixels - mean) / std
    h, w = x.shape[-2:]
    return F.pad(x, (0, target - w, 0, target - h))


def preprocess_image(image: np.ndarray, target: int) -> torch.Tensor:
    """HxWx3 uint8 RGB -> (3, target, target) float32 model input."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    resized = resize_image(image, target)
    # The same float32 arithmetic as `normalize_and_pad`, in numpy: single-threaded, so a data
    # loader on a small, busy CPU does not wait on OpenMP for every per-image op.
    h, w = resized.shape[:2]
    mean = np.asarray(PIXEL_MEAN, np.float32)[:, None, None]
    std = np.asarray(PIXEL_STD, np.float32)[:, None, None]
    out = np.zeros((3, target, target), np.float32)
    out[:, :h, :w] = (resized.transpose(2, 0, 1).astype(np.float32) - mean) / std
    return torch.from_numpy(out)


def postprocess_masks(
    low_res_logits: torch.Tensor, input_hw: Tuple[int, int], original_hw: Tuple[int, int], target: int
) -> torch.Tensor:
    """(..., h4, w4) low-res logits -> (..., H, W) logits at the original size, as SAM does."""
    lead = low_res_logits.shape[:-2]
    x = low_res_logits.reshape(-1, 1, *low_res_logits.shape[-2:])
    x = F.interpolate(x, (target, target), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    x = F.interpolate(x, original_hw, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *original_hw)
