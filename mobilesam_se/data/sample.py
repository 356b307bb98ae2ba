"""What every dataset returns for one image, and how a batch of them is assembled."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class Sample:
    """One training/evaluation image with all its object masks.

    - image: (3, S, S) float32, SAM-normalised and zero-padded (`transforms.preprocess_image`).
    - orig_size: (H, W) of the original image; input_size: (h', w') after the longest-side resize.
    - masks: (K, H, W) bool at full resolution, for evaluation. K may be 0.
    - masks_lowres: (K, S/4, S/4) bool in the frame of the model's low-res logits: the object
      lies in the top-left (h'/4, w'/4) region, the padding is False.
    - points: (G*G, 2) float32 AMG grid prompts in the resized (model input) frame.
    - image_uint8: the original (H, W, 3) RGB image, only with `keep_original=True`.
    - ignore_lowres: (S/4, S/4) bool union of the objects `max_masks_per_image` left out, of COCO crowd
      regions and of the cells touched by objects too small to own a low-res cell, or None:
      candidates that segment those objects are neither foreground nor background.
    """

    image_id: str
    file_name: str
    image: torch.Tensor
    orig_size: Tuple[int, int]
    input_size: Tuple[int, int]
    masks: torch.Tensor
    masks_lowres: torch.Tensor
    points: torch.Tensor
    image_uint8: Optional[np.ndarray] = None
    ignore_lowres: Optional[torch.Tensor] = None

    @property
    def num_masks(self) -> int:
        return int(self.masks.shape[0])


# Fields whose size is the same for every image of a batch; the rest stay per-image lists.
_STACKED = ("image", "points")
_LISTED = ("image_id", "file_name", "orig_size", "input_size", "masks", "masks_lowres", "image_uint8", "ignore_lowres")


def collate_samples(samples: Sequence[Sample]) -> Dict[str, Any]:
    """Batch samples for a DataLoader: `image` (B,3,S,S) and `points` (B,P,2) are stacked;
    the per-image fields (K masks differ between images) are kept as lists of length B."""
    if len(samples) == 0:
        raise ValueError("collate_samples needs at least one sample")
    batch: Dict[str, Any] = {name: torch.stack([getattr(s, name) for s in samples]) for name in _STACKED}
    for name in _LISTED:
        batch[name] = [getattr(s, name) for s in samples]
    return batch


__all__: List[str] = ["Sample", "collate_samples"]
