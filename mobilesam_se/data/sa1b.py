"""SA-1B layout: root/<name>.jpg with root/<name>.json holding that image's RLE masks."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Tuple


from mobilesam_se.data.base import Decoded, MaskDataset
from mobilesam_se.data.coco import read_json
from mobilesam_se.data.errors import DatasetError, Problem
from mobilesam_se.data.image_io import is_hidden, load_image_rgb
from mobilesam_se.data.rle import decode_segmentations


@dataclass(frozen=True)
class SA1BRecord:
    image_id: str
    image_path: Path
    json_path: Path


class SA1BDataset(MaskDataset[SA1BRecord]):
    """One JSON per image: {"image": {"file_name", "height", "width", ...},
    "annotations": [{"segmentation": {"size": [h, w], "counts": str}, ...}]}.

    The JSONs are only read when a sample is decoded, keeping indexing to a directory listing.
    """

    def __init__(self, root: str | os.PathLike, **kwargs) -> None:
        self.root = Path(root).expanduser()
        super().__init__(**kwargs)

    @property
    def source(self) -> str:
        return str(self.root)

    def _scan(self) -> Tuple[List[SA1BRecord], List[Problem]]:
        if not self.root.is_dir():
            raise DatasetError(Problem(self.root, "SA-1B folder not found; check the path"))
        problems: List[Problem] = []
        files = {p.name: p for p in self.root.iterdir() if not is_hidden(p)}
        records: List[SA1BRecord] = []
        for name, path in sorted(files.items()):
            suffix = path.suffix.lower()
            if suffix in (".jpg", ".jpeg") and path.is_file():
                json_path = path.with_suffix(".json")
                if json_path.name in files:
                    records.append(SA1BRecord(path.stem, path, json_path))
                else:
                    problems.append(Problem(
                        path, f"no annotation file {json_path.name} next to the image; add it or remove the image"
                    ))
            elif suffix == ".json" and path.is_file():
                if not any(f"{path.stem}{ext}" in files for ext in (".jpg", ".jpeg", ".JPG", ".JPEG")):
                    problems.append(Problem(
                        path, "annotation file without its image <name>.jpg; add the image or remove the file"
                    ))
            else:
                problems.append(Problem(
                    path, "not an SA-1B file (expected only <name>.jpg and <name>.json); move it out of the dataset"
                ))
        return records, problems

    def _decode(self, record: SA1BRecord) -> Decoded:
        data = read_json(record.json_path)
        info: Any = data.get("image") if isinstance(data, dict) else None
        if not isinstance(info, dict) or "height" not in info or "width" not in info:
            raise DatasetError(Problem(
                record.json_path, "no 'image' entry with 'height' and 'width'; not an SA-1B annotation file"
            ))
        hw = (int(info["height"]), int(info["width"]))
        problems: List[Problem] = []
        image = None
        try:
            image = load_image_rgb(record.image_path, expected_hw=hw)
        except DatasetError as exc:
            problems.extend(exc.problems)
        segmentations = []
        for i, ann in enumerate(data.get("annotations") or []):
            ann = ann if isinstance(ann, dict) else {}
            segmentations.append((f"annotation {ann.get('id', i)}", ann.get("segmentation")))
        masks, mask_problems, dropped = decode_segmentations(segmentations, hw, self.max_masks_per_image, record.json_path)
        problems += mask_problems
        if problems:
            raise DatasetError(problems)
        return Decoded(image, masks, dropped)
