"""On-disk cache of teacher image embeddings (filled during training or by `distill.cache`).

One fp16 file per (teacher, image): <cache_dir>/<teacher name>/<aa>/<sha1>.pt holding the embedding
and the key it was computed under. The key is the image (file path + size + mtime, or a hash of
the pixels when the file is not on disk), the teacher's weights (checkpoint path + size + mtime, or
tiny + seed), the image size and PREPROCESS_VERSION; the file is named by the hash of the whole
key, so runs of two configs (another image size, another checkpoint) can share one folder. Any
entry that cannot be read, is not ours, holds another key or a tensor of the wrong shape is a miss:
warned about, recomputed and overwritten. A changed image, checkpoint or resolution is a new key.
Only the encoder is cached: it is the expensive part (ViT-H); the decoders run live on the
cached embeddings, since their outputs depend on the (sub-sampled) prompts of each step.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

log = logging.getLogger(__name__)

# Bump when `transforms.preprocess_image` (resize, normalisation, padding) changes.
PREPROCESS_VERSION = "resize-longest-pil-bilinear/sam-mean-std/pad-bottom-right:v1"


def image_identity(file_name: Optional[str], pixels: Optional[torch.Tensor]) -> str:
    """The image part of the key: file path + size + mtime, else a hash of the preprocessed pixels."""
    if file_name and os.path.isfile(file_name):
        st = os.stat(file_name)
        return f"file:{os.path.abspath(file_name)}:{st.st_size}:{st.st_mtime_ns}"
    if pixels is None:
        return f"missing-file:{file_name}"
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return "pixels:" + hashlib.sha1(data).hexdigest()


class EmbeddingCache:
    """Per-image fp16 embeddings of one teacher; `shape` (C, h, w), when given, is checked on load."""

    def __init__(
        self, root: os.PathLike | str, teacher_name: str, teacher_fingerprint: str, image_size: int,
        shape: Optional[Tuple[int, int, int]] = None,
    ) -> None:
        self.root = Path(root) / teacher_name
        self.teacher = teacher_fingerprint
        self.image_size = int(image_size)
        self.shape = tuple(shape) if shape is not None else None
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        looked = self.hits + self.misses
        return self.hits / looked if looked else 0.0

    def key(self, file_name: Optional[str], pixels: Optional[torch.Tensor]) -> Dict[str, Any]:
        return {
            "image": image_identity(file_name, pixels),
            "teacher": self.teacher,
            "image_size": self.image_size,
            "preprocess": PREPROCESS_VERSION,
        }

    def path(self, key: Dict[str, Any]) -> Path:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.pt"

    def holds_all(self, files: Sequence[str]) -> bool:
        """Whether every file has an entry (by name only: a bad entry found later is still a miss)."""
        return all(self.path(self.key(f, None)).is_file() for f in files)

    def _miss(self, path: Path, why: Optional[str]) -> None:
        self.misses += 1
        if why is not None:
            log.warning("teacher cache entry %s %s: recomputing and overwriting it", path, why)

    def load(self, key: Dict[str, Any]) -> Optional[torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            self._miss(path, None)
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is a miss, recomputed
            self._miss(path, f"is unreadable ({type(e).__name__}: {e})")
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("embeddings"), torch.Tensor):
            self._miss(path, "is not a teacher-cache entry")
            return None
        if entry.get("key") != key:
            self._miss(path, "holds another key")
            return None
        emb = entry["embeddings"]
        if self.shape is not None and tuple(emb.shape) != self.shape:
            self._miss(path, f"has shape {tuple(emb.shape)}, expected {self.shape}")
            return None
        self.hits += 1
        return emb

    def save(self, key: Dict[str, Any], embeddings: torch.Tensor) -> None:
        """Atomically (temp file + rename), so concurrent ranks and killed runs leave whole files."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": key, "embeddings": embeddings.detach().to("cpu", torch.float16).contiguous()}, f)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


