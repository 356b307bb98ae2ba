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
    p.add_argument("--scenes", default="1,4,7", help="val scene indices")
    args = p.parse_args(argv)

    repo = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(repo))
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from mobilesam_se.assembly import register_resolvers
    from mobilesam_se.inference import EverythingGenerator
    from mobilesam_se.inference.thresholds import TUNED_KEYS, apply_tuned
    from mobilesam_se.models.build import build_from_checkpoint
    from mobilesam_se.visual import overlay_masks_on_image, save_rgb, side_by_side

    register_resolvers()
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none"])
    # the model its description says (size, image size, mask tokens), as evaluate builds it
    model = build_from_checkpoint(args.checkpoint, cfg).eval()
    kwargs, used = apply_tuned(dict(TUNED_KEYS), args.checkpoint)
    gen = EverythingGenerator(model, points_per_side=int(cfg.dataset.grid_points), output_mode="binary_mask",
                              multimask_output=bool(cfg.model.multimask_output), **kwargs)
    val = instantiate(cfg.dataset.val, keep_original=True)  # the default run's val split at the model's size
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
