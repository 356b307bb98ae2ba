"""Decode images and masks from disk into plain arrays, turning every failure into a Problem.

Images become HxWx3 uint8 RGB whatever their mode (RGBA, grayscale, 16-bit, paletted, CMYK), as
displayed, i.e. after the EXIF orientation. Conversions are done by hand where Pillow's own
would be lossy or noisy: `convert("L")` clips 16-bit values instead of scaling them, and
`convert("RGB")` of a paletted image with transparency warns.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps

from mobilesam_se.data.errors import DatasetError, Problem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_EXTENSIONS = (".png",)


def is_hidden(path: Path) -> bool:
    """Files such as .DS_Store or ._foo are OS litter, not data."""
    return path.name.startswith(".")


def _open(path: Path, what: str) -> Image.Image:
    """Open and fully decode (Pillow is lazy; truncation only shows on load)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()  # detached from the file; keeps `info`, hence the EXIF block
    except FileNotFoundError:
        raise DatasetError(Problem(path, f"{what} file not found; restore it or remove it from the dataset"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            Problem(path, f"cannot decode {what} ({exc}); the file is corrupt or not an image: re-export or remove it")
        )


def _exif_transpose(im: Image.Image) -> Image.Image:
    # Broken EXIF blocks make Pillow warn or fail; the pixels are still fine, so an unreadable
    # orientation means "as stored" rather than a lost image.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ImageOps.exif_transpose(im)
        except (ValueError, OSError, SyntaxError, KeyError, TypeError):
            return im


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale integer/float pixel arrays to 0-255 uint8 (16-bit -> top 8 bits, rounded)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        # Mode "F": assume 0-1 when it fits, else 0-255, as image libraries write them.
        scale = 255.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 1.0
        return np.clip(np.nan_to_num(arr) * scale + 0.5, 0, 255).astype(np.uint8)
    # 16-bit (and mode "I", which Pillow uses for 16-bit PNGs too): 65535 -> 255.
    return ((np.clip(arr.astype(np.int64), 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow image -> HxWx3 uint8 RGB. Alpha is dropped (not composited) to stay simple and
    deterministic; grayscale is replicated to three channels."""
    if im.mode == "P":
        im = im.convert("RGBA")  # the palette may carry transparency; RGBA avoids Pillow's warning
    if im.mode in ("RGB", "RGBA", "RGBX"):
        return np.ascontiguousarray(np.asarray(im)[..., :3])
    if im.mode in ("L", "LA", "1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im)
        if arr.ndim == 3:  # LA: drop alpha
            arr = arr[..., 0]
        gray = _to_uint8(arr)
        return np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2))
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, LAB, ...: Pillow's conversion is exact enough


def load_image_rgb(path: Path, expected_hw: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Read an image as displayed (EXIF orientation applied) into HxWx3 uint8 RGB.

    With `expected_hw` (from an annotation file) a size mismatch is a Problem; annotations made on
    the raw, un-rotated pixels (as COCO's sizes are) are honoured by falling back to the raw frame.
    """
    raw = _open(path, "image")
    im = _exif_transpose(raw)
    if expected_hw is not None:
        got = (im.height, im.width)
        if got != tuple(expected_hw):
            if (raw.height, raw.width) == tuple(expected_hw):
                im = raw  # the annotations describe the stored pixels, not the rotated view
            else:
                raise DatasetError(
                    Problem(
                        path,
                        f"image is {got[1]}x{got[0]} (WxH) but its annotations say "
                        f"{expected_hw[1]}x{expected_hw[0]}; fix the annotation or re-export the image",
                    )
                )
    return pil_to_rgb(im)


def load_binary_mask(path: Path) -> np.ndarray:
    """Read an object mask PNG as HxW bool: any nonzero value is the object (so 16-bit masks with
    values > 1, 0/1 masks and 0/255 masks all work). Colour masks count a pixel as object when any
    colour channel is nonzero; alpha is ignored. Paletted masks use the palette index."""
    im = _exif_transpose(_open(path, "mask"))
    arr = np.asarray(im)
    if arr.ndim == 3:
        colour = arr[..., :3] if im.mode in ("RGBA", "RGBX", "RGB") else arr[..., :1]
        return np.ascontiguousarray(colour.any(axis=2))
    return np.ascontiguousarray(arr != 0)

