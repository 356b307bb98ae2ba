"""Every problem of a dataset at once: the fail-fast check of training (decoded once per dataset
version) and its CLI, `python -m mobilesam_se.data.check <root> [--kind folder|coco|sa1b] [--annotations file]`
(one `path: message` line per problem and a summary; exit 1 if there is any problem, 0 otherwise).

Decoding a large dataset takes as long as an epoch, so the result is cached in a small JSON file
keyed by the dataset's file list with sizes and modification times (and the options that change
decoding): a resume, another rank or a second run of the same data reads it instead of decoding
again; touching any file makes a new key.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from mobilesam_se.data.base import MaskDataset
from mobilesam_se.data.errors import DatasetError, Problem
from mobilesam_se.errors import report_user_errors

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


KINDS = ("folder", "coco", "sa1b")


def _open_dataset(args: argparse.Namespace) -> MaskDataset:
    from mobilesam_se.data.coco import CocoDataset
    from mobilesam_se.data.folder import FolderDataset
    from mobilesam_se.data.sa1b import SA1BDataset

    # "skip" so that indexing collects its problems instead of stopping at them.
    if args.kind == "coco":
        return CocoDataset(image_dir=args.root, annotation_file=args.annotations, on_error="skip")
    return {"folder": FolderDataset, "sa1b": SA1BDataset}[args.kind](root=args.root, on_error="skip")


@report_user_errors
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mobilesam_se.data.check", description="List every problem of a dataset at once."
    )
    parser.add_argument("root", help="dataset folder (for coco: the image folder)")
    parser.add_argument(
        "--kind", choices=KINDS, default=None, help="layout (default: coco with --annotations, else folder)"
    )
    parser.add_argument("--annotations", help="COCO instances JSON (with --kind coco)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-cache", action="store_true",
                        help="decode everything even if this exact dataset was checked before")
    args = parser.parse_args(argv)
    args.kind = args.kind or ("coco" if args.annotations else "folder")
    if args.kind == "coco" and not args.annotations:
        parser.error("--kind coco needs --annotations")
    if args.kind != "coco" and args.annotations:
        parser.error(f"--annotations is for --kind coco, not {args.kind}")
    # The problems are printed below; the per-sample warnings would only repeat them.
    logging.getLogger("mobilesam_se.data").setLevel(logging.ERROR)
    try:
        dataset = _open_dataset(args)
        problems: List[Problem] = check_dataset(dataset, progress=not args.no_progress,
                                                cache_dir=False if args.no_cache else None)
    except DatasetError as exc:  # the dataset cannot even be indexed (wrong root, bad JSON)
        problems = exc.problems
    for problem in problems:
        print(problem)
    files = len({p.path for p in problems})
    if problems:
        print(f"{len(problems)} problem(s) in {files} file(s); {args.root} is not ready to use")
        return 1
    print(f"OK: {len(dataset)} image(s) in {args.root}, no problems")
    return 0


if __name__ == "__main__":
    sys.exit(main())
