"""Prompts for ordinary (promptable) fine-tuning: per object, a jittered box or a few points.

Everything here works on the low-res targets `masks_lowres` (K, S/4, S/4), the very masks the
prompted loss is computed against, so a sampled positive point always lies inside the target
the model is asked to reproduce, and objects too small to show up in that frame (which cannot be
learnt from anyway) are never prompted. Prompts are returned in the resized (model input) frame,
where low-res cell (i, j) covers input pixels [4i, 4i + 4) x [4j, 4j + 4).

Sampling runs on the CPU with the trainer's CPU generator, so a step's prompts depend only on the
seed and the step index, not on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from mobilesam_se.data.targets import lowres_size

PROMPT_MODES = ("box", "point", "mixed")
LOWRES_STRIDE = 4  # input pixels per low-res cell


@dataclass
class PromptSampling:
    """How prompts are drawn; mirrors the `dataset.*` keys of the prompted mode."""

    prompt_mode: str = "mixed"  # box | point | mixed (each object draws box or points, 50/50)
    max_objects: int = 16  # objects prompted per image (prompted.objects_per_image)
    min_points: int = 1  # positive points per point-prompted object, drawn uniformly in
    max_points: int = 3  # [min_points, max_points]
    negative_points: int = 0  # negative points per point-prompted object
    max_bbox_shift: int = 20  # each box side moves by up to this many input pixels

    def __post_init__(self) -> None:
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"prompted.prompt_mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if not 1 <= self.min_points <= self.max_points:
            raise ValueError(
                f"need 1 <= prompted.min_points <= prompted.max_points, got {self.min_points}, {self.max_points}"
            )
        if self.negative_points < 0 or self.max_bbox_shift < 0 or self.max_objects < 1:
            raise ValueError("prompted.negative_points and prompted.max_bbox_shift must be >= 0, "
                             "prompted.objects_per_image >= 1")

    @property
    def points_per_prompt(self) -> int:
        """K: the point axis every point prompt is padded to (label -1)."""
        return self.max_points + self.negative_points


@dataclass
class ObjectPrompts:
    """Prompts of the N sampled objects of one image (all in the resized input frame).

    A box-prompted object has all point labels -1; a point-prompted one has a meaningless box.
    """

    index: Tensor  # (N,) long: rows of the image's masks
    coords: Tensor  # (N, K, 2) float xy; padding rows are (0, 0)
    labels: Tensor  # (N, K) long: 1 positive, 0 negative, -1 padding
    boxes: Tensor  # (N, 4) float XYXY
    use_box: Tensor  # (N,) bool

    def __len__(self) -> int:
        return int(self.index.shape[0])


def _cell_centres(cells: Tensor) -> Tensor:
    """(n, 2) low-res (row, col) -> (n, 2) xy of the cell centres in the input frame.

    The prompt encoder reads a coordinate x as the pixel whose centre is x + 0.5, so the centre of
    a 4-pixel cell starting at 4j is 4j + 1.5.
    """
    return cells.flip(-1).float() * LOWRES_STRIDE + (LOWRES_STRIDE - 1) / 2


def _pick(n: int, k: int, generator: torch.Generator) -> Tensor:
    """k indices in [0, n): without replacement when there are enough, else with."""
    if n >= k:
        return torch.randperm(n, generator=generator)[:k]
    return torch.randint(n, (k,), generator=generator)


def mask_box(mask: Tensor) -> Tensor:
    """(h, w) non-empty low-res mask -> (4,) XYXY box in the input frame, edges of the outer cells."""
    rows = torch.nonzero(mask.any(1)).flatten()
    cols = torch.nonzero(mask.any(0)).flatten()
    box = torch.stack([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]).float()
    return box * LOWRES_STRIDE


def jitter_box(box: Tensor, max_shift: int, input_hw: Tuple[int, int], generator: torch.Generator) -> Tensor:
    """Move each side by an independent integer in [-max_shift, max_shift], clamp to the image.

    If the two sides of an axis cross (a box smaller than the shift), they are swapped: each side
    still lies within max_shift of one of the true sides, and the box stays a valid XYXY.
    """
    if max_shift > 0:
        box = box + torch.randint(-max_shift, max_shift + 1, (4,), generator=generator).float()
    h, w = input_hw
    box = torch.stack([box[0].clamp(0, w), box[1].clamp(0, h), box[2].clamp(0, w), box[3].clamp(0, h)])
    x0, x1 = torch.minimum(box[0], box[2]), torch.maximum(box[0], box[2])
    y0, y1 = torch.minimum(box[1], box[3]), torch.maximum(box[1], box[3])
    return torch.stack([x0, y0, x1, y1])


def sample_prompts(
    masks_lowres: Tensor,
    input_hw: Tuple[int, int],
    image_size: int,
    cfg: PromptSampling,
    generator: torch.Generator,
) -> ObjectPrompts:
    """Choose up to `cfg.max_objects` visible objects of one image and draw a prompt for each.

    masks_lowres (K, S/4, S/4) bool; input_hw is (h', w') after the resize. Point prompts get
    between min_points and max_points positives at cells inside the object and `negative_points`
    negatives at image cells outside it, then -1 padding up to K = max_points + negative_points.
    """
    masks = masks_lowres.detach().to("cpu", torch.bool)
    visible = torch.nonzero(masks.flatten(1).any(1)).flatten()
    chosen = visible[torch.randperm(len(visible), generator=generator)[: cfg.max_objects].sort().values]
    n, k = len(chosen), cfg.points_per_prompt
    coords = torch.zeros(n, k, 2)
    labels = torch.full((n, k), -1, dtype=torch.long)
    boxes = torch.zeros(n, 4)
    if cfg.prompt_mode == "box":
        use_box = torch.ones(n, dtype=torch.bool)
    elif cfg.prompt_mode == "point":
        use_box = torch.zeros(n, dtype=torch.bool)
    else:
        use_box = torch.rand(n, generator=generator) < 0.5
    # Negatives may fall anywhere in the image region of the low-res frame, never in the padding.
    h4, w4 = lowres_size(input_hw, image_size)
    image_area = torch.zeros_like(masks[0])
    image_area[:h4, :w4] = True
    for row, obj in enumerate(chosen.tolist()):
        mask = masks[obj]
        if use_box[row]:
            boxes[row] = jitter_box(mask_box(mask), cfg.max_bbox_shift, input_hw, generator)
            continue
        inside = torch.nonzero(mask)
        n_pos = int(torch.randint(cfg.min_points, cfg.max_points + 1, (1,), generator=generator))
        pos = inside[_pick(len(inside), n_pos, generator)]
        coords[row, :n_pos] = _cell_centres(pos)
        labels[row, :n_pos] = 1
        outside = torch.nonzero(image_area & ~mask)
        n_neg = min(cfg.negative_points, len(outside))  # an object covering the image has no outside
        if n_neg:
            neg = outside[_pick(len(outside), n_neg, generator)]
            coords[row, n_pos : n_pos + n_neg] = _cell_centres(neg)
            labels[row, n_pos : n_pos + n_neg] = 0
    return ObjectPrompts(index=chosen, coords=coords, labels=labels, boxes=boxes, use_box=use_box)
