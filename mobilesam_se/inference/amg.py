"""Segment everything: SAM's automatic mask generator (AMG), with the same records, made cheaper.

`EverythingGenerator(model, ...).generate(image)` returns what `SamAutomaticMaskGenerator.generate`
returns for the same weights and parameters: one record per mask with `segmentation` (COCO RLE),
`area`, `bbox` (XYWH), `predicted_iou`, `stability_score`, `point_coords` and `crop_box` (XYWH).

The semantics are the reference's, step for step:
  crops (the image, then 2^i x 2^i overlapping crops per layer i) -> per crop one embedding and a
  point grid -> 3 masks per point -> keep predicted IoU > pred_iou_thresh -> stability score on the
  logits upsampled to the crop (bilinear to S x S, cut to the resized input, bilinear to the crop
  size), keep >= stability_score_thresh -> binarise at 0, boxes -> drop boxes near a crop edge that
  is not an image edge -> box NMS within the crop (by predicted IoU) -> box NMS across crops
  (preferring smaller crops) -> optional small-region clean-up (holes, then islands, then NMS).

What differs is the order of the work, never its result:
  * the predicted-IoU filter runs on the scores before any upsampling, so only its survivors are
    upsampled (the reference upsamples every candidate of a batch to full size first);
  * the first upsampling computes only the S x S region that survives the cut to the resized
    input (`upsample_bilinear2d` with the S/low-res scale and a smaller output: bit-identical to
    upsampling to S x S and slicing), in chunks bounded in memory;
  * masks are run-length encoded by pycocotools (C) straight from the binary masks, in the crop's
    frame, and only the final masks of smaller crops are re-encoded in the image frame;
  * NMS runs on the model's device (torchvision).
The decoder is the model's batched `predict_grid`, with the crop's embedding computed once.

`hierarchical=True` (not in the reference) first runs every `hierarchical_stride`-th grid point in
each direction, then only those remaining grid points that no confident mask (one that passed every
filter) covers. It is faster and usually finds most of the same masks, but it is an approximation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_area

from mobilesam_se.inference import rle as rle_utils
from mobilesam_se.prompts import build_point_grid
from mobilesam_se.transforms import apply_coords, preprocess_shape

OUTPUT_MODES = ("coco_rle", "binary_mask", "uncompressed_rle")


# -- geometry shared with the reference ------------------------------------------------------------
def layer_point_grids(points_per_side: int, crop_n_layers: int, downscale: int) -> List[np.ndarray]:
    """Normalised grids per crop layer: layer i has int(points_per_side / downscale**i) per side."""
    return [build_point_grid(int(points_per_side / (downscale**i))) for i in range(crop_n_layers + 1)]


def crop_boxes(im_hw: Tuple[int, int], n_layers: int, overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
    """XYXY crop boxes and their layer: the whole image, then (2^(i+1))^2 overlapping crops for layer i+1."""
    im_h, im_w = im_hw
    short = min(im_h, im_w)
    boxes: List[List[int]] = [[0, 0, im_w, im_h]]
    layers = [0]
    for i in range(n_layers):
        n = 2 ** (i + 1)
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = int(math.ceil((overlap * (n - 1) + im_w) / n))
        crop_h = int(math.ceil((overlap * (n - 1) + im_h) / n))
        xs = [int((crop_w - overlap) * k) for k in range(n)]
        ys = [int((crop_h - overlap) * k) for k in range(n)]
        for x0, y0 in product(xs, ys):  # x outer, y inner: the reference's order
            boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layers.append(i + 1)
    return boxes, layers


def upsample_logits(low_res: torch.Tensor, input_hw: Tuple[int, int], crop_hw: Tuple[int, int], image_size: int) -> torch.Tensor:
    """(k, s, s) low-res logits -> (k, h, w) logits at the crop size, exactly as SAM's postprocessing.

    SAM upsamples to S x S, slices the resized input (ih, iw) and resizes to (h, w). Asking
    `upsample_bilinear2d` for only (ih, iw) outputs with the same S/s scale computes the same
    source coordinates and weights for each of them, so the values are bit-identical, without the
    padding rows and columns.
    """
    s = low_res.shape[-1]
    scale = image_size / s
    x = torch.ops.aten.upsample_bilinear2d.default(low_res[:, None], list(input_hw), False, scale, scale)
    x = F.interpolate(x, crop_hw, mode="bilinear", align_corners=False)
    return x[:, 0]


def near_crop_edge(boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0) -> torch.Tensor:
    """Boxes (crop frame) within atol of a crop edge that is not also an image edge."""
    crop = torch.as_tensor(crop_box, dtype=torch.float, device=boxes.device)
    orig = torch.as_tensor(orig_box, dtype=torch.float, device=boxes.device)
    offset = torch.as_tensor([crop_box[0], crop_box[1], crop_box[0], crop_box[1]], device=boxes.device)
    b = (boxes + offset).float()
    at_crop = (b - crop[None]).abs() <= atol
    at_image = (b - orig[None]).abs() <= atol
    return (at_crop & ~at_image).any(dim=1)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes (mode 'holes') or drop islands ('islands') smaller than area_thresh; (mask, changed)."""
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    work = (mask ^ holes).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(work, connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    if holes:
        fill = [0] + small  # background of the inverted mask, plus the small holes
    else:
        fill = [i for i in range(1, n) if i not in set(small)]
        if not fill:  # every island is small: keep the largest
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, fill), True


