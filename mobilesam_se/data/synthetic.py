"""Deterministic synthetic "segment everything" scenes, written in the folder layout.

Each image holds many overlapping objects (ellipses, rotated rectangles, polygons, smooth blobs)
of varied size, each with its own texture, over a textured background, painted back to front.
An object's mask is exactly its *visible* part, so the masks of one image never overlap; objects
left with almost nothing visible are removed from the scene altogether (not only from the
annotations), so every painted pixel belongs to an annotated object or to the background.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import cv2
import numpy as np

from mobilesam_se.data.base import Decoded, MaskDataset, stack_masks
from mobilesam_se.data.folder import FolderDataset
from mobilesam_se.data.folder_writer import write_folder_sample

# Bump when the drawing code changes, so cached datasets are regenerated.
GENERATOR_VERSION = 2
META_FILE = "meta.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class SyntheticParams:
    num_images: int
    image_hw: Tuple[int, int]
    seed: int
    min_objects: int = 4
    max_objects: int = 12
    min_visible_fraction: float = 0.002  # of the image area; smaller visible parts are removed
    object_size: Tuple[float, float] = (0.05, 0.35)  # radius range, fraction of the short side

    def as_json(self) -> dict:
        d = asdict(self)
        d["image_hw"] = list(self.image_hw)
        d["object_size"] = list(self.object_size)
        d["version"] = GENERATOR_VERSION
        return d

    def digest(self) -> str:
        return hashlib.sha1(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()[:12]


# ---- drawing ----------------------------------------------------------------------------------
def _texture(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 texture: stripes, checker, smooth noise or a gradient, in two colours."""
    h, w = yy.shape
    c1, c2 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    kind = int(rng.integers(4))
    side = min(h, w)
    if kind == 0:  # stripes at a random angle
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, max(4.0, 0.15 * side))
        t = (np.floor((xx * np.cos(theta) + yy * np.sin(theta)) / period) % 2).astype(np.float32)
    elif kind == 1:  # checkerboard
        cell = rng.uniform(3, max(4.0, 0.12 * side))
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
    elif kind == 2:  # smooth value noise: coarse random grid, bilinearly upsampled
        step = int(rng.integers(4, 33))
        coarse = rng.random((h // step + 2, w // step + 2), dtype=np.float32)
        t = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    else:  # linear gradient
        theta = rng.uniform(0, 2 * np.pi)
        proj = xx * np.cos(theta) + yy * np.sin(theta)
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    return (c1 + (c2 - c1) * t[..., None]).astype(np.uint8)


def _shape(rng: np.random.Generator, h: int, w: int, object_size: Tuple[float, float] = (0.05, 0.35)) -> np.ndarray:
    """(H, W) bool: one random ellipse / rotated rectangle / polygon / blob, possibly cut by the border."""
    side = min(h, w)
    lo, hi = object_size
    r = side * float(np.exp(rng.uniform(np.log(lo), np.log(hi))))  # log-uniform: many small, some big
    cx, cy = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
    canvas = np.zeros((h, w), dtype=np.uint8)
    kind = int(rng.integers(4))
    if kind == 0:
        axes = (max(1, round(r)), max(1, round(r * rng.uniform(0.3, 1.0))))
        cv2.ellipse(canvas, (round(cx), round(cy)), axes, rng.uniform(0, 180), 0, 360, 1, -1, cv2.LINE_8)
        return canvas.astype(bool)
    if kind == 1:
        pts = cv2.boxPoints(((cx, cy), (2 * r, 2 * r * rng.uniform(0.3, 1.0)), rng.uniform(0, 180)))
    elif kind == 2:  # triangle to heptagon, star-shaped around the centre
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, n))
        radii = r * rng.uniform(0.5, 1.0, n)
        pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    else:  # blob: a radius that wobbles smoothly with the angle
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        radius = np.ones_like(angles)
        for k in range(2, 6):
            radius += rng.uniform(0, 0.5 / k) * np.sin(k * angles + rng.uniform(0, 2 * np.pi))
        radius = r * np.maximum(radius, 0.2)
        pts = np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1)
    cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 1, cv2.LINE_8)
    return canvas.astype(bool)


def _bbox(mask: np.ndarray) -> Tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the True pixels, half-open; a 1x1 box at the origin for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return 0, 1, 0, 1
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _owner_map(shapes: List[np.ndarray], hw: Tuple[int, int]) -> np.ndarray:
    """Index of the front-most shape at each pixel (-1: background); later shapes are in front."""
    owner = np.full(hw, -1, dtype=np.int32)
    for k, shape in enumerate(shapes):
        owner[shape] = k
    return owner


