"""Decoder forward throughput: prompts / second, ours vs the official decoder, same weights and inputs."""
from __future__ import annotations

from typing import Dict

import torch

from benchmarks.common import (
    autocast, build_pair, interleaved_times, make_inputs, median, our_decode, ref_decode, rel_err,
)


def bench_decoder_forward(image_size: int, prompts: int, reps: int, device: str, dtype: str,
                          decoder_size: str = "mobilesam") -> Dict[str, object]:
    """Everything-mode forward of `prompts` single-point prompts on one image embedding.

    ref: `mobile_sam` PromptEncoder + MaskDecoder, called as `SamPredictor.predict_torch` calls them
    (P prompts of one point, multimask). ours: `SamModel.predict_grid` with all P prompts in one
    `points_per_batch`.
    """
    pair = build_pair(image_size, decoder_size, device=device)
    pair.ours.eval(), pair.ref_md.eval(), pair.ref_pe.eval()
    emb, pts = make_inputs(pair, prompts, device)
    with torch.no_grad(), autocast(device, dtype):
        ref_m, ref_i = ref_decode(pair, emb, pts)
        our_m, our_i = our_decode(pair, emb, pts, points_per_batch=prompts)
        err = {"masks": rel_err(our_m, ref_m), "iou_pred": rel_err(our_i, ref_i)}
        del ref_m, ref_i, our_m, our_i
        cpu: Dict[str, list] = {}
        times = interleaved_times(
            {"ref": lambda: ref_decode(pair, emb, pts), "ours": lambda: our_decode(pair, emb, pts, points_per_batch=prompts)},
            reps, device, cpu_times=cpu,
        )
    ref_s, ours_s = median(times["ref"]), median(times["ours"])
    return {
        "image_size": image_size, "decoder": decoder_size, "embedding": f"{pair.grid}x{pair.grid}", "prompts": prompts, "reps": reps,
        "ref_s": ref_s, "ours_s": ours_s,
        "ref_prompts_per_s": prompts / ref_s, "ours_prompts_per_s": prompts / ours_s,
        "speedup": ref_s / ours_s, "max_rel_err_vs_ref": err, "times_s": times,
        "cpu_times_s": cpu, "cpu_speedup": median(cpu["ref"]) / median(cpu["ours"]),
    }
