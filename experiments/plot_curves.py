#!/usr/bin/env python
"""Learning curves of a run from its checkpoints/training_log.txt, as one PNG.

    python experiments/plot_curves.py outputs/train/<run>/checkpoints/training_log.txt -o curves.png

Panels: val recall@0.5 (all candidates) and AR@100 of the raw candidates (COCO, when the run had
trainer.coco_eval_every) and of the stock AMG filters' recall; the IoU head's calibration gap
(|mean predicted - mean true IoU|, with the 0.1 warning line); stock-AMG masks per image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from collect import read_training_log  # noqa: E402

PANELS = (
    ("segmenting", (("val/recall", "recall@0.5, all candidates"), ("val/coco_raw/AR_100", "AR@100, raw candidates"),
                    ("val/amg/recall", "recall@0.5, stock AMG"))),
    ("IoU head", (("val/calibration/gap", "|mean predicted - true IoU|"),
                  ("val/calibration/mean_pred_iou", "mean predicted IoU"), ("val/calibration/mean_true_iou", "mean true IoU"))),
    ("stock AMG", (("val/amg/masks_per_image", "masks per image"),)),
)


def plot_curves(rows: List[Dict[str, float]], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [r for r in rows if any(k.startswith("val/") for k in r)]
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (name, series) in zip(axes, PANELS):
        for key, label in series:
            pts = [(r["epoch"], r[key]) for r in val if key in r and r[key] == r[key]]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        if name == "IoU head":
            ax.axhline(0.1, color="red", lw=0.8, ls="--", label="warning (0.1)")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", type=Path, help="checkpoints/training_log.txt of a run")
    p.add_argument("-o", "--out", type=Path, default=None, help="PNG path (default: learning_curves.png beside the log)")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    rows = read_training_log(args.log)
    if not any(k.startswith("val/") for r in rows for k in r):
        p.error(f"{args.log}: no validation rows (trainer.val_every=0?)")
    out = plot_curves(rows, args.out or args.log.with_name("learning_curves.png"), args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
