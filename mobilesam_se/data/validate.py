"""`python -m mobilesam_se.data.validate <root> [--kind folder|coco|sa1b] [--annotations file]`

Lists every problem of a dataset at once (one `path: message` line each) and a summary; exits 1
if there is any problem, 0 otherwise.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import List, Optional

from mobilesam_se.data.base import MaskDataset
from mobilesam_se.data.checks import check_dataset
from mobilesam_se.data.errors import DatasetError, Problem
from mobilesam_se.data.factory import build_dataset
from mobilesam_se.errors import report_user_errors

KINDS = ("folder", "coco", "sa1b")


def _open_dataset(args: argparse.Namespace) -> MaskDataset:
    # "skip" so that indexing collects its problems instead of stopping at them.
    if args.kind == "coco":
        return build_dataset("coco", image_dir=args.root, annotation_file=args.annotations, on_error="skip")
    return build_dataset(args.kind, root=args.root, on_error="skip")


@report_user_errors
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mobilesam_se.data.validate", description="List every problem of a dataset at once."
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
