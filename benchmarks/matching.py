"""IoU matrix + Hungarian assignment of P x M candidates to K objects: ours vs the broadcast approach."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from benchmarks.common import interleaved_times, median


def random_masks(num: int, size: int, generator: torch.Generator, device: str) -> torch.Tensor:
    """(num, size, size) bool ellipses of random centre, radii (2-25 % of the side) and orientation."""
    c = torch.rand(num, 2, generator=generator) * size
    r = (0.02 + 0.23 * torch.rand(num, 2, generator=generator)) * size
    t = torch.rand(num, generator=generator) * np.pi
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dx = xs[None] - c[:, 0, None, None]
    dy = ys[None] - c[:, 1, None, None]
    cos, sin = t.cos()[:, None, None], t.sin()[:, None, None]
    u = (dx * cos + dy * sin) / r[:, 0, None, None]
    v = (-dx * sin + dy * cos) / r[:, 1, None, None]
    return (u * u + v * v <= 1).to(device)


def broadcast_iou(pred: torch.Tensor, gt: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """(Q, K) IoU as `(pred[:, None] & gt[None]).sum((-1, -2))` / union, `rows` predictions at a time
    (the full Q x K x H x W bool intermediate would be Q*K*HW bytes)."""
    out = []
    gtb = gt[None]
    for s in range(0, pred.shape[0], rows):
        p = pred[s : s + rows, None]
        inter = (p & gtb).sum((-1, -2))
        union = (p | gtb).sum((-1, -2))
        out.append(torch.where(union > 0, inter / union.clamp_min(1), torch.zeros((), device=pred.device)))
    return torch.cat(out).float()


def broadcast_match(pred: torch.Tensor, gt: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, torch.Tensor]:
    iou = broadcast_iou(pred, gt)
    rows, cols = linear_sum_assignment(iou.cpu().numpy(), maximize=True)
    return rows, cols, iou


def our_match(pred: torch.Tensor, gt: torch.Tensor):
    from mobilesam_se.matching import hungarian_match, mask_iou_matrix

    iou = mask_iou_matrix(pred, gt)
    pred_idx, gt_idx = hungarian_match(iou)
    return pred_idx, gt_idx, iou


def bench_matching(prompts: int, candidates: int, objects: int, size: int, reps: int, device: str) -> Dict[str, object]:
    g = torch.Generator().manual_seed(3)
    pred = random_masks(prompts * candidates, size, g, device)
    gt = random_masks(objects, size, g, device)
    r_rows, r_cols, r_iou = broadcast_match(pred, gt)
    o_rows, o_cols, o_iou = our_match(pred, gt)
    iou_err = (o_iou.float().cpu() - r_iou.cpu()).abs().max().item()
    same_total = abs(float(r_iou.cpu()[r_rows, r_cols].sum()) - float(o_iou.cpu()[o_rows.cpu(), o_cols.cpu()].sum()))
    times = interleaved_times({"ref": lambda: broadcast_match(pred, gt), "ours": lambda: our_match(pred, gt)}, reps, device)
    ref_s, ours_s = median(times["ref"]), median(times["ours"])
    return {
        "queries": prompts * candidates, "prompts": prompts, "candidates": candidates, "objects": objects,
        "size": size, "reps": reps, "ref_s": ref_s, "ours_s": ours_s, "speedup": ref_s / ours_s,
        "max_abs_iou_diff": iou_err, "matched_iou_total_diff": same_total, "times_s": times,
    }