# -- candidates -----------------------------------------------------------------------------------
@dataclass
class _Masks:
    """Masks of one crop (crop frame until `uncropped`)."""

    rles: List[Dict[str, Any]] = field(default_factory=list)
    boxes: List[torch.Tensor] = field(default_factory=list)  # chunks of (k, 4) int64
    iou: List[torch.Tensor] = field(default_factory=list)
    stability: List[torch.Tensor] = field(default_factory=list)
    points: List[np.ndarray] = field(default_factory=list)  # chunks of (k, 2) float64

    def add(self, rles, boxes, iou, stability, points) -> None:
        self.rles += rles
        self.boxes.append(boxes)
        self.iou.append(iou)
        self.stability.append(stability)
        self.points.append(points)


@dataclass
class MaskSet:
    """Flat masks with their data, in the image frame."""

    rles: List[Dict[str, Any]]
    boxes: torch.Tensor  # (k, 4) int64 XYXY
    iou: torch.Tensor  # (k,)
    stability: torch.Tensor  # (k,)
    points: np.ndarray  # (k, 2) float64 xy
    crop_boxes: torch.Tensor  # (k, 4) int64 XYXY

    def __len__(self) -> int:
        return len(self.rles)

    def select(self, keep: torch.Tensor) -> "MaskSet":
        idx = keep.detach().cpu().long()
        return MaskSet(
            rles=[self.rles[i] for i in idx.tolist()],
            boxes=self.boxes[keep],
            iou=self.iou[keep],
            stability=self.stability[keep],
            points=self.points[idx.numpy()],
            crop_boxes=self.crop_boxes[keep],
        )

    @staticmethod
    def cat(sets: Sequence["MaskSet"], device: torch.device) -> "MaskSet":
        return MaskSet(
            rles=[r for s in sets for r in s.rles],
            boxes=torch.cat([s.boxes for s in sets]) if sets else torch.zeros(0, 4, dtype=torch.long, device=device),
            iou=torch.cat([s.iou for s in sets]) if sets else torch.zeros(0, device=device),
            stability=torch.cat([s.stability for s in sets]) if sets else torch.zeros(0, device=device),
            points=np.concatenate([s.points for s in sets]) if sets else np.zeros((0, 2)),
            crop_boxes=torch.cat([s.crop_boxes for s in sets]) if sets else torch.zeros(0, 4, dtype=torch.long, device=device),
        )


