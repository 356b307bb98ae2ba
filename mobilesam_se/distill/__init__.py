"""Knowledge distillation from frozen SAM / MobileSAM teachers (project issue 4).

`build_distiller(cfg)` turns `cfg.distillation` into a `Distiller` the trainer calls after each
everything-mode step; see docs/distillation.md for the terms, presets and the teacher cache.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

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
from mobilesam_se.errors import UserError
from mobilesam_se.models.build import DECODER_SIZES, size_name
from mobilesam_se.models.teachers import (
    NATIVE_SIZE,
    TeacherSpec,
    build_teacher_decoder_only,
    build_teacher_model,
    check_teacher_files,
    expected_teacher_dim,
    teacher_dim,
    teacher_fingerprint,
)
from mobilesam_se.weights import resolve_many

log = logging.getLogger(__name__)

# The student's embedding / decoder width per `model.size` (see models/build.py).
STUDENT_DIMS = {"mobilesam": DECODER_SIZES["mobilesam"]["dim"], "tiny": DECODER_SIZES["tiny"]["dim"]}
TINY_TEACHER = {"name": "tiny", "model": "tiny", "checkpoint": None, "weight": 1.0, "seed": 0}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_config(node) else node


def teacher_specs(dcfg: Any) -> List[TeacherSpec]:
    """The configured teachers, or the one tiny teacher with `distillation.tiny_teacher=true`."""
    raw = [TINY_TEACHER] if dcfg.get("tiny_teacher", False) else list(_plain(dcfg.teachers) or [])
    if not raw:
        raise UserError("distillation.enabled=true needs distillation.teachers (or distillation.tiny_teacher=true)")
    try:
        return [TeacherSpec(**{k: t[k] for k in ("name", "model", "checkpoint", "weight", "seed") if k in t}) for t in raw]
    except ValueError as exc:
        raise UserError(f"distillation.teachers: {exc}") from exc


def enabled_terms(dcfg: Any) -> Dict[str, Dict[str, Any]]:
    """name -> the term function's keyword weights, for the terms with enable=true."""
    out = {}
    for name, term in (_plain(dcfg.get("terms")) or {}).items():
        if name not in TERM_NAMES:
            raise UserError(f"unknown distillation term distillation.terms.{name}; known: {TERM_NAMES}")
        if term.get("enable", False):
            out[name] = {k: v for k, v in term.items() if k != "enable"}
    return out


def _student_dims(cfg: DictConfig) -> Tuple[Optional[int], int]:
    student_dim = STUDENT_DIMS.get(size_name(cfg.model.get("size", "mobilesam")))
    return student_dim, student_dim or STUDENT_DIMS["tiny"]


def check_distillation(cfg: DictConfig) -> List[TeacherSpec]:
    """Config-only checks, before anything is downloaded, decoded or built: the mode, the widths,
    warnings for a random teacher or one below its native size. Returns the teacher specs."""
    dcfg = cfg.distillation
    if cfg.get("prompted") is not None and cfg.prompted.get("mode", "everything") == "single":
        raise UserError(
            f"distillation={dcfg.get('name')} distils the everything-mode grid outputs, but prompted.mode=single trains "
            "on prompted outputs only, so no term would run: use prompted.mode=everything or prompted.mode=mixed, "
            "or distillation=none"
        )
    specs = teacher_specs(dcfg)
    terms = enabled_terms(dcfg)
    student_dim, tiny_dim = _student_dims(cfg)
    same_width = [t for t in SAME_WIDTH_TERMS if t in terms]
    for spec in specs:
        width = expected_teacher_dim(spec, tiny_dim)
        if student_dim is not None and width != student_dim and same_width:
            # No learned projection: a student-side adapter would change what "the student" is and
            # need its own optimizer group; rkd and attention compare relations / maps and still apply.
            wide = next((n for n, d in (("mobilesam", STUDENT_DIMS["mobilesam"]), ("tiny", STUDENT_DIMS["tiny"])) if d == width), None)
            fix = f"set model={wide} (width {width})" if wide else "use a teacher of the student's width"
            raise UserError(
                f"teacher {spec.name!r} ({spec.model}) has width {width}, the student (model.size={cfg.model.size}) "
                f"{student_dim}; terms {same_width} compare channels one to one: {fix}, or turn those terms off "
                "(distillation.terms.<name>.enable=false)"
            )
    image_size = int(cfg.model.image_size)
    for spec in specs:
        if spec.model == "tiny":
            log.warning("distillation.tiny_teacher=true: distilling from a RANDOM tiny teacher (%s) -- a smoke test, "
                        "not distillation; set the teachers' checkpoints for a real run", spec.name)
        elif image_size < NATIVE_SIZE:
            log.warning("teacher %r (%s) runs at model.image_size=%d, below its native %d: its position encodings "
                        "are resized and its outputs are not the official model's; set model.image_size=%d",
                        spec.name, spec.model, image_size, NATIVE_SIZE, NATIVE_SIZE)
    return specs


