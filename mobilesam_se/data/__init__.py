"""Datasets for segment-everything training: each image with all its object masks.

Layouts: `FolderDataset` (image/ + mask/<id>/), `CocoDataset`, `SA1BDataset`, and
`SyntheticDataset` (generated scenes in the folder layout). All return `Sample`s; batch them
into a `Batch` with `collate_samples`. Bad data raises `DatasetError` (or is skipped with on_error="skip");
`check_dataset` / `python -m mobilesam_se.data.check` list every problem at once.
"""
from mobilesam_se.data.base import MaskDataset
from mobilesam_se.data.check import check_dataset
from mobilesam_se.data.coco import CocoDataset
from mobilesam_se.data.errors import DatasetError, Problem
from mobilesam_se.data.folder import FolderDataset
from mobilesam_se.data.folder_writer import write_folder_sample
from mobilesam_se.data.sa1b import SA1BDataset
from mobilesam_se.data.sample import Batch, Sample, collate_samples
from mobilesam_se.data.synthetic import (
    SyntheticDataset,
    default_synthetic_dir,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
)
from mobilesam_se.data.targets import lowres_size, lowres_targets

__all__ = [
    "Batch",
    "CocoDataset",
    "DatasetError",
    "FolderDataset",
    "MaskDataset",
    "Problem",
    "SA1BDataset",
    "Sample",
    "SyntheticDataset",
    "check_dataset",
    "collate_samples",
    "default_synthetic_dir",
    "ensure_synthetic_dataset",
    "generate_synthetic_dataset",
    "lowres_size",
    "lowres_targets",
    "write_folder_sample",
]
