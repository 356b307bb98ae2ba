"""AMG thresholds tuned for a checkpoint, stored beside it as `<stem>.amg.yaml`.

`python -m mobilesam_se.tune` writes the file (training does too, for the final best.pt);
`segment` and `evaluate` read it when it is present, unless `generator.tuned=false` asks for the
stock values. A threshold typed on the command line always wins over the tuned one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Tuple

import yaml

from mobilesam_se.models.checkpoint import atomic_write_text

# The keys a tuning searches, with the stock SamAutomaticMaskGenerator values.
TUNED_KEYS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "box_nms_thresh": 0.7}
SUFFIX = ".amg.yaml"


def tuned_path(checkpoint: str | os.PathLike) -> Path:
    """best.pt -> best.amg.yaml, beside the checkpoint."""
    path = Path(checkpoint)
    return path.with_name(path.stem + SUFFIX)


def write_tuned(checkpoint: str | os.PathLike, thresholds: Dict[str, float], info: Dict[str, Any]) -> Path:
    """Write the tuned thresholds (and how they were found) atomically beside the checkpoint."""
    unknown = set(thresholds) - set(TUNED_KEYS)
    if unknown:
        raise ValueError(f"not tunable AMG keys: {sorted(unknown)}")
    path = tuned_path(checkpoint)
    body = {"generator": {k: float(v) for k, v in thresholds.items()}, "info": info}
    header = "# AMG thresholds tuned for " + Path(checkpoint).name + " (python -m mobilesam_se.tune)\n"
    atomic_write_text(path, header + yaml.safe_dump(body, sort_keys=False))
    return path


def read_tuned(checkpoint: str | os.PathLike) -> Optional[Dict[str, float]]:
    """The tuned thresholds stored beside `checkpoint`, or None when there are none."""
    path = tuned_path(checkpoint)
    if not path.is_file():
        return None
    try:
        body = yaml.safe_load(path.read_text()) or {}
        values = {k: float(v) for k, v in (body.get("generator") or {}).items() if k in TUNED_KEYS}
    except (yaml.YAMLError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path}: unreadable tuned thresholds ({exc}); delete it or re-run python -m mobilesam_se.tune")
    return values or None


def apply_tuned(
    generator_kwargs: Dict[str, Any], checkpoint: Optional[str | os.PathLike], enabled: bool = True,
    explicit: Iterable[str] = (),
) -> Tuple[Dict[str, Any], Optional[Path]]:
    """generator_kwargs with the tuned thresholds of `checkpoint` put in, except those in `explicit`
    (typed by the user); returns (kwargs, the file used or None)."""
    if not enabled or not checkpoint:
        return dict(generator_kwargs), None
    tuned = read_tuned(checkpoint)
    if not tuned:
        return dict(generator_kwargs), None
    out = dict(generator_kwargs)
    explicit = set(explicit)
    for key, value in tuned.items():
        if key not in explicit:
            out[key] = value
    return out, tuned_path(checkpoint)

