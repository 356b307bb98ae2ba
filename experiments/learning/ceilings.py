"""Ceilings of the synthetic val split that no training can beat.

    python experiments/learning/ceilings.py                  # the default model frame (256 px)
    python experiments/learning/ceilings.py model.image_size=512

(a) grid coverage: the share of val objects with at least one grid point inside (a prompt whose
    point misses an object rarely yields its mask), for several grid sizes;
(b) resolution: the IoU of the best mask a low-res (S/4) logit map can give: each object's mask
    area-averaged to the low-res frame (as the training targets are), read as the logit of each
    cell's fraction, and upsampled to the original size exactly as evaluation does; with that mask
    for every object, recall@0.5 and AR over IoU 0.50:0.95 (what AR@100 averages).
"""
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from mobilesam_se.data.targets import lowres_size
from mobilesam_se.prompts import grid_points_in_image
from mobilesam_se.assembly import register_resolvers
from mobilesam_se.transforms import postprocess_masks, preprocess_shape

GRIDS = (8, 12, 16, 24, 32)
SMALL = 32 ** 2  # COCO's small / medium boundary, in pixels


def main(overrides):
    register_resolvers()
    with initialize_config_dir(str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none"] + list(overrides))
    size = cfg.model.image_size
    val = instantiate(cfg.dataset.val)
    ious, hard_ious, areas, cover = [], [], [], {g: [] for g in GRIDS}
    for i in range(len(val)):
        s = val[i]
        h, w = s.orig_size
        input_hw = preprocess_shape(h, w, size)
        h4, w4 = lowres_size(input_hw, size)
        masks = s.masks.numpy()
        for g in GRIDS:
            xy = np.floor(grid_points_in_image(g, (h, w))).astype(int)
            cover[g] += list(masks[:, xy[:, 1].clip(0, h - 1), xy[:, 0].clip(0, w - 1)].any(1))
        for m in masks:
            frac = np.clip(cv2.resize(m.astype(np.float32), (w4, h4), interpolation=cv2.INTER_AREA), 1e-6, 1 - 1e-6)
            low = np.full((size // 4, size // 4), -20.0, np.float32)
            low[:h4, :w4] = np.log(frac / (1 - frac))
            up = postprocess_masks(torch.from_numpy(low)[None], input_hw, (h, w), size)[0].numpy() > 0
            ious.append((up & m).sum() / max((up | m).sum(), 1))
            low[:h4, :w4] = np.where(frac >= 0.5, 4.0, -4.0)
            up = postprocess_masks(torch.from_numpy(low)[None], input_hw, (h, w), size)[0].numpy() > 0
            hard_ious.append((up & m).sum() / max((up | m).sum(), 1))
            areas.append(m.sum())
    areas = np.array(areas)
    th = np.arange(0.5, 0.951, 0.05)
    ar = lambda x: float(np.mean([(x >= t).mean() for t in th]))  # noqa: E731
    print(f"image_size {size}: {len(ious)} val objects, median area {np.median(areas):.0f} px")
    print("grid coverage:", ", ".join(f"{g}x{g} {np.mean(cover[g]):.3f}" for g in GRIDS))
    for name, x in (("coverage", np.array(ious)), ("binary", np.array(hard_ious))):
        print(f"low-res oracle ({name}): mean IoU {x.mean():.3f}, recall@0.5 {np.mean(x >= 0.5):.3f}, AR {ar(x):.3f} "
              f"(small: {ar(x[areas < SMALL]):.3f} of {int((areas < SMALL).sum())}, "
              f"medium+: {ar(x[areas >= SMALL]):.3f} of {int((areas >= SMALL).sum())})")


if __name__ == "__main__":
    main(sys.argv[1:])
