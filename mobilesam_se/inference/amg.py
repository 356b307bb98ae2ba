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
  * everything up to the last NMS runs on the model's device, batched: thresholds, stability,
    boxes, crop-edge test, box NMS (torchvision), the crop-layer merge, and the run lengths of the
    kept masks (`rle.rle_counts`, in the image frame, per upsampling chunk, not per mask). The
    image's masks then cross to the host once (`MaskSet.to_host`), where pycocotools' C encoder
    turns the run lengths into COCO strings. On a GPU the point batches' logits also stay on the
    device until all are decoded, so no host sync happens per point batch.
The decoder is the model's batched `predict_grid`, with the crop's embedding computed once.

`hierarchical=True` (not in the reference) first runs every `hierarchical_stride`-th grid point in
each direction, then only those remaining grid points that no confident mask (one that passed every
filter) covers. It is faster and usually finds most of the same masks, but it is an approximation.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import product
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, box_area

from mobilesam_se.inference import rle as rle_utils
from mobilesam_se.precision import autocast, cpu_has_fast_bf16
from mobilesam_se.prompts import build_point_grid
from mobilesam_se.transforms import apply_coords, preprocess_shape

OUTPUT_MODES = ("coco_rle", "binary_mask", "uncompressed_rle")
# Model precision: fp32 is the exact mode (the reference's masks); bf16 autocasts encoder and decoder
# (opt-in: faster on GPUs and on CPUs with bf16 matmuls, masks move a little). Filters stay fp32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
# Upsampled logits per chunk (elements); None picks by device: small on the CPU (cache, heap reuse),
# large on a GPU (fewer, bigger kernels; each chunk costs a host sync for its filters).
CPU_UPSAMPLE_ELEMS = 1 << 24
DEVICE_UPSAMPLE_ELEMS = 1 << 28


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")


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
class _ImageState:
    """What one image's crops share while on the device: run lengths of every mask that passed the
    filters (appended per upsampling chunk, read once at the end) and the prompt points (host)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.counts: List[torch.Tensor] = []
        self.lengths: List[torch.Tensor] = []
        self.num_rles = 0
        self.points: List[np.ndarray] = []  # (n, 2) float64, image frame
        self.num_points = 0

    def add_points(self, points: np.ndarray) -> int:
        """Register prompt points (image frame); returns the index of the first."""
        base = self.num_points
        self.points.append(points)
        self.num_points += len(points)
        return base

    def add_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Run-length encode (k, H, W) image-frame masks on the device; returns their RLE indices."""
        counts, lengths = rle_utils.rle_counts(masks)
        self.counts.append(counts)
        self.lengths.append(lengths)
        idx = torch.arange(self.num_rles, self.num_rles + len(masks), device=self.device)
        self.num_rles += len(masks)
        return idx


