"""COCO instances JSON: every non-crowd annotation of an image is one object mask; crowd regions
are ignore regions."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple


from mobilesam_se.data.base import Decoded, MaskDataset
from mobilesam_se.data.errors import DatasetError, Problem
from mobilesam_se.data.image_io import load_image_rgb
from mobilesam_se.data.rle import decode_segmentations


@dataclass(frozen=True)
class CocoRecord:
    image_id: str
    image_path: Path
    hw: Tuple[int, int]
    segmentations: Tuple[Tuple[str, Any], ...]  # (label for messages, COCO segmentation)
    crowd: Tuple[Tuple[str, Any], ...] = ()  # iscrowd annotations: ignore regions, not objects


def read_json(path: Path) -> Any:
    """Parse a JSON file, or raise DatasetError saying why not."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DatasetError(Problem(path, "annotation file not found; check the path"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(Problem(
            path, f"cannot parse JSON ({exc}); the file is corrupt or truncated: re-download or re-export it"
        ))


class CocoDataset(MaskDataset[CocoRecord]):
    """Images of `image_dir` annotated by a COCO instances file.

    Polygons and (compressed or uncompressed) RLE are decoded with pycocotools; `iscrowd`
    annotations are no objects (one mask for a whole crowd) but an ignore region: a candidate that
    segments a person in a crowd is not trained as background. Images without annotations are
    kept with K = 0.
    """

    def __init__(self, image_dir: str | os.PathLike, annotation_file: str | os.PathLike, **kwargs) -> None:
        self.image_dir = Path(image_dir).expanduser()
        self.annotation_file = Path(annotation_file).expanduser()
        super().__init__(**kwargs)

    @property
    def source(self) -> str:
        return str(self.annotation_file)

    def _scan(self) -> Tuple[List[CocoRecord], List[Problem]]:
        if not self.image_dir.is_dir():
            raise DatasetError(Problem(self.image_dir, "image folder not found; check the path"))
        data = read_json(self.annotation_file)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DatasetError(Problem(self.annotation_file, "not a COCO instances file (no 'images' list)"))
        problems: List[Problem] = []
        images: Dict[Any, Dict[str, Any]] = {}
        for i, entry in enumerate(data["images"]):
            keys = ("id", "file_name", "height", "width")
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                problems.append(Problem(self.annotation_file, f"images[{i}] lacks {', '.join(missing)}; fix the entry"))
            else:
                images[entry["id"]] = entry
        per_image: Dict[Any, List[Tuple[str, Any]]] = {k: [] for k in images}
        crowd: Dict[Any, List[Tuple[str, Any]]] = {k: [] for k in images}
        for j, ann in enumerate(data.get("annotations") or []):
            if not isinstance(ann, dict):
                continue
            ann_id = ann.get("id", f"#{j}")
            if ann.get("image_id") not in images:
                problems.append(Problem(
                    self.annotation_file,
                    f"annotation {ann_id} refers to image_id {ann.get('image_id')!r}, which is not in 'images'; "
                    "remove it",
                ))
                continue
            entry = images[ann["image_id"]]
            target = crowd if ann.get("iscrowd", 0) else per_image
            target[ann["image_id"]].append((f"annotation {ann_id} of {entry['file_name']}", ann.get("segmentation")))
        records: List[CocoRecord] = []
        for key, entry in images.items():
            path = self.image_dir / entry["file_name"]
            if not path.is_file():
                problems.append(Problem(
                    path, f"image listed in {self.annotation_file.name} not found; add it or remove its entry"
                ))
                continue
            hw = (int(entry["height"]), int(entry["width"]))
            records.append(CocoRecord(str(key), path, hw, tuple(per_image[key]), tuple(crowd[key])))
        return records, problems

    def source_files(self) -> List[Path]:
        return [self.annotation_file, *super().source_files()]  # the masks come from the JSON

    def _decode(self, record: CocoRecord) -> Decoded:
        problems: List[Problem] = []
        image = None
        try:
            image = load_image_rgb(record.image_path, expected_hw=record.hw)
        except DatasetError as exc:
            problems.extend(exc.problems)
        masks, mask_problems, dropped = decode_segmentations(
            record.segmentations, record.hw, self.max_masks_per_image, self.annotation_file
        )
        problems += mask_problems
        if record.crowd:
            crowd, crowd_problems, _ = decode_segmentations(record.crowd, record.hw, None, self.annotation_file)
            problems += crowd_problems
            if crowd.shape[0]:
                union = crowd.any(axis=0)
                dropped = union if dropped is None else (dropped | union)
        if problems:
            raise DatasetError(problems)
        return Decoded(image, masks, dropped)
