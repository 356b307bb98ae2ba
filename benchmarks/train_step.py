"""Training step (forward + backward over P prompts): time and peak memory per prompt."""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Pair, autocast, build_pair, interleaved_times, make_inputs, median, our_decode, peak_memory_bytes, ref_decode,
)

MB = float(1 << 20)


def _loss(masks: torch.Tensor, iou: torch.Tensor, iou_target: torch.Tensor) -> torch.Tensor:
    """A simple stand-in for the real losses: touches every mask logit and every IoU prediction."""
    return masks.float().sigmoid().mean() + F.mse_loss(iou.float(), iou_target)


def make_step(pair: Pair, variant: str, emb: torch.Tensor, pts: torch.Tensor, chunk: int, device: str,
              dtype: str) -> Callable[[], None]:
    """One forward + backward. The embedding requires grad (the encoder is trained too)."""
    P = pts.shape[1]
    target = torch.rand(P, 3, generator=torch.Generator().manual_seed(2)).to(device)
    params = list(pair.ours.parameters()) if variant.startswith("ours") else list(pair.ref_md.parameters()) + list(pair.ref_pe.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x = emb.detach().requires_grad_(True)
        with autocast(device, dtype):
            if variant == "ref":
                masks, iou = ref_decode(pair, x, pts)
            elif variant == "ours_ckpt":
                masks, iou = our_decode(pair, x, pts, points_per_batch=chunk, activation_checkpointing=True)
            elif variant == "ours":
                masks, iou = our_decode(pair, x, pts, points_per_batch=P)
            else:
                raise ValueError(variant)
        _loss(masks, iou, target).backward()

    return step


def bench_train_step(image_size: int, prompts: int, chunk: int, reps: int, device: str, dtype: str,
                     mem_prompts: Optional[list] = None, decoder_size: str = "mobilesam",
                     ckpt_mem_prompts: Optional[list] = None) -> Dict[str, object]:
    """Time (interleaved, median) and peak memory per prompt of ref / ours (checkpointed per `chunk`
    prompts) / ours without checkpointing. Memory is also measured at the prompt counts in
    `mem_prompts` (and, for the checkpointed variant, `ckpt_mem_prompts`: its per-prompt slope is
    small, so it needs a wider spread) to fit peak = fixed + per_prompt * P between the smallest and
    largest count, and extrapolate to a full 32x32 grid x 3 masks."""
    pair = build_pair(image_size, decoder_size, device=device)
    pair.ours.train(), pair.ref_md.train(), pair.ref_pe.train()
    variants = ("ref", "ours_ckpt", "ours")
    emb, pts = make_inputs(pair, prompts, device)
    steps = {v: make_step(pair, v, emb, pts, chunk, device, dtype) for v in variants}
    cpu: Dict[str, list] = {}
    times = interleaved_times(steps, reps, device, cpu_times=cpu)

    counts = {v: sorted(set((mem_prompts or []) + [prompts] + ((ckpt_mem_prompts or []) if v == "ours_ckpt" else [])))
              for v in variants}
    memory: Dict[str, Dict[int, int]] = {v: {} for v in variants}
    for n in sorted(set().union(*counts.values())):
        e, p = make_inputs(pair, n, device)
        for v in variants:
            if n in counts[v]:
                memory[v][n] = peak_memory_bytes(make_step(pair, v, e, p, chunk, device, dtype), device)

    out: Dict[str, object] = {
        "image_size": image_size, "decoder": decoder_size, "prompts": prompts, "ckpt_chunk": chunk, "reps": reps,
        "times_s": times, "cpu_times_s": cpu, "peak_bytes": {v: {str(k): b for k, b in m.items()} for v, m in memory.items()},
    }
    for v in variants:
        out[f"{v}_s"] = median(times[v])
        out[f"{v}_peak_mb_per_prompt"] = memory[v][prompts] / MB / prompts
        if len(counts[v]) >= 2:
            lo, hi = counts[v][0], counts[v][-1]
            slope = (memory[v][hi] - memory[v][lo]) / (hi - lo)
            fixed = memory[v][lo] - slope * lo
            out[f"{v}_fit_mb"] = {"fixed": fixed / MB, "per_prompt": slope / MB}
            grid = 32 * 32  # the full everything grid; 3 candidates per prompt (multimask)
            out[f"{v}_grid1024_gb"] = (fixed + slope * grid) / MB / 1024
    out["speedup"] = out["ref_s"] / out["ours_ckpt_s"]
    out["cpu_speedup"] = median(cpu["ref"]) / median(cpu["ours_ckpt"])
    out["cpu_speedup_no_ckpt"] = median(cpu["ref"]) / median(cpu["ours"])
    out["speedup_no_ckpt"] = out["ref_s"] / out["ours_s"]
    out["memory_ratio"] = out["ref_peak_mb_per_prompt"] / out["ours_ckpt_peak_mb_per_prompt"]
    out["memory_ratio_no_ckpt"] = out["ref_peak_mb_per_prompt"] / out["ours_peak_mb_per_prompt"]
    return out