def render_scene(
    rng: np.random.Generator,
    hw: Tuple[int, int],
    min_objects: int = 4,
    max_objects: int = 12,
    min_visible_fraction: float = 0.002,
    object_size: Tuple[float, float] = (0.05, 0.35),
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """One scene: (H, W, 3) uint8 RGB image and the visible mask of each object, back to front.
    `object_size`: the range of object radii as fractions of the short side (log-uniform)."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    background = _texture(rng, yy, xx)
    n = int(rng.integers(min_objects, max_objects + 1))
    if not 0 < object_size[0] <= object_size[1]:
        raise ValueError(f"object_size must be 0 < min <= max, got {tuple(object_size)}")
    shapes = [_shape(rng, h, w, tuple(object_size)) for _ in range(n)]
    # Each texture is drawn over its shape's bounding box only (in image coordinates), not the image.
    boxes = [_bbox(shape) for shape in shapes]
    textures = [_texture(rng, yy[y0:y1, x0:x1], xx[y0:y1, x0:x1]) for (y0, y1, x0, x1) in boxes]
    min_area = max(16, round(min_visible_fraction * h * w))
    areas = np.bincount(_owner_map(shapes, hw).ravel() + 1, minlength=n + 1)[1:]
    kept = [k for k in range(n) if areas[k] >= min_area]
    # Removing an object only uncovers what lay beneath, so the kept ones cannot shrink: one
    # recomputation suffices and every kept object still shows >= min_area pixels.
    owner = _owner_map([shapes[k] for k in kept], hw)
    image = background
    masks = []
    for j, k in enumerate(kept):
        visible = owner == j
        y0, y1, x0, x1 = boxes[k]
        image[y0:y1, x0:x1][visible[y0:y1, x0:x1]] = textures[k][visible[y0:y1, x0:x1]]
        masks.append(visible)
    # Mild sensor noise, so flat regions are not trivially separable by exact colour.
    image = np.clip(image.astype(np.int16) + rng.integers(-4, 5, size=(h, w, 1), dtype=np.int16), 0, 255)
    return image.astype(np.uint8), masks


def _image_hw(rng: np.random.Generator, image_hw: Tuple[int, int]) -> Tuple[int, int]:
    """Jitter the aspect ratio (3:4 to 4:3 around the requested one), within image_hw."""
    h, w = image_hw
    aspect = float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
    if aspect >= 1:
        return max(8, round(h / aspect)), w
    return h, max(8, round(w * aspect))


# ---- dataset files ----------------------------------------------------------------------------
def generate_synthetic_dataset(
    root: str | os.PathLike,
    num_images: int,
    image_hw: Tuple[int, int] = (256, 256),
    seed: int = 0,
    *,
    min_objects: int = 4,
    max_objects: int = 12,
    min_visible_fraction: float = 0.002,
    object_size: Tuple[float, float] = (0.05, 0.35),
) -> Path:
    """Write `num_images` scenes to root (which must be absent or empty) plus root/meta.json.

    Image i depends only on (seed, i), so the files are identical byte for byte on every run.
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    hw = (int(image_hw[0]), int(image_hw[1]))
    object_size = (float(object_size[0]), float(object_size[1]))
    params = SyntheticParams(num_images, hw, seed, min_objects, max_objects, min_visible_fraction, object_size)
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root}: not empty; generate into a new folder (or use ensure_synthetic_dataset)")
    root.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        hw_i = _image_hw(rng, params.image_hw)
        image, masks = render_scene(rng, hw_i, min_objects, max_objects, min_visible_fraction, object_size)
        write_folder_sample(root, f"{i:06d}", image, masks)
    # Written last: its presence marks a complete dataset.
    (root / META_FILE).write_text(json.dumps(params.as_json(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return root


def _meta_matches(root: Path, params: SyntheticParams) -> bool:
    try:
        return json.loads((root / META_FILE).read_text(encoding="utf-8")) == params.as_json()
    except (OSError, ValueError):
        return False


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    num_images: int,
    image_hw: Tuple[int, int] = (256, 256),
    seed: int = 0,
    **options,
) -> Path:
    """Return root, generating it first unless its meta.json already records these parameters.

    Generation goes to a temporary sibling folder that is renamed into place, so a crash or a
    concurrent reader never sees half a dataset; a changed parameter regenerates. Concurrent
    generators (several ranks) take turns on a lock file beside root: without it, one could find
    root just renamed into place, take it for stale and move it away under a rank reading it.
    """
    root = Path(root).expanduser()
    if "object_size" in options:
        options["object_size"] = (float(options["object_size"][0]), float(options["object_size"][1]))
    params = SyntheticParams(num_images, (int(image_hw[0]), int(image_hw[1])), seed, **options)
    if _meta_matches(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _meta_matches(root, params):  # another process made it while this one waited
            return root
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        try:
            generate_synthetic_dataset(tmp, num_images, params.image_hw, seed, **options)
            stale = None
            if root.exists():  # generated with other parameters: replace it
                stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
                os.replace(root, stale / "data")
            os.rename(tmp, root)
            if stale is not None:
                shutil.rmtree(stale, ignore_errors=True)
            return root
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def default_synthetic_dir() -> Path:
    """${MOBILESAM_SE_DATA:-~/.cache/mobilesam_se}/synthetic"""
    return Path(os.environ.get("MOBILESAM_SE_DATA", "~/.cache/mobilesam_se")).expanduser() / "synthetic"


def split_seed(seed: int, split: str) -> int:
    """Independent generator seeds for train and val, derived from one user seed."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1)[0])


class SyntheticDataset(FolderDataset):
    """A FolderDataset over generated scenes, created on first use.

    The data lives in <root>/<params-hash>, root defaulting to
    ${MOBILESAM_SE_DATA:-~/.cache/mobilesam_se}/synthetic; train and val use different seeds,
    hence different folders. Other keyword arguments are the shared dataset options.
    """

    def __init__(
        self,
        root: Optional[str | os.PathLike] = None,
        num_images: int = 64,
        image_hw: Tuple[int, int] = (256, 256),
        split: str = "train",
        seed: int = 0,
        min_objects: int = 4,
        max_objects: int = 12,
        min_visible_fraction: float = 0.002,
        object_size: Tuple[float, float] = (0.05, 0.35),
        **kwargs,
    ) -> None:
        self.split = split
        options = dict(min_objects=min_objects, max_objects=max_objects, min_visible_fraction=min_visible_fraction,
                       object_size=(float(object_size[0]), float(object_size[1])))
        params = SyntheticParams(num_images, (int(image_hw[0]), int(image_hw[1])), split_seed(seed, split), **options)
        parent = Path(root).expanduser() if root is not None else default_synthetic_dir()
        path = ensure_synthetic_dataset(parent / params.digest(), num_images, params.image_hw, params.seed, **options)
        super().__init__(path, **kwargs)


@dataclass(frozen=True)
class StreamRecord:
    image_id: str
    image_path: Path
    index: int


class SyntheticStreamDataset(MaskDataset[StreamRecord]):
    """`num_images` fresh scenes per epoch, rendered in memory: scene i of epoch e depends only on
    (seed, e, i), so runs repeat exactly and a resumed epoch sees the same scenes.

    A fixed set of a few dozen scenes is memorised by a from-scratch model long before it learns
    to segment (train recall 0.56 against val 0.11 after 180 epochs of 48 scenes); a stream of
    distinct scenes costs a few milliseconds of drawing per image and removes that gap. The
    trainer calls `set_epoch` before each epoch, as for a DistributedSampler.
    """

    def __init__(
        self,
        num_images: int = 64,
        image_hw: Tuple[int, int] = (256, 256),
        split: str = "train",
        seed: int = 0,
        min_objects: int = 4,
        max_objects: int = 12,
        min_visible_fraction: float = 0.002,
        object_size: Tuple[float, float] = (0.05, 0.35),
        **kwargs,
    ) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not 1 <= min_objects <= max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
        self.num_images = int(num_images)
        self.image_hw = (int(image_hw[0]), int(image_hw[1]))
        self.split = split
        self.stream_seed = split_seed(seed, split)
        self.scene_options = dict(min_objects=min_objects, max_objects=max_objects,
                                  min_visible_fraction=min_visible_fraction,
                                  object_size=(float(object_size[0]), float(object_size[1])))
        self.epoch = 0
        super().__init__(**kwargs)

    @property
    def source(self) -> str:
        return f"synthetic stream (split {self.split}, seed {self.stream_seed})"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        # Ids and paths name the scene (epoch and index): anything keyed by them (a teacher-embedding
        # cache, picture file names) never mistakes one epoch's scene for another's.
        self._records = self._scan()[0]

    def _scan(self) -> Tuple[List[StreamRecord], List]:
        e = getattr(self, "epoch", 0)
        return [StreamRecord(f"e{e:04d}_{i:06d}", Path(f"stream-{self.split}/epoch{e:04d}/{i:06d}"), i)
                for i in range(self.num_images)], []

    def _decode(self, record: StreamRecord) -> Decoded:
        rng = np.random.default_rng(np.random.SeedSequence([self.stream_seed, self.epoch, record.index]))
        image, masks = render_scene(rng, _image_hw(rng, self.image_hw), **self.scene_options)
        return Decoded(image, stack_masks(masks, image.shape[:2]))

    def validate(self, progress: bool = False) -> List:
        """Generated scenes have nothing to check; skipping the pass saves drawing a whole epoch."""
        return []