def _cache_for(dcfg: Any, spec: TeacherSpec, image_size: int, tiny_dim: int) -> Optional[EmbeddingCache]:
    if not dcfg.get("cache_dir"):
        return None
    grid = image_size // 16
    shape = (expected_teacher_dim(spec, tiny_dim), grid, grid)
    return EmbeddingCache(dcfg.cache_dir, spec.name, teacher_fingerprint(spec, tiny_dim), image_size, shape=shape)


def build_distiller(
    cfg: DictConfig,
    model_image_size: Optional[int] = None,
    specs: Optional[Sequence[TeacherSpec]] = None,
    train_files: Optional[Sequence[str]] = None,
) -> Distiller:
    """Teachers at the student's image size, frozen. `specs`: from `check_distillation` with local
    checkpoint paths (by default checked and resolved here). `train_files`: the training images;
    a teacher whose cache already holds all of them is built without its image encoder."""
    dcfg = cfg.distillation
    image_size = int(model_image_size or cfg.model.image_size)
    if specs is None:
        specs = check_distillation(cfg)
        paths = resolve_many([s.checkpoint for s in specs], cfg.paths.weights_dir)
        specs = [dataclasses.replace(s, checkpoint=p) for s, p in zip(specs, paths)]
    check_teacher_files(specs)
    terms = enabled_terms(dcfg)
    student_dim, tiny_dim = _student_dims(cfg)
    same_width = [t for t in SAME_WIDTH_TERMS if t in terms]
    if dcfg.get("cache_dir") and train_files and not any(os.path.isfile(f) for f in train_files[:16]):
        log.warning("distillation.cache_dir with training images that are not files (a generated stream?): "
                    "entries are keyed by pixels and a fresh scene is never read again")
    teachers = []
    for spec in specs:
        cache = _cache_for(dcfg, spec, image_size, tiny_dim)
        load = functools.partial(build_teacher_model, spec, image_size, tiny_dim=tiny_dim)
        if cache is not None and train_files and spec.model != "tiny" and cache.holds_all(train_files):
            log.info("teacher %r: the cache holds all %d training images; its image encoder is not loaded",
                     spec.name, len(train_files))
            model = build_teacher_decoder_only(spec, image_size)
        else:
            model = load()
        if student_dim is not None and same_width and teacher_dim(model) != student_dim:
            raise UserError(f"teacher {spec.name!r}: width {teacher_dim(model)} != student width {student_dim}")
        teachers.append(Teacher(spec, model, cache, load_full=load))
    dl = dcfg.dynamic_lambda
    schedule = PlateauLambda(dcfg.lambda_coef, dl.enabled, dl.factor, dl.patience, dl.min, dl.max, dl.mode)
    mask_teacher = MaskTeacherSettings(**(_plain(dcfg.get("mask_teacher")) or {}))
    matching = {k: cfg.matching[k] for k in ("fg_iou", "point_credit", "point_fg")} if "matching" in cfg else {}
    return Distiller(
        teachers, terms, schedule, multimask_output=cfg.model.multimask_output,
        points_per_batch=cfg.model.points_per_batch, mask_teacher=mask_teacher, matching=matching,
    )


__all__ = ["Distiller", "Teacher", "TeacherSpec", "build_distiller", "check_distillation", "enabled_terms",
           "teacher_specs"]
