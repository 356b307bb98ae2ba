"""The folder layout: root/image/<id>.<jpg|jpeg|png> and root/mask/<id>/*.png, one mask per object.

Optional root/empty.txt lists (one per line) ids of images that legitimately have no objects.
An empty mask folder is reported rather than read as "no objects", because it is far more often
a failed export than a deliberate choice.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Set, Tuple

import numpy as np

from mobilesam_se.data.base import Decoded, MaskDataset, stack_masks
from mobilesam_se.data.errors import DatasetError, Problem
from mobilesam_se.data.image_io import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    is_hidden,
    load_binary_mask,
    load_image_rgb,
)

EMPTY_LIST = "empty.txt"


@dataclass(frozen=True)
class FolderRecord:
    image_id: str
    image_path: Path
    mask_paths: Tuple[Path, ...]


def natural_key(path: Path) -> List[object]:
    """Sort obj_2.png before obj_10.png, as a person numbering files expects."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


class FolderDataset(MaskDataset[FolderRecord]):
    """Images of any size/aspect with one binary PNG per object (nonzero = object); see MaskDataset
    for the shared options."""

    def __init__(self, root: str | os.PathLike, **kwargs) -> None:
        self.root = Path(root).expanduser()
        super().__init__(**kwargs)

    @property
    def source(self) -> str:
        return str(self.root)

    # ---- indexing (file lists only) -----------------------------------------------------------
    def _scan(self) -> Tuple[List[FolderRecord], List[Problem]]:
        image_dir, mask_dir = self.root / "image", self.root / "mask"
        if not image_dir.is_dir():
            # Nothing to skip to: the root itself is wrong, whatever on_error says.
            raise DatasetError(
                Problem(image_dir, "no image folder; expected root/image/<id>.jpg|png and root/mask/<id>/*.png")
            )
        problems: List[Problem] = []
        empty_ids = self._read_empty_list(problems)
        images = self._list_images(image_dir, problems)
        records: List[FolderRecord] = []
        for image_id, image_path in images.items():
            record = self._index_one(image_id, image_path, mask_dir / image_id, image_id in empty_ids, problems)
            if record is not None:
                records.append(record)
        problems += self._orphans(mask_dir, images, empty_ids)
        return records, problems

    def _read_empty_list(self, problems: List[Problem]) -> Set[str]:
        path = self.root / EMPTY_LIST
        if not path.exists():
            return set()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(path, f"cannot read ({exc}); write one image id per line as UTF-8 text"))
            return set()
        return {s for s in (line.strip() for line in lines) if s and not s.startswith("#")}

    @staticmethod
    def _list_images(image_dir: Path, problems: List[Problem]) -> Dict[str, Path]:
        images: Dict[str, Path] = {}
        duplicated: Set[str] = set()
        for path in sorted(image_dir.iterdir()):
            if is_hidden(path):
                continue
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
                problems.append(Problem(
                    path, "not an image (image/ may hold only .jpg, .jpeg or .png files); move it out of the dataset"
                ))
            elif path.stem in images:
                duplicated.add(path.stem)
                other = images[path.stem].name
                problems.append(Problem(
                    path, f"another image has the same id {path.stem!r} ({other}); rename or remove one"
                ))
            else:
                images[path.stem] = path
        # Which of the two images the masks belong to is unknowable: drop both.
        return {k: v for k, v in images.items() if k not in duplicated}

    @staticmethod
    def _index_one(
        image_id: str, image_path: Path, folder: Path, listed_empty: bool, problems: List[Problem]
    ) -> FolderRecord | None:
        if not folder.is_dir():
            if listed_empty:
                return FolderRecord(image_id, image_path, ())
            problems.append(Problem(
                image_path,
                f"no mask folder {folder}; add one PNG per object there, "
                f"or list {image_id!r} in {EMPTY_LIST} if the image has no objects",
            ))
            return None
        masks: List[Path] = []
        stray: List[Problem] = []
        for path in sorted(folder.iterdir(), key=natural_key):
            if is_hidden(path):
                continue
            if path.is_file() and path.suffix.lower() in MASK_EXTENSIONS:
                masks.append(path)
            else:
                stray.append(Problem(
                    path,
                    "not a mask (mask/<id>/ may hold only .png files, one per object; JPEG would blur the edges); "
                    "move it out of the dataset",
                ))
        if stray:
            problems.extend(stray)
            return None
        if not masks and not listed_empty:
            problems.append(Problem(
                folder,
                f"mask folder is empty; add one PNG per object, "
                f"or list {image_id!r} in {EMPTY_LIST} if the image really has no objects",
            ))
            return None
        if masks and listed_empty:
            problems.append(Problem(
                folder,
                f"{image_id!r} is listed in {EMPTY_LIST} but has {len(masks)} mask(s); "
                f"remove it from {EMPTY_LIST} or delete the masks",
            ))
            return None
        return FolderRecord(image_id, image_path, tuple(masks))

    def _orphans(self, mask_dir: Path, images: Dict[str, Path], empty_ids: Set[str]) -> List[Problem]:
        problems: List[Problem] = []
        # Every image stem, duplicated ids included: those are reported already, not as orphans.
        stems = {p.stem for p in (self.root / "image").iterdir()}
        if mask_dir.is_dir():
            for path in sorted(mask_dir.iterdir()):
                if is_hidden(path):
                    continue
                if not path.is_dir():
                    problems.append(Problem(
                        path, "stray file in mask/ (it may hold only folders mask/<id>/); move it out of the dataset"
                    ))
                elif path.name not in stems:
                    problems.append(Problem(
                        path, "mask folder without an image image/<id>.jpg|png; add the image or remove the folder"
                    ))
        for image_id in sorted(empty_ids - images.keys()):
            problems.append(Problem(
                self.root / EMPTY_LIST, f"lists {image_id!r} but there is no image/{image_id}.jpg|png; remove that line"
            ))
        return problems

    # ---- decoding -----------------------------------------------------------------------------
    def _decode(self, record: FolderRecord) -> Decoded:
        problems: List[Problem] = []
        image = None
        try:
            image = load_image_rgb(record.image_path)
        except DatasetError as exc:
            problems.extend(exc.problems)
        masks: List[np.ndarray] = []
        for path in record.mask_paths:
            try:
                mask = load_binary_mask(path)
            except DatasetError as exc:
                problems.extend(exc.problems)
                continue
            problem = self._check_mask(path, mask, image, record.image_path)
            if problem is not None:
                problems.append(problem)
            else:
                masks.append(mask)
        if problems:
            raise DatasetError(problems)
        assert image is not None
        return Decoded(image, stack_masks(masks, image.shape[:2]))

    @staticmethod
    def _check_mask(path: Path, mask: np.ndarray, image: np.ndarray | None, image_path: Path) -> Problem | None:
        if image is not None and mask.shape != image.shape[:2]:
            (mh, mw), (ih, iw) = mask.shape, image.shape[:2]
            hint = ""
            if (mh, mw) == (iw, ih):
                hint = (
                    " (it matches the image rotated by 90 degrees: masks must match the image as displayed, "
                    "after its EXIF orientation)"
                )
            return Problem(
                path,
                f"mask is {mw}x{mh} (WxH) but its image {image_path.name} is {iw}x{ih}{hint}; "
                "re-export the mask at the image's size",
            )
        if not mask.any():
            return Problem(
                path, f"mask is empty (all zero); delete it (list the image id in {EMPTY_LIST} if no object remains)"
            )
        return None
