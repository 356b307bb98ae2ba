"""Why the stock AMG keeps no mask: predicted IoU against stability score of every raw AMG mask.

    python experiments/learning/stability.py <best.pt> [more checkpoints...]

Runs the AMG with every filter open (pred_iou_thresh 0, stability_score_thresh 0, no NMS) on the
synthetic val split of the default config and prints, for the masks above a few predicted-IoU
levels, their stability scores (SAM's: IoU of the mask at logit > +1 and > -1). The stock AMG keeps
a mask only when both its predicted IoU > 0.88 and its stability >= 0.95.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mobilesam_se.assembly import register_resolvers
from mobilesam_se.inference.amg import EverythingGenerator
from mobilesam_se.models.build import build_from_checkpoint

REPO = Path(__file__).resolve().parents[2]


def open_val(ckpt: str):
    """(model, cfg, val split) for `ckpt`: the model its checkpoint describes (as evaluate builds
    it; `cfg.model` set to it), the default config's val split read at that model's size."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none"])
    model = build_from_checkpoint(ckpt, cfg).eval()
    return model, cfg, instantiate(cfg.dataset.val, keep_original=True)


def open_amg(ckpt: str):
    """(the AMG with every filter open, the default config's val split) for `ckpt` (`open_val`)."""
    model, cfg, dataset = open_val(ckpt)
    gen = EverythingGenerator(model, points_per_side=int(cfg.dataset.grid_points), pred_iou_thresh=0.0,
                              multimask_output=bool(cfg.model.multimask_output),  # as the checkpoint trained
                              stability_score_thresh=0.0, box_nms_thresh=1.0, output_mode="binary_mask")
    return gen, dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    register_resolvers()
    for ckpt in args.checkpoints:
        gen, dataset = open_amg(ckpt)
        pred, stab = [], []
        for i in range(len(dataset)):
            with torch.no_grad():
                records = gen.generate(dataset[i].image_uint8)
            pred += [r["predicted_iou"] for r in records]
            stab += [r["stability_score"] for r in records]
        pred, stab = np.asarray(pred), np.asarray(stab)
        print(f"{ckpt}: {len(dataset)} images, {pred.size} masks; stability >= 0.95: {np.mean(stab >= 0.95):.2%} "
              f"of all; pred > 0.88 and stability >= 0.95 (what the stock AMG keeps): {np.sum((pred > 0.88) & (stab >= 0.95))}")
        for level in (0.6, 0.7, 0.8, 0.88):
            sel = pred > level
            if sel.any():
                s = stab[sel]
                print(f"  pred IoU > {level:.2f}: {sel.sum():4d} masks, stability median {np.median(s):.3f}, "
                      f"90th percentile {np.quantile(s, 0.9):.3f}, max {s.max():.3f}")


if __name__ == "__main__":
    main()
