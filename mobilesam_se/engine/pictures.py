"""Validation pictures: ground truth beside the matched predictions, with the grid prompts drawn
(red: a prompt whose candidate was matched), as PNGs under vis/epoch_N and as W&B images."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from mobilesam_se.visual import overlay_masks_on_image, save_rgb, side_by_side


def save_validation_pictures(visuals: List[Dict[str, Any]], folder: Path, logger: Optional[Any], step: int,
                             epoch: int) -> None:
    if not visuals:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for item in visuals:
        pts = item["points"]
        colors = np.full((len(pts), 3), 255, np.uint8)
        colors[item["points_matched"]] = (255, 40, 40)
        pred = overlay_masks_on_image(item["image"], item["pred"], points=pts, point_colors=colors)
        gt = overlay_masks_on_image(item["image"], item["gt"])
        pic = side_by_side(gt, pred)
        save_rgb(folder / f"{item['image_id']}.png", pic)
        if logger is not None:
            logger.log_image(f"val/overlay/{item['image_id']}", pic, step,
                             caption=f"epoch {epoch}: ground truth | matched predictions")
