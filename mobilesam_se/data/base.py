"""The part every dataset shares: options, the index, error handling and Sample assembly.

A subclass only knows its file layout: `_scan()` lists its records cheaply (no decoding) and
`_decode(record)` turns one record into an RGB image and its object masks, raising DatasetError
with every problem it finds for that record.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Dict, Generic, List, NamedTuple, Optional, Sequence, Set, Tuple, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from mobilesam_se.data.errors import DatasetError, Problem
from mobilesam_se.data.sample import Sample
from mobilesam_se.data.targets import largest_indices, lowres_coverage, lowres_targets, lowres_touched
from mobilesam_se.prompts import grid_points_for_model
from mobilesam_se.transforms import preprocess_image, preprocess_shape

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
R = TypeVar("R")  # a record: any dataclass with `image_id: str` and `image_path: Path`


class Decoded(NamedTuple):
    """What `_decode` returns for one record."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (K, H, W) bool, at most `max_masks_per_image`
    ignore: Optional[np.ndarray] = None  # (H, W) bool: crowd regions and objects the cap left out


class MaskDataset(Dataset, Generic[R]):
    """Base of the datasets: returns `Sample`s.

    Options shared by all datasets:
      image_size: side S of the square model input (default 1024).
      grid_points: G, the G*G AMG point prompts per image (default 32).
      max_masks_per_image: keep only the K largest objects (by area) of an image; None keeps all.
        Capping drops the *small* objects, so the model never trains on them.
      on_error: "raise" (default) raises DatasetError naming the bad file; "skip" drops bad samples
        from the index, records them in `skipped` and logs a warning.
      keep_original: also return the original uint8 image (for visualisation).
      soft_targets: also return each object's low-res cell coverage (`Sample.coverage_lowres`), the
        mask losses' soft target: a cell an edge crosses keeps the share the object covers, where
        the >= 0.5 rule of `masks_lowres` moves every edge to a cell boundary.

    With on_error="skip" a sample that fails to decode inside __getitem__ is replaced by the next
    good one (a Dataset cannot shrink mid-epoch); call `validate()` (or `check_dataset`) before
    building the DataLoader to drop all bad samples up front instead.
    """

    def __init__(
        self,
        *,
        image_size: int = 1024,
        grid_points: int = 32,
        max_masks_per_image: Optional[int] = None,
        on_error: str = "raise",
        keep_original: bool = False,
        soft_targets: bool = False,
    ) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.set_image_size(image_size)
        if grid_points < 1:
            raise ValueError(f"grid_points must be >= 1, got {grid_points}")
        if max_masks_per_image is not None and max_masks_per_image < 1:
            raise ValueError(f"max_masks_per_image must be None or >= 1, got {max_masks_per_image}")
        self.grid_points = grid_points
        self.max_masks_per_image = max_masks_per_image
        self.on_error = on_error
        self.keep_original = keep_original
        self.soft_targets = bool(soft_targets)
        self.skipped: List[Problem] = []
        self._bad: Set[int] = set()  # indices that failed to decode (skip mode), pruned by validate()
        records, problems = self._scan()
        if problems:
            if on_error == "raise":
                raise DatasetError(problems)
            self.skipped.extend(problems)
            logger.warning(
                "%s: skipped %d problem(s) while indexing, e.g. %s (see .skipped or run "
                "`python -m mobilesam_se.data.check`)", self.source, len(problems), problems[0],
            )
        self._records: List[R] = records

    def set_image_size(self, image_size: int) -> None:
        """Prepare samples for an S x S model input from the next one on (the trainer's
        low-resolution epochs change it; nothing is cached at the old size)."""
        if image_size <= 0 or image_size % 4:
            raise ValueError(f"image_size must be a positive multiple of 4, got {image_size}")
        self.image_size = int(image_size)

    # ---- subclass interface -------------------------------------------------------------------
    @property
    def source(self) -> str:
        """Where the data lives, for messages."""
        raise NotImplementedError

    def _scan(self) -> Tuple[List[R], List[Problem]]:
        """Good records and the problems found by listing files (no decoding)."""
        raise NotImplementedError

    def _decode(self, record: R) -> Decoded:
        raise NotImplementedError

    # ---- public API ---------------------------------------------------------------------------
    @property
    def ids(self) -> List[str]:
        return [r.image_id for r in self._records]

    @property
    def image_paths(self) -> List[str]:
        return [str(r.image_path) for r in self._records]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:
        n = len(self._records)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            record = self._records[i]
            try:
                decoded = self._decode(record)
            except DatasetError as exc:
                if self.on_error == "raise":
                    raise
                self._mark_bad(i, exc.problems)
                continue
            return self._make_sample(record, decoded.image, decoded.masks, decoded.ignore)
        raise DatasetError(Problem(self.source, "no readable image left; run `python -m mobilesam_se.data.check`"))

    def validate(self, progress: bool = False) -> List[Problem]:
        """Decode every sample and return all problems at once (none: an empty list).

        With on_error="skip" the bad samples are also dropped from the index, and the list holds
        everything skipped so far (indexing problems included).
        """
        bad = self.decode_problems(progress)
        self.drop_bad(bad)
        if self.on_error == "raise":
            return [p for i in sorted(bad) for p in bad[i]]
        return list(self.skipped)

    def decode_problems(self, progress: bool = False) -> Dict[int, List[Problem]]:
        """Decode every indexed sample; index -> its problems, for the samples that have any."""
        bad: Dict[int, List[Problem]] = {}
        indices = [i for i in range(len(self._records)) if i not in self._bad]
        for i in tqdm(indices, desc=f"checking {self.source}", unit="image", disable=not progress):
            try:
                self._decode(self._records[i])
            except DatasetError as exc:
                bad[i] = list(exc.problems)
        return bad

    def drop_bad(self, bad: Dict[int, List[Problem]]) -> None:
        """on_error="skip": drop these samples from the index and record their problems."""
        if self.on_error != "skip":
            return
        for i, problems in bad.items():
            self._mark_bad(i, problems, log=False)
        if not self._bad:  # also those __getitem__ already met
            return
        logger.warning("%s: dropped %d unreadable image(s) from the index", self.source, len(self._bad))
        self._records = [r for i, r in enumerate(self._records) if i not in self._bad]
        self._bad = set()

    def source_files(self) -> List[Path]:
        """Every file decoding reads (the dataset check's cache is keyed by their sizes and times)."""
        files: List[Path] = []
        for record in self._records:
            for f in dataclasses.fields(record):
                value = getattr(record, f.name)
                if isinstance(value, Path):
                    files.append(value)
                elif isinstance(value, tuple) and value and all(isinstance(v, Path) for v in value):
                    files.extend(value)
        return files

    # ---- helpers ------------------------------------------------------------------------------
    def _mark_bad(self, index: int, problems: Sequence[Problem], log: bool = True) -> None:
        self._bad.add(index)
        self.skipped.extend(problems)
        if log:
            for p in problems:
                logger.warning("skipping a bad sample: %s", p)

    def _make_sample(self, record: R, image: np.ndarray, masks: np.ndarray, dropped: Optional[np.ndarray] = None) -> Sample:
        h, w = image.shape[:2]
        assert masks.ndim == 3 and masks.shape[1:] == (h, w), "a subclass returned masks of the wrong size"
        keep = largest_indices(masks.sum(axis=(1, 2)), self.max_masks_per_image)
        if len(keep) < masks.shape[0]:
            rest = np.setdiff1d(np.arange(masks.shape[0]), keep)
            union = masks[rest].any(axis=0)
            dropped = union if dropped is None else (dropped | union)
            masks = masks[keep]
        input_hw = preprocess_shape(h, w, self.image_size)
        coverage = lowres_coverage(masks, input_hw, self.image_size)
        lowres = coverage >= 0.5  # lowres_targets' rule, from the coverage already at hand
        ignore_np = None
        if dropped is not None and dropped.any():
            ignore_np = lowres_targets(dropped[None], input_hw, self.image_size)[0]
        sub_cell = ~lowres.any(axis=(1, 2))
        if sub_cell.any():
            # Too small to own a low-res cell: no target, but a candidate that segments such an
            # object must not be trained as background either. It stays in `masks` (evaluation).
            touched = lowres_touched(masks[sub_cell].any(axis=0), input_hw, self.image_size)
            ignore_np = touched if ignore_np is None else (ignore_np | touched)
        ignore = None if ignore_np is None or not ignore_np.any() else torch.from_numpy(ignore_np)
        return Sample(
            image_id=record.image_id,
            file_name=str(record.image_path),
            image=preprocess_image(image, self.image_size),
            orig_size=(h, w),
            input_size=input_hw,
            masks=torch.from_numpy(np.ascontiguousarray(masks, dtype=bool)),
            masks_lowres=torch.from_numpy(lowres),
            points=grid_points_for_model(self.grid_points, (h, w), self.image_size),
            image_uint8=image if self.keep_original else None,
            ignore_lowres=ignore,
            coverage_lowres=torch.from_numpy(coverage) if self.soft_targets else None,
        )


def stack_masks(masks: Sequence[np.ndarray], hw: Tuple[int, int]) -> np.ndarray:
    """List of (H,W) bool -> (K,H,W) bool, also for K = 0."""
    if len(masks) == 0:
        return np.zeros((0, *hw), dtype=bool)
    return np.stack(masks).astype(bool, copy=False)
