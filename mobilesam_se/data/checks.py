"""Fail-fast dataset check for training scripts."""
from __future__ import annotations

from typing import List

from mobilesam_se.data.base import MaskDataset
from mobilesam_se.data.errors import Problem


def check_dataset(dataset: MaskDataset, progress: bool = False) -> List[Problem]:
    """Decode every sample once and return all problems (an empty list: the data is fine).

    Call it before the first training step, not after an hour of training. With on_error="skip"
    the bad samples are dropped from the index as a side effect (build the DataLoader after).
    Typical use: `if problems := check_dataset(ds): raise DatasetError(problems)`.
    """
    return dataset.validate(progress=progress)
