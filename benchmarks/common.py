"""Shared pieces of the benchmarks: matched model pairs, inputs, timing, memory.

Every comparison builds *our* prompt encoder + mask decoder and the *official* `mobile_sam` ones
with the same architecture and the same (perturbed random) weights, and feeds both the same image
embedding and points. Timings of the two are interleaved in one process (ref, ours, ref, ours, ...)
so that load from other processes hits both alike; figures are medians over the repetitions.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

Tensor = torch.Tensor


def quiet_imports() -> None:
    # The official package re-registers timm model names on import and timm warns about old paths.
    warnings.filterwarnings("ignore", message="Overwriting tiny_vit")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")


quiet_imports()

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Pair:
    """Our model (decoder side only) and the reference modules, sharing weights."""

    ours: nn.Module  # mobilesam_se SamModel with an identity image encoder
    ref_pe: nn.Module  # mobile_sam.modeling.PromptEncoder
    ref_md: nn.Module  # mobile_sam.modeling.MaskDecoder
    image_size: int
    dim: int

    @property
    def grid(self) -> int:
        return self.image_size // 16


def build_pair(image_size: int = 1024, decoder_size: str = "mobilesam", device: str = "cpu", seed: int = 0) -> Pair:
    """Matched (ours, reference) decoders at `image_size` with SAM's ('mobilesam') or the tiny decoder dims."""
    from mobile_sam.modeling import MaskDecoder as RefMaskDecoder
    from mobile_sam.modeling import PromptEncoder as RefPromptEncoder
    from mobile_sam.modeling import TwoWayTransformer as RefTwoWayTransformer

    from mobilesam_se.models.build import DECODER_SIZES, build_sam_head

    cfg = DECODER_SIZES[decoder_size]
    grid = image_size // 16
    torch.manual_seed(seed)
    ref_pe = RefPromptEncoder(
        embed_dim=cfg["dim"], image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
        mask_in_chans=cfg["mask_in_chans"],
    )
    ref_md = RefMaskDecoder(
        num_multimask_outputs=3,
        transformer=RefTwoWayTransformer(depth=cfg["depth"], embedding_dim=cfg["dim"], mlp_dim=cfg["mlp_dim"],
                                         num_heads=cfg["heads"]),
        transformer_dim=cfg["dim"], iou_head_depth=3, iou_head_hidden_dim=cfg["iou_hidden"],
    )
    # Perturb every float tensor so biases and norms are non-trivial (as the parity tests do).
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in (ref_pe, ref_md):
            for t in list(mod.parameters()) + list(mod.buffers()):
                if t.dtype.is_floating_point:
                    t.add_(0.05 * torch.randn(t.shape, generator=g))
    ours = build_sam_head(nn.Identity(), image_size, decoder_size)
    ours.prompt_encoder.load_state_dict(ref_pe.state_dict())
    ours.mask_decoder.load_state_dict(ref_md.state_dict())
    return Pair(ours.to(device), ref_pe.to(device), ref_md.to(device), image_size, cfg["dim"])


def make_inputs(pair: Pair, num_prompts: int, device: str = "cpu", seed: int = 1):
    """(embedding (1, C, g, g), points (1, P, 2) in the resized frame)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, pair.dim, pair.grid, pair.grid, generator=g)
    pts = torch.rand(1, num_prompts, 2, generator=g) * pair.image_size
    return emb.to(device), pts.to(device)


def ref_decode(pair: Pair, emb: Tensor, pts: Tensor, multimask_output: bool = True):
    """The official decoder called as `SamPredictor.predict_torch` calls it: P prompts of one point."""
    coords = pts[0][:, None, :]  # (P, 1, 2)
    labels = torch.ones(coords.shape[:2], dtype=torch.long, device=coords.device)
    sparse, dense = pair.ref_pe(points=(coords, labels), boxes=None, masks=None)
    masks, iou = pair.ref_md(
        image_embeddings=emb, image_pe=pair.ref_pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=multimask_output,
    )
    return masks, iou  # (P, M, 4g, 4g), (P, M)


def our_decode(pair: Pair, emb: Tensor, pts: Tensor, multimask_output: bool = True,
               points_per_batch: Optional[int] = None, activation_checkpointing: bool = False):
    pair.ours.set_grad_checkpointing(activation_checkpointing)
    out = pair.ours.predict_grid(emb, pts, multimask_output=multimask_output, points_per_batch=points_per_batch)
    return out.masks[0], out.iou_pred[0]


def autocast(device: str, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device, dtype=DTYPES[dtype])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(fns: Dict[str, Callable[[], object]], reps: int, device: str, warmup: int = 1,
                      cpu_times: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Wall-clock seconds of each callable, run round-robin `reps` times after `warmup` rounds.

    `cpu_times`, when given, also receives this process's CPU seconds per run (all threads): on a
    machine shared with other jobs, single-thread CPU time is a steadier figure than wall time.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - c0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def machine_info(device: str) -> Dict[str, object]:
    import platform

    info: Dict[str, object] = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- peak memory ---------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_cpu_peak() -> bool:
    """Free cached heap pages and reset the kernel's peak-RSS mark (VmHWM); False if unsupported."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def cpu_peak_supported() -> bool:
    return _reset_cpu_peak()


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory that `fn()` adds over what is live before it.

    CUDA: `torch.cuda.max_memory_allocated` over `memory_allocated` before the call.
    CPU: resident set size, in this process: freed heap pages are returned to the OS
    (`malloc_trim`), the peak-RSS mark is reset (`/proc/self/clear_refs` = 5), then peak (VmHWM)
    minus RSS before the call. This counts everything the step touches (activations, grads,
    allocator slack), like `ru_maxrss` of a fresh process minus its baseline, without a process.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    if not _reset_cpu_peak():
        raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs")
    base = _status_kb("VmRSS")
    fn()
    return int((_status_kb("VmHWM") - base) * 1024)
