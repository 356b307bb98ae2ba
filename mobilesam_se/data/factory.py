"""Build a dataset by kind name, e.g. from a config file."""
from __future__ import annotations

from typing import Any, Dict, Type

from mobilesam_se.data.base import MaskDataset
from mobilesam_se.data.coco import CocoDataset
from mobilesam_se.data.folder import FolderDataset
from mobilesam_se.data.sa1b import SA1BDataset
from mobilesam_se.data.synthetic import SyntheticDataset

DATASETS: Dict[str, Type[MaskDataset]] = {
    "folder": FolderDataset,
    "coco": CocoDataset,
    "sa1b": SA1BDataset,
    "synthetic": SyntheticDataset,
}


def build_dataset(kind: str, **kwargs: Any) -> MaskDataset:
    """`build_dataset("folder", root=..., image_size=1024)`; kwargs go to the dataset class."""
    try:
        cls = DATASETS[kind]
    except KeyError:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {sorted(DATASETS)}") from None
    return cls(**kwargs)
