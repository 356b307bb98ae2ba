"""The distiller the trainer calls after each everything-mode step.

    total = lambda * sum_teachers teacher.weight * sum_enabled_terms term
            (+ mask_teacher.weight * dual-supervision loss, outside lambda)

where each term is its own weighted sum (e.g. w_l2 * l2 + w_cos * cos). The student is never run
again: its embeddings, tokens, masks and attention come from the step's forward (the objective's
`EverythingOutput`).
Each teacher encodes the images once (or reads its cached embeddings) and decodes the student's
prompts in the same `points_per_batch` chunks under no_grad; per chunk only what the enabled terms
need is kept (tokens, the paired candidates' masks, head-averaged attention), and all of it is
dropped once the loss is formed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor

from mobilesam_se.distill import mask_teacher as mt
from mobilesam_se.distill import terms as T
from mobilesam_se.distill.embedding_cache import EmbeddingCache
from mobilesam_se.data.sample import Batch
from mobilesam_se.distill.plateau import PlateauLambda
from mobilesam_se.matching import MatchResult
from mobilesam_se.models.mask_decoder import DecoderOutput
from mobilesam_se.models.sam import SamModel
from mobilesam_se.models.teachers import TeacherSpec, has_encoder

log = logging.getLogger(__name__)

TERM_NAMES = ("encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits", "attention", "rkd")
# Terms that compare tensors channel by channel: the student's and the teacher's widths must agree.
SAME_WIDTH_TERMS = ("encoder_patch", "prompt_embed", "decoder_mask_token")
FEATURE_TERMS = ("prompt_embed", "decoder_mask_token", "attention", "rkd")
DECODER_TERMS = ("prompt_embed", "decoder_mask_token", "dense_mask_logits", "attention", "rkd")


@dataclass
class Teacher:
    spec: TeacherSpec
    model: SamModel
    cache: Optional[EmbeddingCache] = None
    load_full: Optional[Callable[[], SamModel]] = None  # builds the whole teacher (model may lack its encoder)

    @property
    def name(self) -> str:
        return self.spec.name

    def ensure_encoder(self, device: Optional[torch.device]) -> None:
        """Load the image encoder after all, when a cache entry turns out to be missing or bad."""
        if has_encoder(self.model):
            return
        if self.load_full is None:
            raise RuntimeError(f"teacher {self.name!r} has no image encoder and no way to load one")
        log.warning("teacher %r: a cache entry is missing or bad; loading its image encoder now", self.name)
        self.model = self.load_full()
        if device is not None:
            self.model.to(device)


@dataclass
class MaskTeacherSettings:
    method: str = "none"
    teacher: Optional[str] = None
    iou_threshold: float = 0.5
    pred_iou_thresh: float = 0.88
    nms_iou: float = 0.7
    weight: float = 1.0


@dataclass
class TeacherPass:
    """What one teacher's decoder gives for the step's prompts (only the parts the terms need)."""

    tokens: Optional[Tensor] = None  # (B, P, T, C)
    mask_token_out: Optional[Tensor] = None  # (B, P, M, C)
    masks: List[Tensor] = field(default_factory=list)  # per image: (Q_b, h, w) logits of the paired candidates
    attention: Dict[str, List[Tensor]] = field(default_factory=dict)  # head-averaged (B, P, T, N) / (B, P, N, T)


def _teacher_precision(device: torch.device):
    # Teachers run in bf16 on CUDA (their weights stay fp32; autocast casts per op, as for the
    # student); on CPU in fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Distiller:
    def __init__(
        self,
        teachers: Sequence[Teacher],
        terms: Mapping[str, Mapping[str, Any]],
        lambda_schedule: PlateauLambda,
        multimask_output: bool = True,
        points_per_batch: Optional[int] = 64,
        mask_teacher: Optional[MaskTeacherSettings] = None,
        matching: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """`terms`: the enabled terms only, name -> keyword weights of the term's function."""
        if not teachers:
            raise ValueError("distillation needs at least one teacher")
        names = [t.name for t in teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        unknown = set(terms) - set(TERM_NAMES)
        if unknown:
            raise ValueError(f"unknown distillation terms {sorted(unknown)}; known: {TERM_NAMES}")
        self.teachers = list(teachers)
        self.terms = {k: dict(v) for k, v in terms.items()}
        self.schedule = lambda_schedule
        self.multimask_output = multimask_output
        self.points_per_batch = points_per_batch
        self.mask_teacher = mask_teacher or MaskTeacherSettings()
        if self.mask_teacher.method not in mt.METHODS:
            raise ValueError(f"distillation.mask_teacher.method must be one of {mt.METHODS}, got {self.mask_teacher.method!r}")
        if self.mask_teacher.method != "none":
            wanted = self.mask_teacher.teacher or names[0]
            if wanted not in names:
                raise ValueError(f"distillation.mask_teacher.teacher={wanted!r} is not a teacher ({names})")
            self.mask_teacher.teacher = wanted
        if not self.terms and self.mask_teacher.method == "none":
            raise ValueError("distillation is enabled but no term is (distillation.terms.<name>.enable) "
                             "and distillation.mask_teacher.method is none")
        self.matching = dict(matching or {})
        self._device: Optional[torch.device] = None
        self._memo: Optional[tuple] = None  # (batch image tensor, teacher name, embeddings) from prepare_targets
        self._target_stats: Dict[str, float] = {}

    # -- what the trainer reads ------------------------------------------------------------------
    @property
    def needs_features(self) -> bool:
        return any(t in self.terms for t in FEATURE_TERMS)

    @property
    def needs_attention(self) -> bool:
        return "attention" in self.terms

    @property
    def lambda_coef(self) -> float:
        return self.schedule.value

    def on_validation(self, score: float) -> None:
        before = self.schedule.value
        after = self.schedule.step(score)
        if after != before:
            log.info("distillation lambda %.4g -> %.4g (validation plateau)", before, after)

    def state_dict(self) -> Dict[str, Any]:
        return {"lambda": self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state["lambda"])

    # -- teachers --------------------------------------------------------------------------------
    def _to(self, device: torch.device) -> None:
        if self._device != device:
            for t in self.teachers:
                t.model.to(device)
            self._device = device

    def _teacher(self, name: str) -> Teacher:
        return next(t for t in self.teachers if t.name == name)

    @torch.no_grad()
    def teacher_embeddings(self, teacher: Teacher, batch: Batch, pixels: Tensor) -> Tensor:
        """(B, C, h, w) float32 teacher embeddings: from this step's memo, the cache, or the encoder."""
        if self._memo is not None and self._memo[0] is batch.image and self._memo[1] == teacher.name:
            emb = self._memo[2]
            self._memo = None
            return emb
        device = pixels.device
        if teacher.cache is None:
            teacher.ensure_encoder(self._device)
            with _teacher_precision(device):
                return teacher.model.encode(pixels).float()
        files = list(batch.file_name or [None] * pixels.shape[0])
        keys = [teacher.cache.key(f, pixels[i]) for i, f in enumerate(files)]
        found = [teacher.cache.load(k) for k in keys]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            teacher.ensure_encoder(self._device)
            with _teacher_precision(device):
                fresh = teacher.model.encode(pixels[missing]).float()
            for j, i in enumerate(missing):
                teacher.cache.save(keys[i], fresh[j])
                found[i] = fresh[j].half()  # as a later cached run will see it
        return torch.stack([e.to(device).float() for e in found])

    def fill_cache(self, batch: Batch, device: torch.device) -> int:
        """Compute and store the missing cached embeddings of a batch; returns how many were computed."""
        self._to(device)
        pixels = batch.image.to(device)
        before = sum(t.cache.misses for t in self.teachers if t.cache is not None)
        for t in self.teachers:
            if t.cache is None:
                raise ValueError("fill_cache needs distillation.cache_dir")
            self.teacher_embeddings(t, batch, pixels)
        return sum(t.cache.misses for t in self.teachers if t.cache is not None) - before

    @torch.no_grad()
    def _decode(
        self, teacher: Teacher, emb: Tensor, points: Tensor, paired: Optional[List[Tensor]], need_attention: bool
    ) -> TeacherPass:
        """Decode the step's prompts in the student's chunks, keeping only what the terms need.

        `paired`: per image, the sorted flat candidate indices (q = p * M + m) whose masks the dense
        term compares; None when it is off."""
        want_features = any(t in self.terms for t in ("prompt_embed", "decoder_mask_token", "rkd"))
        B, P = points.shape[:2]
        step = self.points_per_batch if self.points_per_batch and self.points_per_batch > 0 else P
        tokens, mtok, masks = [], [], [[] for _ in range(B)]
        attn: Dict[str, List[List[Tensor]]] = {}
        for s in range(0, P, step):
            with _teacher_precision(emb.device):
                out = teacher.model.predict_grid(
                    emb, points[:, s : s + step], self.multimask_output, points_per_batch=None,
                    return_features=want_features, record_attention=need_attention,
                )
            n, M = out.masks.shape[1], out.masks.shape[2]
            if want_features:
                tokens.append(out.tokens.float())
                mtok.append(out.mask_token_out.float())
            if paired is not None:
                flat = out.masks.reshape(B, n * M, *out.masks.shape[-2:])
                for b in range(B):
                    idx = paired[b]
                    sel = idx[(idx >= s * M) & (idx < (s + n) * M)] - s * M
                    masks[b].append(flat[b, sel.to(flat.device)].float())
            for key, maps in out.attention.items():
                attn.setdefault(key, []).append([T.head_mean(a) for a in maps])
            del out  # the chunk's full masks / attention go now, not at the end of the loop
        result = TeacherPass()
        if want_features:
            result.tokens, result.mask_token_out = torch.cat(tokens, 1), torch.cat(mtok, 1)
        if paired is not None:
            result.masks = [torch.cat(m) for m in masks]
        for key, chunks in attn.items():
            result.attention[key] = [torch.cat([c[i] for c in chunks], 1) for i in range(len(chunks[0]))]
        return result

    # -- the loss --------------------------------------------------------------------------------
    def _paired_indices(self, out: DecoderOutput, matches: Sequence[MatchResult]) -> List[Tensor]:
        B, P, M = out.masks.shape[:3]
        if self.terms["dense_mask_logits"].get("candidates", "matched") == "all":
            return [torch.arange(P * M) for _ in range(B)]
        return [m.pred_idx.detach().cpu().sort().values for m in matches]

    def _teacher_terms(self, teacher: Teacher, emb_t: Tensor, grid: Any) -> Dict[str, Dict[str, Tensor]]:
        out, points = grid.outputs, grid.points
        results: Dict[str, Dict[str, Tensor]] = {}
        if "encoder_patch" in self.terms:
            results["encoder_patch"] = T.encoder_patch(out.embeddings, emb_t, **self.terms["encoder_patch"])
        if not any(t in self.terms for t in DECODER_TERMS):
            return results
        paired = self._paired_indices(out, grid.matches) if "dense_mask_logits" in self.terms else None
        tp = self._decode(teacher, emb_t, points, paired, "attention" in self.terms)
        if "prompt_embed" in self.terms:
            results["prompt_embed"] = T.prompt_embed(out.tokens, tp.tokens, **self.terms["prompt_embed"])
        if "decoder_mask_token" in self.terms:
            results["decoder_mask_token"] = T.mask_token_kl(out.mask_token_out, tp.mask_token_out, **self.terms["decoder_mask_token"])
        if "dense_mask_logits" in self.terms:
            h, w = out.masks.shape[-2:]
            student = torch.cat([out.masks[b].reshape(-1, h, w)[idx.to(out.masks.device)] for b, idx in enumerate(paired)])
            kw = {k: v for k, v in self.terms["dense_mask_logits"].items() if k != "candidates"}
            results["dense_mask_logits"] = T.dense_mask_logits(student, torch.cat(tp.masks), **kw)
        if "attention" in self.terms:
            results["attention"] = T.attention_maps(out.attention, tp.attention, **self.terms["attention"])
        if "rkd" in self.terms:
            kw = dict(self.terms["rkd"])
            keep = _even_subset(points.shape[1], int(kw.pop("max_prompts", 64)), points.device)
            per_image = [T.rkd(out.tokens[b, keep].flatten(1), tp.tokens[b, keep].flatten(1), **kw)
                         for b in range(points.shape[0])]
            results["rkd"] = {k: torch.stack([r[k] for r in per_image]).mean() for k in per_image[0]}
        return results

    def __call__(self, batch: Batch, grid: Any) -> Dict[str, Tensor]:
        """`grid`: the objective's `EverythingOutput` of this step (the student's outputs, on the graph)."""
        pixels = grid.pixels
        self._to(pixels.device)
        logs: Dict[str, Tensor] = {}
        distill = pixels.new_zeros((), dtype=torch.float32)
        embeddings: Dict[str, Tensor] = {}
        for teacher in self.teachers:
            emb_t = self.teacher_embeddings(teacher, batch, pixels)
            embeddings[teacher.name] = emb_t
            per_teacher = pixels.new_zeros((), dtype=torch.float32)
            for term, parts in self._teacher_terms(teacher, emb_t, grid).items():
                per_teacher = per_teacher + parts["loss"]
                logs[f"distill/{teacher.name}/{term}"] = parts["loss"]
                logs.update({f"distill/{teacher.name}/{term}/{k}": v for k, v in parts.items() if k != "loss"})
            distill = distill + teacher.spec.weight * per_teacher
            if teacher.cache is not None:  # cumulative over the run: how much the cache saves
                logs[f"distill/{teacher.name}/cache_hit_rate"] = torch.tensor(teacher.cache.hit_rate)
        total = self.schedule.value * distill
        if self.mask_teacher.method == "dual_supervision":
            dual = self._dual_supervision(batch, grid, embeddings)
            logs.update({f"distill/mask_teacher/{k}": v for k, v in dual.items()})
            total = total + self.mask_teacher.weight * dual["loss"]
        logs.update({f"distill/mask_teacher/{k}": torch.tensor(v) for k, v in self._target_stats.items()})
        self._target_stats = {}
        self._memo = None
        logs["distill/lambda"] = torch.tensor(self.schedule.value)
        logs["distill/total"] = total
        return logs

    # -- mask teacher ----------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_masks(self, teacher: Teacher, emb: Tensor, points: Tensor, input_sizes: Sequence[Any]) -> List[mt.TeacherMasks]:
        """The teacher's filtered, deduplicated everything-mode masks per image (low res)."""
        from mobilesam_se.data.targets import lowres_size

        cfg = self.mask_teacher
        B, P = points.shape[:2]
        side = teacher.model.low_res_size
        regions = [mt.region_mask(lowres_size(tuple(hw), teacher.model.image_size), side, emb.device) for hw in input_sizes]
        step = self.points_per_batch if self.points_per_batch and self.points_per_batch > 0 else P
        logits: List[List[Tensor]] = [[] for _ in range(B)]
        scores: List[List[Tensor]] = [[] for _ in range(B)]
        for s in range(0, P, step):
            with _teacher_precision(emb.device):
                out = teacher.model.predict_grid(emb, points[:, s : s + step], True, points_per_batch=None)
            for b in range(B):
                l, sc = mt.select_candidates(out.masks[b].flatten(0, 1), out.iou_pred[b].flatten(), cfg.pred_iou_thresh, regions[b])
                logits[b].append(l)
                scores[b].append(sc)
        return [mt.finish(logits[b], scores[b], cfg.nms_iou, (side, side)) for b in range(B)]

    def prepare_targets(self, batch: Batch, device: torch.device, autocast_dtype: Optional[torch.dtype] = None) -> Batch:
        """mask_teacher.method=replace_gt: a shallow copy of `batch` whose `masks_lowres` are the
        teacher's masks with matched ones replaced by GT (see `mask_teacher`); otherwise `batch`."""
        if self.mask_teacher.method != "replace_gt":
            return batch
        self._to(device)
        teacher = self._teacher(self.mask_teacher.teacher)
        pixels = batch.image.to(device)
        emb = self.teacher_embeddings(teacher, batch, pixels)
        self._memo = (batch.image, teacher.name, emb)  # the loss reuses them this step
        found = self.teacher_masks(teacher, emb, batch.points.to(device), batch.input_size)
        targets, totals = [], {"replaced": 0.0, "added": 0.0, "duplicates": 0.0}
        for b, tm in enumerate(found):
            merged, counts = mt.replace_with_gt(tm.masks, batch.masks_lowres[b].to(device), self.mask_teacher.iou_threshold)
            targets.append(merged)
            for k in totals:
                totals[k] += counts[k]
        self._target_stats = totals
        # The teacher's masks have no cell coverage: the mask terms take the binary targets then.
        return dataclasses.replace(batch, masks_lowres=targets, coverage_lowres=[])

    def _dual_supervision(self, batch: Batch, grid: Any, embeddings: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        teacher = self._teacher(self.mask_teacher.teacher)
        found = self.teacher_masks(teacher, embeddings[teacher.name], batch.points.to(grid.pixels.device), batch.input_size)
        masks = grid.outputs.masks
        per_image = [
            mt.dual_supervision_loss(masks[b].float(), tm, grid.lowres_points[b], **self.matching)
            for b, tm in enumerate(found)
        ]
        out = {k: torch.stack([r[k].to(masks.device) for r in per_image]).mean() for k in ("loss", "kl", "dice")}
        out["pairs"] = torch.stack([r["pairs"] for r in per_image]).sum()
        out["teacher_masks"] = torch.tensor(float(sum(tm.logits.shape[0] for tm in found)))
        return out


def _even_subset(n: int, k: int, device: torch.device) -> Tensor:
    """min(n, k) indices spread evenly over range(n) (deterministic, covers the whole grid)."""
    if k <= 0 or k >= n:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, k, device=device).round().long().unique()
