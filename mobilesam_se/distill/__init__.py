"""Knowledge distillation from frozen SAM / MobileSAM teachers (project issue 4).

`build_distiller(cfg)` turns `cfg.distillation` into a `Distiller` the trainer calls after each
everything-mode step; see docs/distillation.md for the terms, presets and the teacher cache.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

from mobilesam_se.distill.embedding_cache import EmbeddingCache
from mobilesam_se.distill.distiller import (
    SAME_WIDTH_TERMS,
    TERM_NAMES,
    Distiller,
    MaskTeacherSettings,
    Teacher,
)
from mobilesam_se.distill.plateau import PlateauLambda
from mobilesam_se.models.build import DECODER_SIZES
from mobilesam_se.models.teachers import (
    TeacherSpec,
    build_teacher_model,
    check_teacher_files,
    expected_teacher_dim,
    teacher_dim,
    teacher_fingerprint,
)

# The student's embedding / decoder width per `model.size` (see models/build.py).
STUDENT_DIMS = {"full": DECODER_SIZES["sam"]["dim"], "tiny": DECODER_SIZES["tiny"]["dim"]}
TINY_TEACHER = {"name": "tiny", "model": "tiny", "checkpoint": None, "weight": 1.0, "seed": 0}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_config(node) else node


def teacher_specs(dcfg: Any) -> List[TeacherSpec]:
    """The configured teachers, or the one tiny teacher with `distillation.tiny_teacher=true`."""
    raw = [TINY_TEACHER] if dcfg.get("tiny_teacher", False) else list(_plain(dcfg.teachers) or [])
    if not raw:
        raise ValueError("distillation.enabled=true needs distillation.teachers (or distillation.tiny_teacher=true)")
    return [TeacherSpec(**{k: t[k] for k in ("name", "model", "checkpoint", "weight", "seed") if k in t}) for t in raw]


def enabled_terms(dcfg: Any) -> Dict[str, Dict[str, Any]]:
    """name -> the term function's keyword weights, for the terms with enable=true."""
    out = {}
    for name, term in (_plain(dcfg.get("terms")) or {}).items():
        if name not in TERM_NAMES:
            raise ValueError(f"unknown distillation term {name!r}; known: {TERM_NAMES}")
        if term.get("enable", False):
            out[name] = {k: v for k, v in term.items() if k != "enable"}
    return out


def build_distiller(cfg: DictConfig, model_image_size: Optional[int] = None) -> Distiller:
    """Teachers at the student's image size, frozen; a missing checkpoint fails here, naming the file."""
    dcfg = cfg.distillation
    image_size = int(model_image_size or cfg.model.image_size)
    specs = teacher_specs(dcfg)
    check_teacher_files(specs)
    terms = enabled_terms(dcfg)
    student_dim = STUDENT_DIMS.get(cfg.model.get("size", "full"))
    tiny_dim = student_dim or STUDENT_DIMS["tiny"]
    same_width = [t for t in SAME_WIDTH_TERMS if t in terms]
    for spec in specs:  # before loading any multi-GB checkpoint
        width = expected_teacher_dim(spec, tiny_dim)
        if student_dim is not None and width != student_dim and same_width:
            # No learned projection: a student-side adapter would change what "the student" is and
            # need its own optimizer group; rkd and attention compare relations / maps and still apply.
            raise ValueError(
                f"teacher {spec.name!r} ({spec.model}) has width {width}, the student ({cfg.model.size}) {student_dim}: "
                f"terms {same_width} compare channels one to one; use a teacher of the same width or "
                "only the rkd / attention / dense_mask_logits terms"
            )
    teachers = []
    for spec in specs:
        model = build_teacher_model(spec, image_size, tiny_dim=tiny_dim)
        if student_dim is not None and same_width and teacher_dim(model) != student_dim:
            raise ValueError(f"teacher {spec.name!r}: width {teacher_dim(model)} != student width {student_dim}")
        cache = None
        if dcfg.get("cache_dir"):
            cache = EmbeddingCache(dcfg.cache_dir, spec.name, teacher_fingerprint(spec, tiny_dim), image_size)
        teachers.append(Teacher(spec, model, cache))
    dl = dcfg.dynamic_lambda
    schedule = PlateauLambda(dcfg.lambda_coef, dl.enabled, dl.factor, dl.patience, dl.min, dl.max, dl.mode)
    mask_teacher = MaskTeacherSettings(**(_plain(dcfg.get("mask_teacher")) or {}))
    matching = {k: cfg.matching[k] for k in ("fg_iou", "point_credit", "point_fg")} if "matching" in cfg else {}
    return Distiller(
        teachers, terms, schedule, multimask_output=cfg.model.multimask_output,
        points_per_batch=cfg.model.points_per_batch, mask_teacher=mask_teacher, matching=matching,
    )


__all__ = ["Distiller", "Teacher", "TeacherSpec", "build_distiller", "enabled_terms", "teacher_specs"]
