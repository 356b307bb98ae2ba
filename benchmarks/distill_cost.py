"""What each distillation preset costs: CPU time and peak memory per step at a small size, FLOPs at 1024.

    python -m benchmarks.distill_cost measure --image-size 128 --grid 4 --steps 3   # one process per preset
    python -m benchmarks.distill_cost flops --image-size 1024 --grid 32             # counted, nothing runs

`measure` runs real training steps (everything loss + the preset's distillation, AdamW step) of the
MobileSAM student with the preset's teachers in their real architectures (random weights: the cost
does not depend on the values), on one CPU thread, each preset in its own process so that the peak
resident memory (ru_maxrss) is the preset's alone. `flops` counts with torch.utils.flop_counter on
meta tensors (no memory, no time): student forward + backward, each teacher's image encoder, and
the teacher decodes of the step's prompt grid that the decoder-side terms need. FLOP = 2 x MAC.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

PRESETS = ("none", "encoder", "seed", "full")
REPO = Path(__file__).resolve().parents[1]


def _cfg(preset: str, image_size: int, grid: int):
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.hydra_utils import compose_cfg  # the same composition as run.py

    return compose_cfg([f"distillation={preset}", "model.multimask_output=false", f"model.image_size={image_size}",
                        f"dataset.grid_points={grid}", "logger=none"])


def _random_teacher(spec: Any, image_size: int):
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.models.sam_vit import SAM_VIT_CONFIGS
    from mobilesam_se.models.teachers import SAM_VIT_MODELS, build_sam_vit_teacher, freeze_teacher

    if spec.model == "mobilesam":
        return freeze_teacher(build_mobilesam(image_size, "mobilesam"))
    return freeze_teacher(build_sam_vit_teacher(SAM_VIT_CONFIGS[SAM_VIT_MODELS[spec.model]], image_size, "mobilesam"))


def _distiller(cfg, image_size: int):
    from mobilesam_se.distill import Distiller, Teacher, check_distillation, enabled_terms
    from mobilesam_se.distill.plateau import PlateauLambda

    if not cfg.distillation.enabled:
        return None
    teachers = [Teacher(s, _random_teacher(s, image_size)) for s in check_distillation(cfg)]
    return Distiller(teachers, enabled_terms(cfg.distillation), PlateauLambda(1.0),
                     multimask_output=cfg.model.multimask_output, points_per_batch=cfg.model.points_per_batch)


def _batch(image_size: int, grid: int):
    from mobilesam_se.data.sample import Batch
    from mobilesam_se.prompts import grid_points_for_model

    side = image_size // 4
    masks = torch.zeros(3, side, side, dtype=torch.bool)
    masks[0, : side // 2, : side // 2] = True
    masks[1, side // 2 :, : side // 3] = True
    masks[2, side // 4 : side // 2, side // 2 :] = True
    return Batch(image=torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)),
                 points=grid_points_for_model(grid, (image_size, image_size), image_size)[None],
                 masks_lowres=[masks], input_size=[(image_size, image_size)], file_name=[""], image_id=["0"])


def measure_one(preset: str, image_size: int, grid: int, steps: int) -> Dict[str, Any]:
    from hydra.utils import instantiate

    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.objective import SegmentEverythingObjective

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = _cfg(preset, image_size, grid)
    student = build_mobilesam(image_size, "mobilesam").train()
    distiller = _distiller(cfg, image_size)
    objective = SegmentEverythingObjective(student, instantiate(cfg.loss), distiller=distiller,
                                          multimask_output=cfg.model.multimask_output,
                                          points_per_batch=cfg.model.points_per_batch)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    batch = _batch(image_size, grid)
    times: List[float] = []
    for i in range(steps + 1):  # the first step warms up (allocator, lazy inits) and is not counted
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        objective(batch)["loss"].backward()
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    teachers = [] if distiller is None else [t.spec.model for t in distiller.teachers]
    return {"preset": preset, "image_size": image_size, "grid": grid, "teachers": teachers,
            "step_s": statistics.median(times), "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def _count(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flops(image_size: int, grid: int) -> List[Dict[str, Any]]:
    """FLOPs per image and step, counted on meta tensors."""
    from mobilesam_se.losses.everything import EverythingLoss  # noqa: F401 - import side effects before meta
    from mobilesam_se.models.build import build_mobilesam
    from mobilesam_se.prompts import grid_points_for_model

    meta = torch.device("meta")
    points = grid_points_for_model(grid, (image_size, image_size), image_size)[None].to(meta)
    with meta:
        student = build_mobilesam(image_size, "mobilesam")
    pixels = torch.empty(1, 3, image_size, image_size, device=meta)

    def student_step() -> None:
        out = student(pixels, points, multimask_output=False, points_per_batch=64)
        (out.masks.float().mean() + out.iou_pred.float().mean() + out.embeddings.float().mean()).backward()

    parts = {"student_fwd_bwd": _count(student_step),
             "student_encoder_fwd": _count(lambda: student.encode(pixels))}
    enc: Dict[str, float] = {}
    dec: Dict[str, float] = {}
    for preset in PRESETS[1:]:
        cfg = _cfg(preset, image_size, grid)
        from mobilesam_se.distill import check_distillation

        for spec in check_distillation(cfg):
            if spec.model in enc:
                continue
            with meta:
                teacher = _random_teacher(spec, image_size)
            with torch.no_grad():
                emb = torch.empty(1, 256, image_size // 16, image_size // 16, device=meta)
                enc[spec.model] = _count(lambda: teacher.encode(pixels))
                dec[spec.model] = _count(lambda: teacher.predict_grid(emb, points, False, points_per_batch=64,
                                                                      return_features=True))
    rows = []
    for preset in PRESETS:
        cfg = _cfg(preset, image_size, grid)
        specs = check_distillation(cfg) if cfg.distillation.enabled else []
        from mobilesam_se.distill import enabled_terms
        from mobilesam_se.distill.distiller import DECODER_TERMS

        terms = enabled_terms(cfg.distillation) if specs else {}
        decodes = any(t in terms for t in DECODER_TERMS)
        t_enc = sum(enc[s.model] for s in specs)
        t_dec = sum(dec[s.model] for s in specs) if decodes else 0.0
        rows.append({"preset": preset, "teachers": [s.model for s in specs], "student_fwd_bwd": parts["student_fwd_bwd"],
                     "teacher_encoders": t_enc, "teacher_decoders": t_dec,
                     "total": parts["student_fwd_bwd"] + t_enc + t_dec,
                     "total_cached": parts["student_fwd_bwd"] + t_dec})
    return [{"image_size": image_size, "grid": grid, "student_encoder_fwd": parts["student_encoder_fwd"],
             "teacher_encoder_fwd": enc, "teacher_decode_fwd": dec}] + rows


def main(argv: List[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("measure", "flops", "one"))
    p.add_argument("--preset", default="full")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--grid", type=int, default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=None, help="write the JSON here too")
    a = p.parse_args(argv)
    if a.what == "one":
        print(json.dumps(measure_one(a.preset, a.image_size or 128, a.grid or 4, a.steps)))
        return
    if a.what == "flops":
        result: Any = flops(a.image_size or 1024, a.grid or 32)
        for r in result[1:]:
            print(f"{r['preset']:<8} student {r['student_fwd_bwd'] / 1e12:.3f}  teacher enc {r['teacher_encoders'] / 1e12:.3f}  "
                  f"teacher dec {r['teacher_decoders'] / 1e12:.3f}  total {r['total'] / 1e12:.3f} TFLOP "
                  f"(cached {r['total_cached'] / 1e12:.3f})")
        print(json.dumps(result[0]))
    else:
        result = []
        for preset in PRESETS:  # a process each: ru_maxrss is the peak of the whole process
            cmd = [sys.executable, "-m", "benchmarks.distill_cost", "one", "--preset", preset,
                   "--image-size", str(a.image_size or 128), "--grid", str(a.grid or 4), "--steps", str(a.steps)]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{row['preset']:<8} {row['step_s']:.2f} s/step  peak RSS {row['peak_rss_mb']:.0f} MB  {row['teachers']}",
                  flush=True)
            result.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
