"""Promptable quality: mIoU of each ground-truth object prompted by its centre point, by its box,
and after corrective clicks of a simulated user.

Protocol (all IoUs at the original resolution, after `transforms.postprocess_masks`):
- point: one positive click at the object's interior point (maximum of its distance transform);
- box: the tight box of the full-resolution mask, [xmin, ymin, xmax + 1, ymax + 1];
- clickN: the point prompt followed by N corrective clicks. Each click goes to the interior of the
  largest connected error region of the current prediction (positive on a missed region,
  negative on a false positive) and is added to the prompt, which is decoded again. An object
  whose prediction is already exact gets no click and keeps its mask.
- Every prompt yields M candidates (M = 3 with multimask). `*_oracle` keeps the candidate with
  the highest true IoU, `*_pred` the one with the highest predicted IoU (what a deployed model
  would show). The click sessions of the two rules are separate: each user corrects the mask
  that its rule displayed.
- By default the previous low-res logits are NOT fed back as a mask prompt (`use_mask_input`):
  none of this repo's losses ever trains the mask-prompt path, so feeding logits would measure
  untrained weights as much as the fine-tuned ones; with `use_mask_input=True` the displayed
  candidate's logits are passed, as SAM's interactive loop does.
- Means are over objects (every object of every evaluated image counts once). Empty
  ground-truth masks are skipped. Each image is encoded once for all of its prompts.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from mobilesam_se.evaluation.validation import full_res_candidates
from mobilesam_se.precision import autocast
from mobilesam_se.prompted.clicks import corrective_click, interior_point
from mobilesam_se.transforms import apply_boxes, apply_coords

Tensor = torch.Tensor
RULES = ("oracle", "pred")


class _Image:
    """Geometry and ground truth of one image, and the decoding of prompts against its embedding."""

    SCORE_CHUNK = 48  # candidates upsampled to full resolution at once

    def __init__(self, model: nn.Module, embedding: Tensor, gt: Tensor, input_hw, orig_hw,
                 multimask_output: bool, points_per_batch: Optional[int], autocast_dtype) -> None:
        self.model, self.embedding, self.gt = model, embedding, gt
        self.input_hw, self.orig_hw = tuple(input_hw), tuple(orig_hw)
        self.multimask_output, self.points_per_batch = multimask_output, points_per_batch
        self.autocast_dtype = autocast_dtype

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        return apply_coords(xy, self.orig_hw, self.model.image_size)

    def decode(self, coords: Optional[Tensor] = None, labels: Optional[Tensor] = None,
               boxes: Optional[Tensor] = None, mask_input: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """K prompts (coords (K, n, 2) / labels (K, n) or boxes (K, 4)) -> logits (K, M, h, w), iou (K, M).

        A mask prompt is per image in `SamModel.decode`, so with one mask per object the embedding
        is expanded (a view, not a recomputation) to K "images" of one prompt each.
        """
        dev = self.embedding.device
        emb = self.embedding
        if mask_input is not None:
            emb = emb.expand(mask_input.shape[0], -1, -1, -1)

        def lead(t: Optional[Tensor]) -> Optional[Tensor]:
            # (K, ...) prompts -> (1, K, ...) for one image, or (K, 1, ...) for K expanded "images".
            if t is None:
                return None
            return (t[:, None] if mask_input is not None else t[None]).to(dev)

        amp = self.autocast_dtype
        with autocast(dev, amp):
            out = self.model.decode(emb, lead(coords), lead(labels), lead(boxes), mask_input=mask_input,
                                    multimask_output=self.multimask_output, points_per_batch=self.points_per_batch)
        masks, iou = out.masks.float(), out.iou_pred.float()
        if mask_input is not None:
            return masks[:, 0], iou[:, 0]
        return masks[0], iou[0]

    def score(self, logits: Tensor, iou_pred: Tensor, objects: Optional[Sequence[int]] = None
              ) -> Tuple[Tensor, Dict[str, Tuple[Tensor, Tensor]]]:
        """True IoUs (K', M) at full resolution, and per rule the chosen candidates (K',) and their
        masks (K', H, W); row r of the logits belongs to object objects[r] (default: r)."""
        gt = self.gt if objects is None else self.gt[torch.as_tensor(list(objects), device=self.gt.device)]
        K, M = logits.shape[:2]
        ious: List[Tensor] = []
        shown: Dict[str, List[Tensor]] = {r: [] for r in RULES}
        picks: Dict[str, List[Tensor]] = {r: [] for r in RULES}
        # A few objects at a time: K * M full-resolution candidates can be large (SA-1B images).
        step = max(1, self.SCORE_CHUNK // M)
        for s in range(0, K, step):
            sl = slice(s, s + step)
            n = gt[sl].shape[0]
            cands = full_res_candidates(logits[sl].flatten(0, 1), self.input_hw, self.orig_hw,
                                        self.model.image_size, chunk=self.SCORE_CHUNK).view(n, M, *self.orig_hw)
            g = gt[sl][:, None]
            iou = (cands & g).flatten(2).sum(2).float() / (cands | g).flatten(2).sum(2).float().clamp(min=1)
            ious.append(iou)
            rows = torch.arange(n, device=cands.device)
            for rule, idx in (("oracle", iou.argmax(1)), ("pred", iou_pred[sl].argmax(1).to(cands.device))):
                picks[rule].append(idx)
                shown[rule].append(cands[rows, idx])
        out = {r: (torch.cat(picks[r]), torch.cat(shown[r])) for r in RULES}
        return torch.cat(ious), out


def _click_session(img: _Image, rule: str, start_xy: np.ndarray, first: Tuple[Tensor, Tensor, Tensor],
                   num_clicks: Sequence[int], use_mask_input: bool) -> Dict[int, Tensor]:
    """Corrective clicks for all objects of one image under one selection rule.

    first = (chosen index (K,), full-res masks (K, H, W), low-res logits (K, M, h, w)) of the
    point prompt. Returns {n: IoU (K,) of the displayed mask after n clicks} for n in num_clicks.
    """
    K = start_xy.shape[0]
    points: List[List[Tuple[float, float, int]]] = [[(float(x), float(y), 1)] for x, y in start_xy]
    idx, shown, lowres_all = first
    lowres = lowres_all[torch.arange(K, device=idx.device), idx][:, None]  # (K, 1, h, w) logits of the shown candidates
    shown_iou = _iou(shown, img.gt)
    out: Dict[int, Tensor] = {}
    gt_np = img.gt.cpu().numpy()
    for n in range(1, max(num_clicks) + 1):
        clicked = []
        shown_np = shown.cpu().numpy()
        for k in range(K):
            c = corrective_click(shown_np[k], gt_np[k])
            if c is not None:
                x, y = img.to_input(np.array([c.x, c.y], dtype=np.float64))
                points[k].append((float(x), float(y), int(c.positive)))
                clicked.append(k)
        if clicked:
            rows = torch.tensor(clicked, device=shown.device)
            width = max(len(points[k]) for k in clicked)
            coords = torch.zeros(len(clicked), width, 2)
            labels = torch.full((len(clicked), width), -1, dtype=torch.long)
            for r, k in enumerate(clicked):
                pts = torch.tensor(points[k])
                coords[r, : len(pts)] = pts[:, :2]
                labels[r, : len(pts)] = pts[:, 2].long()
            mask_in = lowres[rows] if use_mask_input else None
            logits, iou_pred = img.decode(coords, labels, mask_input=mask_in)
            ious, chosen = img.score(logits, iou_pred, clicked)
            pick, masks = chosen[rule]
            sel = torch.arange(len(clicked), device=pick.device)
            shown[rows] = masks
            shown_iou[rows] = ious[sel, pick]
            lowres[rows] = logits[sel, pick][:, None]
        if n in num_clicks:
            out[n] = shown_iou.clone()
    return out


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """(K, H, W) bool pairs -> (K,) IoU."""
    inter = (a & b).flatten(1).sum(1).float()
    return inter / (a | b).flatten(1).sum(1).float().clamp(min=1)


def _tight_boxes(gt: Tensor) -> np.ndarray:
    """(K, H, W) non-empty masks -> (K, 4) XYXY [xmin, ymin, xmax + 1, ymax + 1] original pixels."""
    boxes = []
    for m in gt:
        rows = torch.nonzero(m.any(1)).flatten()
        cols = torch.nonzero(m.any(0)).flatten()
        boxes.append([int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


@torch.no_grad()
def evaluate_image_promptable(
    model: nn.Module, embedding: Tensor, gt: Tensor, input_hw, orig_hw, multimask_output: bool,
    num_clicks: Sequence[int] = (1, 3, 5), autocast_dtype: Optional[torch.dtype] = None,
    points_per_batch: Optional[int] = 64, use_mask_input: bool = False,
) -> Dict[str, Tensor]:
    """Per-object IoUs (K,) of one image for every key (`point_oracle`, `box_pred`, `click3_oracle`, ...).

    embedding (1, C, h, w); gt (K, H, W) bool, non-empty masks, on the embedding's device.
    """
    img = _Image(model, embedding, gt, input_hw, orig_hw, multimask_output, points_per_batch, autocast_dtype)
    gt_np = gt.cpu().numpy()
    centres = np.array([interior_point(m) for m in gt_np], dtype=np.float64).reshape(-1, 2)
    start = img.to_input(centres)
    res: Dict[str, Tensor] = {}
    coords = torch.as_tensor(start, dtype=torch.float32)[:, None]
    labels = torch.ones(coords.shape[:2], dtype=torch.long)
    p_logits, p_iou = img.decode(coords, labels)
    p_true, p_chosen = img.score(p_logits, p_iou)
    b_logits, b_iou = img.decode(boxes=torch.as_tensor(apply_boxes(_tight_boxes(gt), img.orig_hw, model.image_size),
                                                       dtype=torch.float32))
    b_true, b_chosen = img.score(b_logits, b_iou)
    for name, true, chosen in (("point", p_true, p_chosen), ("box", b_true, b_chosen)):
        for rule in RULES:
            idx = chosen[rule][0]
            res[f"{name}_{rule}"] = true[torch.arange(len(idx), device=true.device), idx]
    if num_clicks:
        for rule in RULES:
            idx, masks = p_chosen[rule]
            session = _click_session(img, rule, start, (idx, masks.clone(), p_logits), num_clicks, use_mask_input)
            for n, v in session.items():
                res[f"click{n}_{rule}"] = v
    return res


@torch.no_grad()
def evaluate_promptable(
    model: nn.Module,
    loader,
    device: torch.device,
    multimask_output: bool,
    num_clicks: Sequence[int] = (1, 3, 5),
    max_images: Optional[int] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    points_per_batch: Optional[int] = 64,
    use_mask_input: bool = False,
    progress: bool = False,
) -> Dict[str, float]:
    """Object-mean IoUs over the loader's images: `point_miou_oracle`, `point_miou_pred`, `box_miou_*`,
    `click{n}_miou_*` for n in num_clicks, and `num_objects`. See the module docstring for the protocol."""
    if any(n < 1 for n in num_clicks):
        raise ValueError(f"num_clicks must be positive, got {tuple(num_clicks)}")
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    per_key: Dict[str, List[Tensor]] = {}
    n_seen = 0
    for batch in tqdm(loader, desc="val/prompted", leave=False, disable=not progress):
        take = len(batch) if max_images is None else min(len(batch), max_images - n_seen)
        if take <= 0:
            break
        with autocast(device, autocast_dtype):
            embeddings = model.encode(batch.image[:take].to(device))  # once per image, for all its prompts
        for b in range(take):
            gt = batch.masks[b].to(device).bool()
            gt = gt[gt.flatten(1).any(1)]
            if gt.shape[0] == 0:
                continue
            ious = evaluate_image_promptable(
                model, embeddings[b : b + 1], gt, batch.input_size[b], batch.orig_size[b], multimask_output,
                tuple(num_clicks), autocast_dtype, points_per_batch, use_mask_input,
            )
            for key, v in ious.items():
                per_key.setdefault(key, []).append(v.float().cpu())
        n_seen += take
    if was_training:
        model.train()
    # Every key is always present (NaN without objects), so ranks and epochs log the same set.
    names = ["point", "box", *(f"click{n}" for n in sorted(set(num_clicks)))]
    out: Dict[str, float] = {}
    for name in names:
        for rule in RULES:
            vals = per_key.get(f"{name}_{rule}", [])
            out[f"{name}_miou_{rule}"] = float(torch.cat(vals).mean()) if vals else float("nan")
    out["num_objects"] = float(sum(v.numel() for v in per_key.get("point_oracle", [])))
    return out
