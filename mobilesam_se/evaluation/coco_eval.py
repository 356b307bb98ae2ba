"""Class-agnostic COCO mask AP / AR with pycocotools, built entirely in memory.

Ground truth and detections are binary masks (or COCO RLEs) per image; every object is one
category ("object"), and `params.useCats = 0` makes the evaluation class-agnostic anyway. Several
named detection sets (e.g. the raw candidates and the AMG-filtered masks) can be scored against
the same ground truth.

    ev = CocoMaskEval(max_dets=(10, 100, 1000))
    iid = ev.add_image((H, W), gt_masks)              # (K, H, W) bool
    ev.add_detections("raw", iid, masks, scores)      # (N, H, W) bool or a list of RLEs, (N,)
    ev.summarize("raw")  # {'AP': .., 'AP50': .., 'AP75': .., 'AR_10': .., 'AR_100': .., 'AR_1000': .., ...}
"""
from __future__ import annotations

import contextlib
import io
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mobilesam_se.data.rle import _quiet_pycocotools, rle_areas

NAN = float("nan")
CATEGORY_ID = 1
AREAS = ("small", "medium", "large")  # COCOeval's area ranges after "all": < 32^2, 32^2..96^2, > 96^2
MasksOrRles = Union[np.ndarray, torch.Tensor, Sequence[dict]]


def encode_masks(masks: Union[np.ndarray, torch.Tensor], chunk: int = 128) -> List[dict]:
    """(N, H, W) bool -> N compressed COCO RLEs with str counts (JSON-ready).

    pycocotools wants (H, W, N) in Fortran order, which is the memory of a C-order (N, W, H)
    array: the transpose is done by torch (on the masks' device), chunk by chunk, and no
    further copy is made.
    """
    if masks.ndim != 3:
        raise ValueError(f"expected (N, H, W) masks, got shape {tuple(masks.shape)}")
    t = masks.detach() if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks, dtype=bool))
    out: List[dict] = []
    with _quiet_pycocotools():
        for s in range(0, t.shape[0], chunk):
            nwh = t[s : s + chunk].transpose(1, 2).to(torch.uint8).contiguous().cpu().numpy()
            for rle in mask_utils.encode(nwh.transpose(2, 1, 0)):  # (H, W, n), Fortran-contiguous
                out.append({"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")})
    return out


def _as_rles(masks: MasksOrRles, hw: Tuple[int, int]) -> List[dict]:
    if isinstance(masks, (np.ndarray, torch.Tensor)):
        if masks.shape[0] == 0:
            return []
        if tuple(masks.shape[1:]) != tuple(hw):
            raise ValueError(f"masks of size {tuple(masks.shape[1:])} for an image of size {tuple(hw)}")
        return encode_masks(masks)
    rles = []
    for r in masks:
        if isinstance(r, np.ndarray):  # a binary mask inside a list (AMG output_mode="binary_mask")
            rles.extend(_as_rles(r[None], hw))
            continue
        if [int(v) for v in r["size"]] != [int(hw[0]), int(hw[1])]:
            raise ValueError(f"an RLE of size {r['size']} for an image of size {list(hw)}")
        counts = r["counts"]
        rles.append({"size": [int(v) for v in r["size"]], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts})
    return rles


def _annotations(rles: List[dict], first_id: int, image_id: int, scores: Optional[Sequence[float]] = None) -> List[dict]:
    """COCO annotations (area and box measured on the RLEs, in one call each)."""
    if not rles:
        return []
    with _quiet_pycocotools():
        areas = rle_areas(rles).tolist()
        boxes = mask_utils.toBbox(rles).tolist()
    anns = []
    for k, (rle, area, box) in enumerate(zip(rles, areas, boxes)):
        ann = {"id": first_id + k, "image_id": image_id, "category_id": CATEGORY_ID, "segmentation": rle,
               "area": float(area), "bbox": [float(v) for v in box], "iscrowd": 0}
        if scores is not None:
            ann["score"] = float(scores[k])
        anns.append(ann)
    return anns


