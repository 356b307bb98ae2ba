"""The fail-fast dataset check of training: every problem at once, decoded once per dataset version.

Decoding a large dataset takes as long as an epoch, so the result is cached in a small JSON file
keyed by the dataset's file list with sizes and modification times (and the options that change
decoding): a resume, another rank or a second run of the same data reads it instead of decoding
again; touching any file makes a new key.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from mobilesam_se.data.base import MaskDataset
from mobilesam_se.data.errors import Problem

log = logging.getLogger(__name__)

CHECK_VERSION = "decode-check:v1"  # bump when a decoder learns to find new problems
ENV_CACHE = "MOBILESAM_SE_CACHE"


def default_cache_dir() -> Path:
    base = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "mobilesam_se")
    return Path(base).expanduser() / "dataset_checks"


def dataset_fingerprint(dataset: MaskDataset) -> str:
    files = []
    for path in dataset.source_files():
        try:
            st = os.stat(path)
            files.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
        except OSError:
            files.append((os.path.abspath(path), -1, -1))  # gone since indexing: decoding will say so
    ident = [CHECK_VERSION, type(dataset).__name__, dataset.source, dataset.max_masks_per_image, dataset.ids, files]
    return hashlib.sha1(json.dumps(ident, default=str).encode()).hexdigest()


def _load(path: Path, fingerprint: str, n: int) -> Optional[Dict[int, List[Problem]]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("fingerprint") != fingerprint or data.get("images") != n:
            return None
        return {int(i): [Problem(p, m) for p, m in probs] for i, probs in data["bad"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent, torn or foreign: decode again


def _save(path: Path, fingerprint: str, n: int, bad: Dict[int, List[Problem]]) -> None:
    data = {"fingerprint": fingerprint, "images": n,
            "bad": {str(i): [[p.path, p.message] for p in probs] for i, probs in bad.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".part", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop training; the next run decodes again
        log.warning("could not cache the dataset check in %s (%s)", path.parent, exc)


def check_dataset(dataset: MaskDataset, progress: bool = False, cache_dir: Optional[Path | str | bool] = None) -> List[Problem]:
    """Every problem of the dataset, indexing and decoding ones together (an empty list: fine).

    `cache_dir`: where results are cached (None: `default_cache_dir()`; False: no cache). With
    on_error="skip" the bad samples are dropped from the index (build the DataLoader after).
    """
    if type(dataset).validate is not MaskDataset.validate:
        return dataset.validate(progress)  # its own rule (a generated stream has nothing to decode-check)
    indexing = list(dataset.skipped)
    bad: Optional[Dict[int, List[Problem]]] = None
    path = None
    if cache_dir is not False:
        fingerprint = dataset_fingerprint(dataset)
        path = Path(cache_dir or default_cache_dir()) / f"{fingerprint}.json"
        bad = _load(path, fingerprint, len(dataset))
        if bad is not None:
            log.info("%s: dataset check cached in %s (no image decoded)", dataset.source, path)
    if bad is None:
        bad = dataset.decode_problems(progress)
        if path is not None:
            _save(path, fingerprint, len(dataset), bad)
    decoding = [p for i in sorted(bad) for p in bad[i]]
    dataset.drop_bad(bad)
    return indexing + decoding