class EverythingGenerator:
    """SAM's automatic mask generator over our `SamModel` (same parameters, same records)."""

    def __init__(
        self,
        model,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        min_mask_region_area: int = 0,
        output_mode: str = "coco_rle",
        hierarchical: bool = False,
        hierarchical_stride: int = 2,
        point_grids: Optional[List[np.ndarray]] = None,
        mask_threshold: float = 0.0,
        upsample_chunk_elems: int = 1 << 24,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if hierarchical and hierarchical_stride < 2:
            raise ValueError(f"hierarchical_stride must be >= 2, got {hierarchical_stride}")
        self.model = model
        if point_grids is not None:
            if len(point_grids) != crop_n_layers + 1:
                raise ValueError(f"point_grids needs one grid per crop layer ({crop_n_layers + 1}), got {len(point_grids)}")
            self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
        else:
            if points_per_side < 1:
                raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
            self.point_grids = layer_point_grids(points_per_side, crop_n_layers, crop_n_points_downscale_factor)
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.box_nms_thresh = box_nms_thresh
        self.crop_n_layers = crop_n_layers
        self.crop_nms_thresh = crop_nms_thresh
        self.crop_overlap_ratio = crop_overlap_ratio
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self.hierarchical = hierarchical
        self.hierarchical_stride = hierarchical_stride
        self.mask_threshold = mask_threshold
        self.upsample_chunk_elems = upsample_chunk_elems
        self.stats: Dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- public ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks of an HxWx3 uint8 RGB image, as a list of SAM AMG records."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
        masks = self.generate_masks(image)
        return self.records(masks)

    @torch.inference_mode()
    def generate_masks(self, image: np.ndarray) -> MaskSet:
        """The final masks (image frame) before they are turned into records."""
        self.stats = {"points_total": 0, "points_decoded": 0, "upsampled": 0, "candidates": 0}
        orig_hw = image.shape[:2]
        boxes, layers = crop_boxes(orig_hw, self.crop_n_layers, self.crop_overlap_ratio)
        per_crop = [self._process_crop(image, box, layer, orig_hw) for box, layer in zip(boxes, layers)]
        data = MaskSet.cat(per_crop, self.device)
        if len(boxes) > 1 and len(data):
            scores = 1 / box_area(data.crop_boxes).float()  # prefer masks from smaller crops
            keep = batched_nms(data.boxes.float(), scores, torch.zeros_like(data.boxes[:, 0]), self.crop_nms_thresh)
            data = data.select(keep)
        # Masks from smaller crops go into the image frame only now that NMS has kept them.
        data.rles = [rle_utils.uncrop(r, cb, orig_hw) for r, cb in zip(data.rles, data.crop_boxes.tolist())]
        if self.min_mask_region_area > 0 and len(data):
            data = self._clean_small_regions(data, max(self.box_nms_thresh, self.crop_nms_thresh))
        return data

    def records(self, data: MaskSet) -> List[Dict[str, Any]]:
        out = []
        boxes = data.boxes.tolist()
        crops = data.crop_boxes.tolist()
        ious = data.iou.tolist()
        stabs = data.stability.tolist()
        for i, r in enumerate(data.rles):
            if self.output_mode == "coco_rle":
                seg: Any = {"size": list(r["size"]), "counts": r["counts"]}
            elif self.output_mode == "binary_mask":
                seg = rle_utils.decode(r)
            else:
                seg = rle_utils.to_uncompressed(rle_utils.decode(r))
            x0, y0, x1, y1 = boxes[i]
            c0, c1, c2, c3 = crops[i]
            out.append(
                {
                    "segmentation": seg,
                    "area": rle_utils.area(r),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "predicted_iou": ious[i],
                    "point_coords": [data.points[i].tolist()],
                    "stability_score": stabs[i],
                    "crop_box": [c0, c1, c2 - c0, c3 - c1],
                }
            )
        return out

    # -- one crop --------------------------------------------------------------------------------
    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer: int, orig_hw: Tuple[int, int]) -> MaskSet:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1, :])
        crop_hw = crop.shape[:2]
        S = self.model.image_size
        embedding = self.model.encode(self.model.preprocess([crop]))
        grid = self.point_grids[layer]
        points = grid * np.array(crop_hw)[None, ::-1]  # crop pixels, float64 (as the reference)
        ctx = dict(embedding=embedding, crop_hw=crop_hw, input_hw=preprocess_shape(*crop_hw, S), crop_box=crop_box, orig_hw=orig_hw)
        found = _Masks()
        self.stats["points_total"] += len(points)
        if not self.hierarchical:
            self._run_points(points, found, ctx)
        else:
            side = int(round(math.sqrt(len(grid))))
            if side * side != len(grid):
                raise ValueError("hierarchical mode needs square point grids")
            r, c = np.divmod(np.arange(len(grid)), side)
            coarse = (r % self.hierarchical_stride == 0) & (c % self.hierarchical_stride == 0)
            union = torch.zeros(crop_hw, dtype=torch.bool, device=self.device)
            self._run_points(points[coarse], found, ctx, union)
            rest = points[~coarse]
            if len(rest):
                yy = np.clip(rest[:, 1].astype(np.int64), 0, crop_hw[0] - 1)
                xx = np.clip(rest[:, 0].astype(np.int64), 0, crop_hw[1] - 1)
                covered = union.cpu().numpy()[yy, xx]
                self._run_points(rest[~covered], found, ctx)

        device = self.device
        if found.rles:
            data = MaskSet(
                rles=found.rles,
                boxes=torch.cat(found.boxes),
                iou=torch.cat(found.iou),
                stability=torch.cat(found.stability),
                points=np.concatenate(found.points),
                crop_boxes=torch.zeros(len(found.rles), 4, dtype=torch.long, device=device),  # set below
            )
            keep = batched_nms(data.boxes.float(), data.iou, torch.zeros_like(data.boxes[:, 0]), self.box_nms_thresh)
            data = data.select(keep)
        else:
            data = MaskSet.cat([], device)
        offset = torch.tensor([[x0, y0, x0, y0]], device=device)
        data.boxes = data.boxes + offset
        data.points = data.points + np.array([[x0, y0]], dtype=np.float64)
        data.crop_boxes = torch.tensor([crop_box], dtype=torch.long, device=device).repeat(len(data), 1)
        return data

    def _run_points(self, points: np.ndarray, found: _Masks, ctx: Dict[str, Any], union: Optional[torch.Tensor] = None) -> None:
        """Decode `points` (crop pixels) in batches and add the masks that pass every filter."""
        S = self.model.image_size
        model_points = torch.as_tensor(apply_coords(points, ctx["crop_hw"], S), dtype=torch.float32, device=self.device)
        for s in range(0, len(points), self.points_per_batch):
            pts = model_points[s : s + self.points_per_batch]
            out = self.model.predict_grid(ctx["embedding"], pts[None], multimask_output=True, points_per_batch=self.points_per_batch)
            self.stats["points_decoded"] += len(pts)
            low = out.masks[0].flatten(0, 1)  # (n * M, s, s): point-major, as the reference
            iou = out.iou_pred[0].flatten(0, 1).float()
            m = out.masks.shape[2]
            point_idx = torch.arange(s, s + len(pts), device=self.device).repeat_interleave(m)
            if self.pred_iou_thresh > 0.0:
                keep = iou > self.pred_iou_thresh
                low, iou, point_idx = low[keep], iou[keep], point_idx[keep]
            self._filter_and_encode(low, iou, point_idx, points, found, ctx, union)

    def _filter_and_encode(self, low, iou, point_idx, points, found: _Masks, ctx, union) -> None:
        crop_hw, input_hw = ctx["crop_hw"], ctx["input_hw"]
        crop_box, (orig_h, orig_w) = ctx["crop_box"], ctx["orig_hw"]
        per_mask = input_hw[0] * input_hw[1] + crop_hw[0] * crop_hw[1]
        step = max(1, self.upsample_chunk_elems // per_mask)
        for s in range(0, len(low), step):
            logits = upsample_logits(low[s : s + step].float(), input_hw, crop_hw, self.model.image_size)
            self.stats["upsampled"] += len(logits)
            hi = (logits > self.mask_threshold + self.stability_score_offset).sum(dim=(1, 2))
            lo = (logits > self.mask_threshold - self.stability_score_offset).sum(dim=(1, 2))
            stability = hi.float() / lo.float()  # 0 / 0 = nan fails the threshold, as in the reference
            keep = torch.ones_like(stability, dtype=torch.bool)
            if self.stability_score_thresh > 0.0:
                keep = stability >= self.stability_score_thresh
            binary = logits[keep] > self.mask_threshold
            del logits
            boxes = rle_utils.mask_boxes(binary)
            sel = torch.nonzero(keep).flatten() + s
            edge = near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
            if edge.any():
                binary, boxes, sel = binary[~edge], boxes[~edge], sel[~edge]
                stability_kept = stability[keep][~edge]
            else:
                stability_kept = stability[keep]
            if len(sel) == 0:
                continue
            if union is not None:
                union |= binary.any(dim=0)
            self.stats["candidates"] += len(sel)
            found.add(
                rle_utils.encode(binary),
                boxes,
                iou[sel],
                stability_kept,
                points[point_idx[sel].cpu().numpy()],
            )

    # -- clean-up --------------------------------------------------------------------------------
    def _clean_small_regions(self, data: MaskSet, nms_thresh: float) -> MaskSet:
        """Fill small holes, drop small islands; NMS prefers masks that needed no change."""
        new_masks, scores = [], []
        for r in data.rles:
            mask = rle_utils.decode(r)
            mask, changed_holes = remove_small_regions(mask, self.min_mask_region_area, "holes")
            mask, changed_islands = remove_small_regions(mask, self.min_mask_region_area, "islands")
            new_masks.append(torch.as_tensor(mask))
            scores.append(0.0 if (changed_holes or changed_islands) else 1.0)
        masks = torch.stack(new_masks)
        boxes = rle_utils.mask_boxes(masks).to(data.boxes.device)
        score_t = torch.as_tensor(scores, device=boxes.device)
        keep = batched_nms(boxes.float(), score_t, torch.zeros_like(boxes[:, 0]), nms_thresh)
        for i in keep.tolist():
            if scores[i] == 0.0:
                data.rles[i] = rle_utils.encode(masks[i][None])[0]
                data.boxes[i] = boxes[i]
        return data.select(keep)