def _coco(images: List[dict], annotations: List[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": CATEGORY_ID, "name": "object"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoMaskEval:
    """Accumulates ground truth and named detection sets image by image; `summarize` scores a set."""

    def __init__(self, max_dets: Sequence[int] = (10, 100, 1000)) -> None:
        if len(max_dets) == 0 or any(int(m) < 1 for m in max_dets):
            raise ValueError(f"max_dets must be positive integers, got {list(max_dets)}")
        self.max_dets = sorted(int(m) for m in max_dets)
        self.images: List[dict] = []
        self.gt: List[dict] = []
        self.dets: Dict[str, List[dict]] = {}

    @property
    def num_images(self) -> int:
        return len(self.images)

    def add_image(self, hw: Tuple[int, int], gt_masks: MasksOrRles, image_id: Optional[int] = None) -> int:
        """Register an image and its ground-truth masks; returns its COCO image id."""
        image_id = len(self.images) + 1 if image_id is None else int(image_id)
        h, w = int(hw[0]), int(hw[1])
        self.images.append({"id": image_id, "height": h, "width": w})
        self.gt += _annotations(_as_rles(gt_masks, (h, w)), len(self.gt) + 1, image_id)
        return image_id

    def add_detections(self, name: str, image_id: int, masks: MasksOrRles, scores: Sequence[float]) -> int:
        """Detections of set `name` for one image; only the best max(max_dets) by score are kept
        (COCOeval would drop the rest). Returns how many were kept."""
        image = next((im for im in reversed(self.images) if im["id"] == image_id), None)
        if image is None:
            raise KeyError(f"image {image_id} was not registered with add_image")
        if isinstance(scores, torch.Tensor):
            scores = scores.detach().float().cpu().numpy()
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        n = len(masks)
        if n != len(scores):
            raise ValueError(f"{n} masks but {len(scores)} scores")
        order = np.argsort(-scores, kind="stable")[: self.max_dets[-1]]
        if isinstance(masks, (np.ndarray, torch.Tensor)):
            picked: MasksOrRles = masks[torch.as_tensor(order) if isinstance(masks, torch.Tensor) else order]
        else:
            picked = [masks[i] for i in order]
        rles = _as_rles(picked, (image["height"], image["width"]))
        bucket = self.dets.setdefault(name, [])
        bucket += _annotations(rles, len(bucket) + 1, image_id, scores[order].tolist())
        return len(rles)

    def summarize(self, name: str) -> Dict[str, float]:
        """AP (IoU .50:.95), AP50, AP75 at the largest maxDets; AR_m (AR@m) for each m of max_dets; AR of
        the largest maxDets by object size. NaN where undefined (no ground truth)."""
        dets = self.dets.get(name, [])
        out: Dict[str, float] = {"num_dets": float(len(dets))}
        if not self.images:
            return out | {k: NAN for k in self.metric_names()}
        with _quiet_pycocotools(), contextlib.redirect_stdout(io.StringIO()):
            gt = _coco(self.images, self.gt)
            dt = _coco(self.images, dets)
            ev = COCOeval(gt, dt, iouType="segm")
            ev.params.useCats = 0
            ev.params.maxDets = list(self.max_dets)
            ev.params.imgIds = sorted(im["id"] for im in self.images)
            ev.evaluate()
            ev.accumulate()
        precision = ev.eval["precision"]  # (T, R, K, A, M)
        recall = ev.eval["recall"]  # (T, K, A, M)
        thrs = ev.params.iouThrs

        def mean_valid(x: np.ndarray) -> float:
            x = x[x > -1]
            return float(x.mean()) if x.size else NAN

        def at(t: float) -> int:
            return int(np.argmin(np.abs(thrs - t)))

        out["AP"] = mean_valid(precision[:, :, :, 0, -1])
        out["AP50"] = mean_valid(precision[at(0.5), :, :, 0, -1])
        out["AP75"] = mean_valid(precision[at(0.75), :, :, 0, -1])
        for m, md in enumerate(self.max_dets):
            out[f"AR_{md}"] = mean_valid(recall[:, :, 0, m])
        for a, area in enumerate(AREAS, start=1):
            out[f"AR_{self.max_dets[-1]}_{area}"] = mean_valid(recall[:, :, a, -1])
        return out

    def metric_names(self) -> List[str]:
        names = ["AP", "AP50", "AP75"] + [f"AR_{m}" for m in self.max_dets]
        return names + [f"AR_{self.max_dets[-1]}_{a}" for a in AREAS]
