"""Calibration of the IoU head: does a candidate's predicted IoU match its real IoU?

A candidate's "true" IoU is its IoU with the best-matching ground-truth mask (the largest IoU
over all gt masks of the image, 0 when the image has none). The AMG keeps a candidate only when
its predicted IoU exceeds `pred_iou_thresh` (0.88 by default), so a head that is over- or
under-confident decides what the user sees.

Predicted IoUs are clipped to [0, 1] before binning (a regression head may leave that range);
the bins are equal-width over [0, 1], the last one closed on the right.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from mobilesam_se.matching import mask_iou_matrix

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


@torch.no_grad()
def best_match_iou(masks: torch.Tensor, gt: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(Q,) IoU of each of (Q, H, W) candidates with its best-matching mask of (K, H, W) gt; 0 if K == 0."""
    q = masks.shape[0]
    if gt.shape[0] == 0 or q == 0:
        return torch.zeros(q, dtype=torch.float32, device=masks.device)
    gt = gt.to(masks.device)
    out = [mask_iou_matrix(masks[s : s + chunk], gt).max(dim=1).values.float() for s in range(0, q, chunk)]
    return torch.cat(out)


def reliability(pred_iou: ArrayLike, true_iou: ArrayLike, bins: int = 10) -> Dict[str, object]:
    """Reliability diagram data and calibration errors.

    Returns edges (bins+1), count / mean_pred / mean_true per bin (NaN for empty bins), ece (the
    count-weighted mean |mean_pred - mean_true| over bins), mae (mean |pred - true| over candidates),
    and the overall means. With no candidates the errors are NaN.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    pred = np.clip(_np(pred_iou), 0.0, 1.0)
    true = _np(true_iou)
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predicted but {true.size} true IoUs")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.minimum((pred * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.int64)
    sum_pred = np.bincount(idx, weights=pred, minlength=bins)
    sum_true = np.bincount(idx, weights=true, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.where(count > 0, sum_pred / np.maximum(count, 1), np.nan)
        mean_true = np.where(count > 0, sum_true / np.maximum(count, 1), np.nan)
    n = int(count.sum())
    if n:
        ece = float(np.sum(count[count > 0] * np.abs(mean_pred - mean_true)[count > 0]) / n)
        mae = float(np.mean(np.abs(pred - true)))
    else:
        ece = mae = float("nan")
    return {
        "edges": edges.tolist(), "count": count.tolist(), "mean_pred": mean_pred.tolist(), "mean_true": mean_true.tolist(),
        "ece": ece, "mae": mae, "num": n,
        "mean_pred_iou": float(pred.mean()) if n else float("nan"),
        "mean_true_iou": float(true.mean()) if n else float("nan"),
    }


def survival(pred_iou: ArrayLike, thresholds: Sequence[float] = (0.88, 0.95)) -> Dict[float, float]:
    """Share of candidates whose raw predicted IoU passes each threshold (strictly greater, the AMG's test)."""
    pred = _np(pred_iou)
    return {float(t): float((pred > t).mean()) if pred.size else float("nan") for t in thresholds}


def plot_reliability(rel: Dict[str, object], path: Optional[str] = None, ax=None, title: Optional[str] = None):
    """Reliability diagram: mean true IoU per predicted-IoU bin against the diagonal, with the
    candidates per bin as a histogram underneath (only when drawing a new figure, `ax=None`).
    Saves a PNG when `path` is given; returns the figure."""
    from matplotlib.figure import Figure  # not pyplot: no GUI backend, nothing left open

    edges = np.asarray(rel["edges"], dtype=float)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    count = np.asarray(rel["count"], dtype=float)
    mean_true = np.asarray(rel["mean_true"], dtype=float)
    mean_pred = np.asarray(rel["mean_pred"], dtype=float)
    own = ax is None
    if own:
        fig = Figure(figsize=(4.8, 5.6))
        ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax_hist = ax.figure, None
    ok = count > 0
    ax.plot([0, 1], [0, 1], "--", color="0.5", lw=1, label="perfect calibration")
    ax.bar(centers[ok], mean_true[ok], width=width * 0.9, color="tab:blue", alpha=0.75, label="mean true IoU")
    ax.plot(mean_pred[ok], mean_true[ok], "o-", color="tab:red", ms=4, lw=1, label="(mean predicted, mean true)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("true IoU (best-matching gt)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or f"IoU head calibration: ECE {rel['ece']:.3f} ({rel['num']} candidates)", fontsize=9)
    if ax_hist is not None:
        ax_hist.bar(centers, count, width=width * 0.9, color="0.4")
        ax_hist.set_ylabel("candidates")
        ax_hist.set_xlabel("predicted IoU (clipped to [0, 1])")
    else:
        ax.set_xlabel("predicted IoU (clipped to [0, 1])")
    if own:
        fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
