"""On-disk cache of teacher image embeddings (filled during training or by `distill.cache`).

One fp16 file per (teacher, image): <cache_dir>/<teacher name>/<aa>/<sha1>.pt holding the embedding
and the key it was computed under. The key is the image (file path + size + mtime, or a hash of
the pixels when the file is not on disk), the teacher's weights (checkpoint path + size + mtime, or
tiny + seed), the image size and PREPROCESS_VERSION. A file whose stored key differs is recomputed
and overwritten, so a changed image, checkpoint or resolution never serves stale embeddings.
Only the encoder is cached: it is the expensive part (ViT-H); the decoders run live on the
cached embeddings, since their outputs depend on the (sub-sampled) prompts of each step.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch

log = logging.getLogger(__name__)

# Bump when `transforms.preprocess_image` (resize, normalisation, padding) changes.
PREPROCESS_VERSION = "resize-longest-pil-bilinear/sam-mean-std/pad-bottom-right:v1"


def image_identity(file_name: Optional[str], pixels: torch.Tensor) -> str:
    """The image part of the key: file path + size + mtime, else a hash of the preprocessed pixels."""
    if file_name and os.path.isfile(file_name):
        st = os.stat(file_name)
        return f"file:{os.path.abspath(file_name)}:{st.st_size}:{st.st_mtime_ns}"
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return "pixels:" + hashlib.sha1(data).hexdigest()


class EmbeddingCache:
    """Per-image fp16 embeddings of one teacher."""

    def __init__(self, root: os.PathLike | str, teacher_name: str, teacher_fingerprint: str, image_size: int) -> None:
        self.root = Path(root) / teacher_name
        self.teacher = teacher_fingerprint
        self.image_size = int(image_size)
        self.hits = 0
        self.misses = 0

    def key(self, file_name: Optional[str], pixels: torch.Tensor) -> Dict[str, Any]:
        return {
            "image": image_identity(file_name, pixels),
            "teacher": self.teacher,
            "image_size": self.image_size,
            "preprocess": PREPROCESS_VERSION,
        }

    def path(self, key: Dict[str, Any]) -> Path:
        # Named by the image alone: a changed teacher / size / version overwrites the same file
        # instead of piling up stale ones.
        digest = hashlib.sha1(key["image"].encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.pt"

    def load(self, key: Dict[str, Any]) -> Optional[torch.Tensor]:
        path = self.path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is a miss, recomputed
            log.warning("unreadable cache entry %s (%s): recomputing", path, e)
            self.misses += 1
            return None
        if entry.get("key") != key:
            self.misses += 1
            return None
        self.hits += 1
        return entry["embeddings"]

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


