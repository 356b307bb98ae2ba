"""Device and autocast precision from their config names, one rule for training and every CLI."""
from __future__ import annotations

from typing import Optional

import torch

from mobilesam_se.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_device(name: str, key: str = "device") -> torch.device:
    """`auto`: CUDA when available, else the CPU. `key` names the config key in the error."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available: pass {key}=cpu (or {key}=auto)")
    return torch.device(name)


def resolve_autocast(precision: str, device: torch.device, key: str = "precision") -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. `auto`: bf16 on CUDA, fp32 on the CPU (bf16 there only
    when asked for: it changes the masks)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "fp32":
        return None
    raise ConfigError(f"{key} must be one of {'|'.join(PRECISIONS)}, got {precision!r}")


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """An autocast context that is a no-op for fp32 (dtype None)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN with avx512_bf16 / AMX). Without them
    PyTorch emulates bf16: measured on an AVX2-only EPYC (torch 2.14, 1 thread), a 4096x256x256
    matmul took 413 ms in bf16 against 13 ms in fp32, a 3x3 conv 170x longer."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
