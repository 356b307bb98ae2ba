"""Official checkpoints by name: download once, verify, cache.

    python -m mobilesam_se.weights list                      # what is known, what is cached where
    python -m mobilesam_se.weights fetch sam_vit_h mobile_sam  # pre-download (e.g. on a login node)
    python -m mobilesam_se.weights fetch                     # all of them

Names: `mobile_sam`, `sam_vit_h`, `sam_vit_l`, `sam_vit_b` (the official files, with their SHA-256).
Anywhere a checkpoint is configured (`model.checkpoint`, a teacher's `checkpoint`, the CLIs'
`checkpoint=`) a name resolves to the cached file, downloading it first when it is missing; any
other value is a local path, used as it is.

Cache folder, first that is set: the `paths.weights_dir` config key, `$MOBILESAM_SE_WEIGHTS`,
`$TORCH_HOME/mobilesam_se`, `~/.cache/torch/mobilesam_se`. A download goes to a temporary file in
that folder and is renamed onto its final name only after its SHA-256 matched, so an interrupted or
corrupted download never looks like a checkpoint. `MOBILESAM_SE_OFFLINE=1` never tries the network.
`MOBILESAM_SE_WEIGHTS_TABLE=<file.json>` ({"name": {"url": ..., "sha256": ..., "filename": ...}})
adds or replaces entries: a mirror inside a cluster, or the tests' local server.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from mobilesam_se.errors import UserError, report_user_errors

log = logging.getLogger(__name__)

ENV_DIR = "MOBILESAM_SE_WEIGHTS"
ENV_TABLE = "MOBILESAM_SE_WEIGHTS_TABLE"
ENV_OFFLINE = "MOBILESAM_SE_OFFLINE"
CHUNK = 1 << 20
TIMEOUT_S = 30.0


class CheckpointNotFound(UserError, FileNotFoundError):
    """A checkpoint value that is neither a known name nor an existing file."""


@dataclass(frozen=True)
class WeightsEntry:
    name: str
    url: str
    sha256: str
    filename: str


# SHA-256 of the files as published (checked against several independent public manifests).
OFFICIAL: Dict[str, WeightsEntry] = {
    e.name: e
    for e in (
        WeightsEntry(
            "mobile_sam", "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt",
            "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f", "mobile_sam.pt",
        ),
        WeightsEntry(
            "sam_vit_h", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "sam_vit_h_4b8939.pth",
        ),
        WeightsEntry(
            "sam_vit_l", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "sam_vit_l_0b3195.pth",
        ),
        WeightsEntry(
            "sam_vit_b", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "sam_vit_b_01ec64.pth",
        ),
    )
}


def table() -> Dict[str, WeightsEntry]:
    """The official entries, updated from `$MOBILESAM_SE_WEIGHTS_TABLE` when it is set."""
    entries = dict(OFFICIAL)
    path = os.environ.get(ENV_TABLE)
    if not path:
        return entries
    try:
        extra = json.loads(Path(path).read_text(encoding="utf-8"))
        for name, e in extra.items():
            entries[name] = WeightsEntry(name, e["url"], e["sha256"].lower(), e.get("filename") or Path(e["url"]).name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{ENV_TABLE}={path}: cannot read it ({exc}); it must be JSON "
                        '{"<name>": {"url": ..., "sha256": ...}}') from exc
    return entries


def weights_dir(override: Optional[str] = None) -> Path:
    if override:
        return Path(override).expanduser()
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "torch")
    return Path(torch_home).expanduser() / "mobilesam_se"


def fetch_command(names: Iterable[str], root: Optional[str] = None) -> str:
    extra = f" --dir {root}" if root else ""
    return f"python -m mobilesam_se.weights fetch {' '.join(names)}{extra}"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def is_cached(entry: WeightsEntry, root: Path) -> bool:
    """The file is there and verified. A file put there by hand is hashed once, then stamped."""
    path = root / entry.filename
    if not path.is_file():
        return False
    stamp = _stamp_path(path)
    try:
        if stamp.read_text().split() == [entry.sha256, _stamp(path)]:
            return True
    except OSError:
        pass
    if sha256_of(path) != entry.sha256:
        return False
    _write_stamp(entry, path)
    return True


def _write_stamp(entry: WeightsEntry, path: Path) -> None:
    # The stamp (hash + size + mtime) saves re-hashing gigabytes at every start.
    stamp = _stamp_path(path)
    fd, tmp = tempfile.mkstemp(prefix="." + stamp.name + ".", suffix=".part", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(f"{entry.sha256} {_stamp(path)}\n")
    os.replace(tmp, stamp)


def download(entry: WeightsEntry, root: Path, progress: bool = True) -> Path:
    """Fetch `entry` into `root`, verified; raises UserError naming the URL, the path and the fix."""
    from tqdm.auto import tqdm

    dest = root / entry.filename
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the weights folder {root} ({exc}); set paths.weights_dir=<folder> or ${ENV_DIR}") from exc
    fd, tmp_name = tempfile.mkstemp(prefix="." + entry.filename + ".", suffix=".part", dir=root)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(entry.url, timeout=TIMEOUT_S) as resp:
                total = resp.headers.get("Content-Length")
                total = int(total) if total and total.isdigit() else None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {entry.filename}",
                          disable=not progress) as bar:
                    while True:
                        block = resp.read(CHUNK)
                        if not block:
                            break
                        out.write(block)
                        h.update(block)
                        received += len(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if total is not None and received != total:
            raise ConnectionError(f"the connection closed after {received} of {total} bytes")
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise UserError(f"{entry.name} from {entry.url} has SHA-256 {digest}, expected {entry.sha256}; "
                            "the file was not kept (a corrupt or changed download: retry, or check the mirror)")
        os.replace(tmp, dest)
    except UserError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # No network, refused, timed out, or the server closed mid-body (IncompleteRead): a miss.
        tmp.unlink(missing_ok=True)
        raise _unreachable([entry], root, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)  # Ctrl-C mid-download: leave nothing that looks like a checkpoint
        raise
    _write_stamp(entry, dest)
    log.info("downloaded %s to %s (SHA-256 verified)", entry.name, dest)
    return dest


def _unreachable(entries: Sequence[WeightsEntry], root: Path, reason: object) -> UserError:
    lines = [f"{e.name}: {e.url} -> {root / e.filename}" for e in entries]
    how = "downloads are off (MOBILESAM_SE_OFFLINE=1)" if reason is None else f"cannot download ({reason})"
    return UserError(
        f"checkpoint(s) not in the cache and {how}: " + "; ".join(lines)
        + f". On a machine with network run `{fetch_command([e.name for e in entries], None)}` "
        f"(cache: {root}; set paths.weights_dir=<folder> or ${ENV_DIR} to use another), "
        "copy the files there, or pass local paths instead of the names"
    )


def resolve_many(values: Sequence[Optional[str]], root: Optional[str] = None, progress: bool = True) -> List[Optional[str]]:
    """Each value: a name -> its cached (downloaded if needed) file; a path -> itself (it must exist).

    Every problem of the list is reported in one UserError (all missing downloads at once)."""
    entries = table()
    folder = weights_dir(root)
    offline = os.environ.get(ENV_OFFLINE, "") not in ("", "0")
    out: List[Optional[str]] = []
    failed: List[WeightsEntry] = []
    reasons: List[str] = []
    for value in values:
        if value is None or value == "":
            out.append(None)
            continue
        value = str(value)
        if value not in entries:
            path = Path(value).expanduser()
            if not path.is_file():
                names = ", ".join(sorted(entries))
                raise CheckpointNotFound(f"checkpoint not found: {value} (a file, or a name that downloads the "
                                         f"official weights: {names})")
            out.append(str(path))
            continue
        entry = entries[value]
        if is_cached(entry, folder):
            out.append(str(folder / entry.filename))
            continue
        if offline:
            failed.append(entry)
            out.append(None)
            continue
        try:
            out.append(str(download(entry, folder, progress)))
        except UserError as exc:
            if exc.__cause__ is None:  # hash / size mismatch: its own message
                raise
            failed.append(entry)
            reasons.append(str(exc.__cause__))
            out.append(None)
    if failed:
        raise _unreachable(failed, folder, "; ".join(dict.fromkeys(reasons)) if reasons else None)
    return out


def resolve(value: Optional[str], root: Optional[str] = None, progress: bool = True) -> Optional[str]:
    return resolve_many([value], root, progress)[0]


def _list(root: Path) -> int:
    for entry in table().values():
        path = root / entry.filename
        if path.is_file():
            state = "cached" if is_cached(entry, root) else "INVALID (hash mismatch: delete it and fetch again)"
            size = f"{path.stat().st_size / 1e6:.1f} MB"
        else:
            state, size = "not cached", "-"
        print(f"{entry.name:<11} {state:<11} {size:>10}  {path}  <- {entry.url}")
    return 0


@report_user_errors
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mobilesam_se.weights", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help=f"cache folder (default: ${ENV_DIR}, $TORCH_HOME/mobilesam_se, ...)")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download (and verify) checkpoints into the cache")
    fetch.add_argument("names", nargs="*", help=f"default: all of {sorted(table())}")
    fetch.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="the known checkpoints and whether they are cached")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = weights_dir(args.dir)
    if args.command == "list":
        return _list(root)
    names = args.names or sorted(table())
    unknown = [n for n in names if n not in table()]
    if unknown:
        raise UserError(f"unknown checkpoint name(s) {unknown}; known: {sorted(table())}")
    for name, path in zip(names, resolve_many(names, args.dir, progress=not args.no_progress)):
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
