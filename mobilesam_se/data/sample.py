"""What every dataset returns for one image, and how a batch of them is assembled."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

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
    - coverage_lowres: (K, S/4, S/4) float32, the share of each low-res cell each object covers
      (`masks_lowres` is coverage >= 0.5), or None: only datasets built with `soft_targets=True`
      return it; the mask losses then take it as a soft target.
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
    coverage_lowres: Optional[torch.Tensor] = None

    @property
    def num_masks(self) -> int:
        return int(self.masks.shape[0])


@dataclass
class Batch:
    """Samples collated for a DataLoader (`collate_samples`): the fields every image has at the same
    size are stacked, the others are per-image lists of length B (K masks differ between images).

    A part builds its own batch for a test with the fields it reads; the rest stay empty.
    """

    image: torch.Tensor  # (B, 3, S, S)
    points: Optional[torch.Tensor] = None  # (B, P, 2) grid prompts, the model's input frame
    image_id: List[str] = field(default_factory=list)
    file_name: List[str] = field(default_factory=list)
    orig_size: List[Tuple[int, int]] = field(default_factory=list)
    input_size: List[Tuple[int, int]] = field(default_factory=list)
    masks: List[torch.Tensor] = field(default_factory=list)  # (K, H, W) bool, full resolution
    masks_lowres: List[torch.Tensor] = field(default_factory=list)  # (K, S/4, S/4) bool
    image_uint8: List[Optional[np.ndarray]] = field(default_factory=list)
    ignore_lowres: List[Optional[torch.Tensor]] = field(default_factory=list)
    coverage_lowres: List[Optional[torch.Tensor]] = field(default_factory=list)  # (K, S/4, S/4) float32 or None

    def __len__(self) -> int:
        return int(self.image.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        """A copy whose training tensors (image, points, masks_lowres, ignore_lowres, coverage_lowres)
        are on `device`.

        The full-resolution masks stay where they are: only evaluation reads them, an image at a
        time, and a batch of them would take device memory for nothing. A tensor already on
        `device` is kept as it is (the same object), so parts can recognise the batch's image.
        """
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return dataclasses.replace(
            self, image=move(self.image), points=move(self.points),
            masks_lowres=[move(m) for m in self.masks_lowres], ignore_lowres=[move(m) for m in self.ignore_lowres],
            coverage_lowres=[move(m) for m in self.coverage_lowres],
        )


# Fields whose size is the same for every image of a batch; the rest stay per-image lists.
_STACKED = ("image", "points")
_LISTED = ("image_id", "file_name", "orig_size", "input_size", "masks", "masks_lowres", "image_uint8", "ignore_lowres",
           "coverage_lowres")


def collate_samples(samples: Sequence[Sample]) -> Batch:
    """Batch samples for a DataLoader: `image` (B,3,S,S) and `points` (B,P,2) are stacked;
    the per-image fields (K masks differ between images) are kept as lists of length B."""
    if len(samples) == 0:
        raise ValueError("collate_samples needs at least one sample")
    stacked = {name: torch.stack([getattr(s, name) for s in samples]) for name in _STACKED}
    return Batch(**stacked, **{name: [getattr(s, name) for s in samples] for name in _LISTED})


__all__: List[str] = ["Batch", "Sample", "collate_samples"]
