#!/usr/bin/env python
"""Ground truth | AMG output of a checkpoint on a few synthetic val scenes, as one PNG.

    python experiments/default_run/overlay.py outputs/train/<run>/checkpoints/best.pt -o overlay.png

The AMG uses the thresholds tuned for the checkpoint (best.amg.yaml) when present, else stock.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True)
    p.add_argument("--size", default="small", help="model size of the checkpoint (tiny | small | full)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--scenes", default="1,4,7", help="val scene indices")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from mobilesam_se.data.synthetic import SyntheticDataset
    from mobilesam_se.inference import EverythingGenerator
    from mobilesam_se.inference.thresholds import TUNED_KEYS, apply_tuned
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.visual import overlay_masks_on_image, save_rgb, side_by_side

    model = build_mobilesam(args.image_size, size=args.size, checkpoint=str(args.checkpoint)).eval()
    kwargs, used = apply_tuned(dict(TUNED_KEYS), args.checkpoint)
    gen = EverythingGenerator(model, points_per_side=8, output_mode="binary_mask", **kwargs)
    val = SyntheticDataset(split="val", num_images=32, image_hw=(192, 256), image_size=args.image_size,
                           grid_points=8, keep_original=True)
    rows = []
    for i in (int(s) for s in args.scenes.split(",")):
        sample = val[i]
        masks = [np.asarray(r["segmentation"], bool) for r in gen.generate(sample.image_uint8)]
        pred = np.stack(masks) if masks else np.zeros((0, *sample.orig_size), bool)
        pic = side_by_side(overlay_masks_on_image(sample.image_uint8, sample.masks.numpy()),
                           overlay_masks_on_image(sample.image_uint8, pred))
        rows.append(pic)
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    save_rgb(args.out, np.concatenate(rows))
    print(f"wrote {args.out} (AMG thresholds: {'tuned, ' + used.name if used else 'stock'} {kwargs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
