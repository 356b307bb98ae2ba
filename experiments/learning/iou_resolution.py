"""Is the IoU head trained on the IoU the AMG is judged by? Low-res against full-res IoU of every candidate.

    python experiments/learning/iou_resolution.py <best.pt> [more checkpoints...]

Training computes each candidate's IoU target at the decoder's low resolution (logits > 0 against
the cells an object covers at least half of, `data.targets.lowres_targets`); evaluate and the AMG
judge the upsampled full-resolution mask. For every val candidate of the default config's split this
prints both (the low-res one against the object that the full-res one picks) beside the predicted
IoU, by bins of full-res IoU: if the two IoUs parted, a head trained on the first would misjudge
the second.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.utils.data import DataLoader

from mobilesam_se.assembly import register_resolvers
from mobilesam_se.data.sample import collate_samples
from mobilesam_se.data.targets import lowres_targets
from mobilesam_se.evaluation.validation import full_res_candidates, predict_candidates
from mobilesam_se.matching import mask_iou_matrix
from stability import open_val  # this folder (the script's own directory is on sys.path)

BINS = ((0.5, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.88), (0.88, 1.01))


def candidate_ious(ckpt: str):
    """(predicted, low-res, full-res) IoU of every val candidate of `ckpt`'s model."""
    model, cfg, dataset = open_val(ckpt)
    size, multimask = int(cfg.model.image_size), bool(cfg.model.multimask_output)
    pred, low, full = [], [], []
    for batch in DataLoader(dataset, batch_size=4, collate_fn=collate_samples):
        logits, scores = predict_candidates(model, batch, torch.device("cpu"), multimask, 64)
        for b in range(logits.shape[0]):
            q = logits[b].flatten(0, 1)
            gt = batch.masks[b]
            masks = full_res_candidates(q, batch.input_size[b], batch.orig_size[b], size)
            f_iou = mask_iou_matrix(masks, gt)
            target = torch.from_numpy(lowres_targets(gt.numpy(), tuple(batch.input_size[b]), size))
            l_iou = mask_iou_matrix(q > 0, target)
            best = f_iou.argmax(1, keepdim=True)
            pred.append(scores[b].flatten())
            full.append(f_iou.gather(1, best)[:, 0])
            low.append(l_iou.gather(1, best)[:, 0])
    return tuple(torch.cat(x).numpy() for x in (pred, low, full))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    args = parser.parse_args()
    register_resolvers()
    for ckpt in args.checkpoints:
        pred, low, full = candidate_ious(ckpt)
        print(f"{ckpt}: {pred.size} candidates; mean predicted {pred.mean():.3f}, low-res {low.mean():.3f}, "
              f"full-res {full.mean():.3f}; corr(predicted, low-res) {np.corrcoef(pred, low)[0, 1]:.3f}, "
              f"corr(predicted, full-res) {np.corrcoef(pred, full)[0, 1]:.3f}")
        for lo, hi in BINS:
            sel = (full >= lo) & (full < hi)
            if sel.any():
                print(f"  full-res IoU [{lo:.2f}, {min(hi, 1):.2f}): {sel.sum():5d} candidates, "
                      f"mean low-res IoU {low[sel].mean():.3f}, mean predicted {pred[sel].mean():.3f}")


if __name__ == "__main__":
    main()