@dataclass
class MaskSet:
    """Flat masks with their data, in the image frame.

    On the device, a mask is `rle_idx` into its image's run lengths and `point_idx` into its
    prompt points; `to_host` fills `rles` and `points` (the one transfer of an image)."""

    boxes: torch.Tensor  # (k, 4) int64 XYXY
    iou: torch.Tensor  # (k,)
    stability: torch.Tensor  # (k,)
    crop_boxes: torch.Tensor  # (k, 4) int64 XYXY
    rle_idx: Optional[torch.Tensor] = None  # (k,) long, device stage
    point_idx: Optional[torch.Tensor] = None  # (k,) long, device stage
    rles: Optional[List[Dict[str, Any]]] = None  # host stage
    points: Optional[np.ndarray] = None  # (k, 2) float64 xy, host stage

    def __len__(self) -> int:
        return int(self.iou.shape[0])

    def select(self, keep: torch.Tensor) -> "MaskSet":
        keep = keep.to(self.iou.device)
        host = None if self.rles is None else keep.cpu().long()
        return MaskSet(
            boxes=self.boxes[keep],
            iou=self.iou[keep],
            stability=self.stability[keep],
            crop_boxes=self.crop_boxes[keep],
            rle_idx=None if self.rle_idx is None else self.rle_idx[keep],
            point_idx=None if self.point_idx is None else self.point_idx[keep],
            rles=None if host is None else [self.rles[i] for i in host.tolist()],
            points=None if self.points is None else self.points[host.numpy()],
        )

    @staticmethod
    def cat(sets: Sequence["MaskSet"], device: torch.device) -> "MaskSet":
        def cat(name: str, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            parts = [getattr(s, name) for s in sets]
            return torch.cat(parts) if parts else torch.zeros(shape, dtype=dtype, device=device)

        return MaskSet(
            boxes=cat("boxes", (0, 4), torch.long), iou=cat("iou", (0,), torch.float32),
            stability=cat("stability", (0,), torch.float32), crop_boxes=cat("crop_boxes", (0, 4), torch.long),
            rle_idx=cat("rle_idx", (0,), torch.long), point_idx=cat("point_idx", (0,), torch.long),
        )

    def to_host(self, state: _ImageState, hw: Tuple[int, int]) -> "MaskSet":
        """The image's masks to the host: one int64 and one float transfer, then COCO strings."""
        k = len(self)
        dev = self.iou.device
        counts = torch.cat(state.counts) if state.counts else torch.zeros(0, dtype=torch.long, device=dev)
        lengths = torch.cat(state.lengths) if state.lengths else torch.zeros(0, dtype=torch.long, device=dev)
        ints = torch.cat([self.rle_idx, self.point_idx, self.boxes.flatten(), self.crop_boxes.flatten(),
                          lengths, counts]).cpu().numpy()
        floats = torch.cat([self.iou.float(), self.stability.float()]).cpu()
        rle_idx, point_idx = ints[:k], ints[k : 2 * k]
        boxes = torch.from_numpy(ints[2 * k : 6 * k].reshape(k, 4).copy())
        crops = torch.from_numpy(ints[6 * k : 10 * k].reshape(k, 4).copy())
        n = state.num_rles
        lengths_h, counts_h = ints[10 * k : 10 * k + n], ints[10 * k + n :]
        starts = np.cumsum(lengths_h) - lengths_h
        kept = [counts_h[starts[i] : starts[i] + lengths_h[i]] for i in rle_idx]
        rles = rle_utils.counts_to_rles(np.concatenate(kept) if kept else np.zeros(0, np.int64),
                                        lengths_h[rle_idx], hw)
        points = np.concatenate(state.points)[point_idx] if state.points else np.zeros((0, 2))
        return MaskSet(boxes=boxes, iou=floats[:k], stability=floats[k:], crop_boxes=crops, rles=rles,
                       points=points.reshape(k, 2))


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
        upsample_chunk_elems: Optional[int] = None,
        filter_per_batch: Optional[bool] = None,
        precision: str = "fp32",
        multimask_output: bool = True,
    ) -> None:
        """`multimask_output` (not in the reference, which always decodes 3 masks per point): False
        decodes one mask per point from mask token 0, the only one a model trained with
        `model.multimask_output=false` has learnt; True is the reference's AMG."""
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("give exactly one of points_per_side and point_grids")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
        if points_per_batch < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        if crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
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
        # None: filter each point batch as it comes on the CPU, once per crop elsewhere (see _run_points).
        self.filter_per_batch = filter_per_batch
        self.precision = precision
        self.multimask_output = bool(multimask_output)
        if precision == "bf16" and model.device.type == "cpu" and not cpu_has_fast_bf16():
            warnings.warn("precision=bf16 on a CPU without native bf16 (avx512_bf16 / AMX): PyTorch emulates it, "
                          "which is much slower than fp32 (use precision=fp32 here)", stacklevel=2)
        self.stats: Dict[str, int] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _autocast(self) -> Any:
        dtype = PRECISIONS[self.precision]
        return autocast(self.device, dtype)

    # -- public ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> List[Dict[str, Any]]:
        """Masks of an HxWx3 uint8 RGB image, as a list of SAM AMG records."""
        _check_image(image)
        masks = self.generate_masks(image)
        return self.records(masks)

    @torch.inference_mode()
    def generate_batch(self, images: Sequence[np.ndarray]) -> List[List[Dict[str, Any]]]:
        """`generate` for several images, their whole-image crops through the encoder in one batch."""
        for image in images:
            _check_image(image)
        if not images:
            return []
        with self._autocast():
            embeddings = self.model.encode(self.model.preprocess(list(images)))
        return [self.records(self.generate_masks(im, embeddings[i : i + 1])) for i, im in enumerate(images)]

    @torch.inference_mode()
    def generate_masks(self, image: np.ndarray, embedding: Optional[torch.Tensor] = None) -> MaskSet:
        """The final masks (image frame, on the host) before they are turned into records.

        `embedding`: the whole image's, when already computed (`generate_batch`). Everything up to
        the last NMS stays on the model's device; the result crosses to the host once.
        """
        self.stats = {"points_total": 0, "points_decoded": 0, "upsampled": 0, "candidates": 0}
        orig_hw = image.shape[:2]
        boxes, layers = crop_boxes(orig_hw, self.crop_n_layers, self.crop_overlap_ratio)
        state = _ImageState(self.device)
        per_crop = [
            self._process_crop(image, box, layer, orig_hw, state, embedding if i == 0 else None)
            for i, (box, layer) in enumerate(zip(boxes, layers))
        ]
        data = MaskSet.cat(per_crop, self.device)
        if len(boxes) > 1 and len(data):
            scores = 1 / box_area(data.crop_boxes).float()  # prefer masks from smaller crops
            keep = batched_nms(data.boxes.float(), scores, torch.zeros_like(data.boxes[:, 0]), self.crop_nms_thresh)
            data = data.select(keep)
        data = data.to_host(state, orig_hw)
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
    def _process_crop(self, image: np.ndarray, crop_box: List[int], layer: int, orig_hw: Tuple[int, int],
                      state: _ImageState, embedding: Optional[torch.Tensor] = None) -> MaskSet:
        x0, y0, x1, y1 = crop_box
        crop = np.ascontiguousarray(image[y0:y1, x0:x1, :])
        crop_hw = crop.shape[:2]
        S = self.model.image_size
        if embedding is None:
            with self._autocast():
                embedding = self.model.encode(self.model.preprocess([crop]))
        grid = self.point_grids[layer]
        points = grid * np.array(crop_hw)[None, ::-1]  # crop pixels, float64 (as the reference)
        ctx = dict(embedding=embedding, crop_hw=crop_hw, input_hw=preprocess_shape(*crop_hw, S), crop_box=crop_box,
                   orig_hw=orig_hw, state=state)
        found: List[MaskSet] = []
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
                covered = union.cpu().numpy()[yy, xx]  # one transfer per crop
                self._run_points(rest[~covered], found, ctx)

        device = self.device
        data = MaskSet.cat(found, device)
        if len(data):
            keep = batched_nms(data.boxes.float(), data.iou, torch.zeros_like(data.boxes[:, 0]), self.box_nms_thresh)
            data = data.select(keep)
        data.boxes = data.boxes + torch.tensor([[x0, y0, x0, y0]], device=device)
        data.crop_boxes = torch.tensor([crop_box], dtype=torch.long, device=device).repeat(len(data), 1)
        return data

    def _run_points(self, points: np.ndarray, found: List[MaskSet], ctx: Dict[str, Any],
                    union: Optional[torch.Tensor] = None) -> None:
        """Decode `points` (crop pixels) in batches and add the masks that pass every filter.

        On the CPU each batch is filtered and upsampled as it comes (bounded memory; a host sync
        costs nothing there). Elsewhere the batches' logits stay on the device and the filters run
        once over all of them, so the device never waits on the host between batches."""
        S = self.model.image_size
        x0, y0 = ctx["crop_box"][:2]
        base = ctx["state"].add_points(points + np.array([[x0, y0]], dtype=np.float64))
        model_points = torch.as_tensor(apply_coords(points, ctx["crop_hw"], S), dtype=torch.float32, device=self.device)
        per_batch = self.device.type == "cpu" if self.filter_per_batch is None else self.filter_per_batch
        pending: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for s in range(0, len(points), self.points_per_batch):
            pts = model_points[s : s + self.points_per_batch]
            with self._autocast():
                out = self.model.predict_grid(ctx["embedding"], pts[None], multimask_output=self.multimask_output,
                                              points_per_batch=self.points_per_batch)
            self.stats["points_decoded"] += len(pts)
            low = out.masks[0].flatten(0, 1)  # (n * M, s, s): point-major, as the reference
            iou = out.iou_pred[0].flatten(0, 1).float()
            m = out.masks.shape[2]
            point_idx = torch.arange(base + s, base + s + len(pts), device=self.device).repeat_interleave(m)
            pending.append((low, iou, point_idx))
            if per_batch:
                self._filter_and_encode(*self._iou_filter(pending.pop()), found, ctx, union)
        if pending:
            low, iou, point_idx = (torch.cat(t) for t in zip(*pending))
            pending.clear()
            self._filter_and_encode(*self._iou_filter((low, iou, point_idx)), found, ctx, union)

    def _iou_filter(self, cand: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
        low, iou, point_idx = cand
        if self.pred_iou_thresh > 0.0:
            keep = torch.nonzero(iou > self.pred_iou_thresh).flatten()
            low, iou, point_idx = low[keep], iou[keep], point_idx[keep]
        return low, iou, point_idx

    def _filter_and_encode(self, low, iou, point_idx, found: List[MaskSet], ctx, union) -> None:
        """Upsample the survivors of the IoU filter in chunks; stability, binarise, boxes, crop edges,
        then run-length encode the kept masks in the image frame, all on the device."""
        crop_hw, input_hw = ctx["crop_hw"], ctx["input_hw"]
        crop_box, (orig_h, orig_w) = ctx["crop_box"], ctx["orig_hw"]
        x0, y0, x1, y1 = crop_box
        full_crop = (x0, y0, x1, y1) == (0, 0, orig_w, orig_h)
        per_mask = input_hw[0] * input_hw[1] + crop_hw[0] * crop_hw[1]
        budget = self.upsample_chunk_elems or (CPU_UPSAMPLE_ELEMS if self.device.type == "cpu" else DEVICE_UPSAMPLE_ELEMS)
        step = max(1, budget // per_mask)
        for s in range(0, len(low), step):
            logits = upsample_logits(low[s : s + step].float(), input_hw, crop_hw, self.model.image_size)
            self.stats["upsampled"] += len(logits)
            hi = rle_utils.count_true(logits > self.mask_threshold + self.stability_score_offset)
            lo = rle_utils.count_true(logits > self.mask_threshold - self.stability_score_offset)
            stability = hi.float() / lo.float()  # 0 / 0 = nan fails the threshold, as in the reference
            if self.stability_score_thresh > 0.0:
                sel = torch.nonzero(stability >= self.stability_score_thresh).flatten()
                binary = logits[sel] > self.mask_threshold
            else:
                sel = torch.arange(len(logits), device=logits.device)
                binary = logits > self.mask_threshold
            del logits
            boxes = rle_utils.mask_boxes(binary)
            inner = torch.nonzero(~near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])).flatten()
            binary, boxes, sel = binary[inner], boxes[inner], sel[inner]
            if len(sel) == 0:
                continue
            if union is not None:
                union |= binary.any(dim=0)
            self.stats["candidates"] += len(sel)
            if not full_crop:  # RLEs are in the image frame (as the reference's, after uncrop_masks)
                placed = torch.zeros(len(binary), orig_h, orig_w, dtype=torch.bool, device=binary.device)
                placed[:, y0:y1, x0:x1] = binary
                binary = placed
            found.append(MaskSet(
                boxes=boxes, iou=iou[sel + s], stability=stability[sel], crop_boxes=boxes.new_zeros(len(sel), 4),
                rle_idx=ctx["state"].add_masks(binary), point_idx=point_idx[sel + s],
            ))

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
