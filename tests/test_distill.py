"""The distiller on tiny models: gradient reach, minima, chunking, teachers, cache, mask teacher, runs."""
import copy
import math
import os
from pathlib import Path

import pytest
import torch

from helpers.hydra_utils import compose_cfg
from helpers.losses import everything_loss
from mobilesam_se.data.sample import Batch
from mobilesam_se.distill import build_distiller
from mobilesam_se.distill.cache import main as cache_main, precompute
from mobilesam_se.distill.embedding_cache import EmbeddingCache
from mobilesam_se.distill.distiller import TERM_NAMES, Distiller, MaskTeacherSettings, Teacher
from mobilesam_se.distill.plateau import PlateauLambda
from mobilesam_se.errors import UserError
from mobilesam_se.objective import SegmentEverythingObjective
from mobilesam_se.models import teachers as teachers_mod
from mobilesam_se.models.build import build_mobilesam
from mobilesam_se.models.checkpoint import CheckpointError, official_state_dict
from mobilesam_se.models.mask_decoder import DecoderOutput
from mobilesam_se.models.sam_vit import SAM_VIT_CONFIGS
from mobilesam_se.models.teachers import TeacherSpec, build_sam_vit_teacher, build_teacher_model, freeze_teacher
from mobilesam_se.prompts import grid_points_for_model
from mobilesam_se.assembly import build_run

S = 128  # image size: 8x8 embeddings, 32x32 low-res masks
CPU = torch.device("cpu")
TERM_KW = {
    "encoder_patch": {"w_l2": 1.0, "w_cos": 1.0},
    "prompt_embed": {"w_mse": 0.7, "w_cos": 0.3},
    "decoder_mask_token": {"w_kl": 1.0, "temperature": 0.5},
    "dense_mask_logits": {"w_kl": 0.6, "w_focal": 0.4, "gamma": 2.0},
    "attention": {"weight": 1.0},
    "rkd": {"w_dist": 1.0, "w_angle": 2.0, "max_prompts": 8},
}


pytestmark = pytest.mark.usefixtures("synthetic_data")  # tests/conftest.py


def student(seed=0):
    torch.manual_seed(seed)
    return build_mobilesam(S, size="tiny").eval()  # eval: BatchNorm uses running stats, like a teacher


def tiny_teacher(seed=0):
    return build_teacher_model(TeacherSpec("tiny", "tiny", seed=seed), S, tiny_dim=32)


def make_batch(B=1, files=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    side = S // 4
    masks = []
    for b in range(B):
        m = torch.zeros(3, side, side, dtype=torch.bool)
        m[0, 2:14, 2:14] = True
        m[1, 18:30, 4:20] = True
        m[2, 4:12, 20:30] = True
        masks.append(m)
    return Batch(
        image=torch.randn(B, 3, S, S, generator=g),
        points=grid_points_for_model(4, (S, S), S)[None].repeat(B, 1, 1),
        masks_lowres=masks,
        input_size=[(S, S)] * B,
        file_name=list(files) if files else [""] * B,
        image_id=[str(b) for b in range(B)],
    )


def step(model, batch, multimask=True, features=True, attention=True):
    objective = SegmentEverythingObjective(model, everything_loss(), multimask_output=multimask, points_per_batch=8)
    return objective.everything(batch, return_features=features, record_attention=attention)


def distiller(terms, teacher=None, multimask=True, ppb=8, cache=None, term_kw=None, **kw):
    t = teacher if teacher is not None else tiny_teacher()
    kws = {n: {**TERM_KW[n], **(term_kw or {}).get(n, {})} for n in terms}
    return Distiller([Teacher(TeacherSpec("t", "tiny"), t, cache)], kws,
                     PlateauLambda(1.0), multimask_output=multimask, points_per_batch=ppb, **kw)


def run_distill(d, model, batch, multimask=True):
    res = step(model, batch, multimask, d.needs_features, d.needs_attention)
    return d(batch, res)


# Which student parameters each term must reach, and which it must not touch.
REACH = {
    "encoder_patch": (["image_encoder."], ["mask_decoder.", "prompt_encoder."]),
    "prompt_embed": (
        ["image_encoder.", "mask_decoder.transformer.", "mask_decoder.mask_tokens", "prompt_encoder.point_embeddings.1"],
        ["mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps", "mask_decoder.iou_prediction_head"],
    ),
    "decoder_mask_token": (
        ["image_encoder.", "mask_decoder.transformer.", "mask_decoder.mask_tokens"],
        ["mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps", "mask_decoder.iou_prediction_head"],
    ),
    "dense_mask_logits": (
        ["image_encoder.", "mask_decoder.transformer.", "mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps.0"],
        ["mask_decoder.iou_prediction_head", "mask_decoder.output_hypernetworks_mlps.1"],
    ),
    "attention": (
        ["image_encoder.", "mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj"],
        ["mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps", "mask_decoder.iou_prediction_head"],
    ),
    "rkd": (
        ["image_encoder.", "mask_decoder.transformer."],
        ["mask_decoder.output_upscaling", "mask_decoder.output_hypernetworks_mlps", "mask_decoder.iou_prediction_head"],
    ),
}


@pytest.mark.parametrize("term", TERM_NAMES)
def test_each_term_reaches_its_student_parameters_and_no_teacher_parameter(term):
    model, teacher = student(), tiny_teacher()
    d = distiller([term], teacher, multimask=False)
    out = run_distill(d, model, make_batch(), multimask=False)
    assert torch.isfinite(out["distill/total"]) and float(out[f"distill/t/{term}"].detach()) > 0
    out["distill/total"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    must, never = REACH[term]
    for prefix in must:
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix)), f"{term} misses {prefix}"
    for prefix in never:
        assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith(prefix)), f"{term} reaches {prefix}"
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_terms_are_zero_and_minimal_when_the_student_is_the_teacher():
    model = student()
    teacher = freeze_teacher(copy.deepcopy(model))
    d = distiller(TERM_NAMES, teacher, multimask=True)
    batch = make_batch()
    out = run_distill(d, model, batch)
    for term in TERM_NAMES:
        assert abs(float(out[f"distill/t/{term}"].detach())) < 1e-5, term
    out["distill/total"].backward()
    worst = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    assert worst < 1e-4, worst
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(1e-2 * torch.randn(p.shape, generator=g))
    moved = run_distill(d, model, batch)
    for term in TERM_NAMES:
        assert float(moved[f"distill/t/{term}"].detach()) > 1e-6, term


def test_chunked_teacher_decoding_equals_one_pass():
    model, teacher = student(), tiny_teacher()
    batch = make_batch(B=2)
    res = step(model, batch, True, True, True)
    a = distiller(TERM_NAMES, teacher, ppb=8)(batch, res)
    b = distiller(TERM_NAMES, teacher, ppb=0)(batch, res)
    for k in a:
        assert torch.allclose(a[k].detach(), b[k].detach(), rtol=1e-4, atol=1e-6), k
    # candidates=all compares every candidate, not only the matched ones.
    every = distiller(["dense_mask_logits"], teacher, term_kw={"dense_mask_logits": {"candidates": "all"}})(batch, res)
    assert float(every["distill/t/dense_mask_logits"].detach()) > 0
    assert not torch.allclose(every["distill/t/dense_mask_logits"], a["distill/t/dense_mask_logits"])


def test_total_is_lambda_times_teacher_weighted_terms():
    model = student()
    t1, t2 = tiny_teacher(0), tiny_teacher(1)
    d = Distiller(
        [Teacher(TeacherSpec("a", "tiny", weight=0.25), t1), Teacher(TeacherSpec("b", "tiny", weight=2.0, seed=1), t2)],
        {"encoder_patch": TERM_KW["encoder_patch"], "prompt_embed": TERM_KW["prompt_embed"]}, PlateauLambda(0.5),
    )
    out = run_distill(d, model, make_batch())
    want = 0.5 * sum(w * (out[f"distill/{n}/encoder_patch"] + out[f"distill/{n}/prompt_embed"]) for n, w in (("a", 0.25), ("b", 2.0)))
    assert torch.allclose(out["distill/total"], want)
    assert float(out["distill/lambda"]) == 0.5
    ep = out["distill/a/encoder_patch"]
    assert torch.allclose(ep, out["distill/a/encoder_patch/l2"] + out["distill/a/encoder_patch/cos"])


# -- teachers -------------------------------------------------------------------------------------
def test_tiny_teacher_is_seeded_frozen_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_teacher(0)
    after = torch.rand(1)
    assert torch.equal(before, after)  # building it did not consume the run's random stream
    b = tiny_teacher(0)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    wide = build_teacher_model(TeacherSpec("tiny", "tiny"), S, tiny_dim=256)
    assert wide.encode(torch.zeros(1, 3, S, S)).shape == (1, 256, S // 16, S // 16)


def test_sam_checkpoint_loads_strictly_through_the_sam_vit_mapping(tmp_path, monkeypatch):
    # A SAM-layout checkpoint (1024 px, image_encoder.* in SAM's names) of a tiny ViT, as sam_vit_b.
    monkeypatch.setitem(teachers_mod.SAM_VIT_CONFIGS, "vit_b", SAM_VIT_CONFIGS["tiny"])
    torch.manual_seed(0)
    ref = build_sam_vit_teacher(SAM_VIT_CONFIGS["tiny"], 1024, "mobilesam")
    sd = official_state_dict(ref)
    assert "image_encoder.blocks.0.mlp.lin1.weight" in sd and "mask_decoder.iou_token.weight" in sd
    path = tmp_path / "sam_vit_b_tiny.pth"
    torch.save(sd, path)
    teacher = build_teacher_model(TeacherSpec("b", "sam_vit_b", str(path)), S)
    x = torch.randn(1, 3, S, S)
    with torch.no_grad():  # loaded at S = what the 1024-px encoder computes on an S input (timm resamples)
        assert torch.allclose(teacher.encode(x), ref.eval().image_encoder(x), atol=1e-5)
    for k, v in ref.mask_decoder.state_dict().items():
        assert torch.equal(teacher.mask_decoder.state_dict()[k], v)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    del sd["mask_decoder.iou_token.weight"]
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="sam_vit_b_tiny.pth"):
        build_teacher_model(TeacherSpec("b", "sam_vit_b", str(path)), S)


def test_missing_teacher_checkpoint_fails_at_start_naming_the_file(tmp_path):
    cfg = compose_cfg(["distillation=seed", f"model.image_size={S}",
                       f"distillation.teachers.0.checkpoint={tmp_path / 'sam_vit_h_4b8939.pth'}",
                       f"distillation.teachers.1.checkpoint={tmp_path / 'mobile_sam.pt'}"])
    with pytest.raises(UserError, match="checkpoint not found: .*sam_vit_h_4b8939.pth"):
        build_distiller(cfg)


def test_width_mismatch_is_a_clear_error_before_loading(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("mobilesam_se.distill.resolve_many", lambda *a, **k: calls.append(a) or [])
    cfg = compose_cfg(["distillation=seed", "model=tiny"])  # checkpoints by name: nothing is fetched first
    with pytest.raises(UserError, match="width 256, the student \\(model.size=tiny\\) 32.*set model=mobilesam") as info:
        build_distiller(cfg)
    assert "\n" not in str(info.value) and calls == []


def test_tiny_teacher_switch_and_flags():
    cfg = compose_cfg(["distillation=full", "distillation.tiny_teacher=true", f"model.image_size={S}",
                       "distillation.terms.attention.enable=true"])
    d = build_distiller(cfg)
    assert [t.name for t in d.teachers] == ["tiny"] and d.teachers[0].model.image_size == S
    assert d.needs_features and d.needs_attention
    assert set(d.terms) == {"encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits", "attention"}
    enc = build_distiller(compose_cfg(["distillation=encoder", "distillation.tiny_teacher=true", f"model.image_size={S}"]))
    assert not enc.needs_features and set(enc.terms) == {"encoder_patch"}


def test_lambda_schedule_state_round_trips():
    cfg = compose_cfg(["distillation=encoder", "distillation.tiny_teacher=true", f"model.image_size={S}",
                       "distillation.dynamic_lambda.enabled=true", "distillation.dynamic_lambda.patience=0"])
    d = build_distiller(cfg)
    d.on_validation(0.5)
    d.on_validation(0.4)
    assert d.lambda_coef == 0.5
    e = build_distiller(cfg)
    e.load_state_dict(d.state_dict())
    assert e.lambda_coef == 0.5 and e.state_dict() == d.state_dict()


# -- cache ----------------------------------------------------------------------------------------
def _image_files(tmp_path, n):
    files = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(os.urandom(64))  # only its path, size and mtime matter to the key
        files.append(str(p))
    return files


def test_cached_embeddings_skip_the_encoder_and_match_a_live_run(tmp_path):
    model, teacher = student(), tiny_teacher()
    files = _image_files(tmp_path, 2)
    batch = make_batch(B=2, files=files)
    terms = ["encoder_patch", "prompt_embed", "dense_mask_logits"]
    res = step(model, batch, False, True, False)
    live = distiller(terms, teacher, multimask=False)(batch, res)

    calls = []
    hook = teacher.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cache = EmbeddingCache(tmp_path / "cache", "t", "tiny:seed=0:dim=32", S)
    cached_d = distiller(terms, teacher, multimask=False, cache=cache)
    first = cached_d(batch, res)  # fills the cache
    assert calls == [2] and len(list((tmp_path / "cache").rglob("*.pt"))) == 2
    entry = torch.load(next((tmp_path / "cache").rglob("*.pt")), weights_only=True)
    assert entry["embeddings"].dtype == torch.float16

    def boom(*_):
        raise AssertionError("teacher encoder ran although its embeddings were cached")

    orig = teacher.image_encoder.forward
    teacher.image_encoder.forward = boom
    try:
        again = cached_d(batch, res)
    finally:
        teacher.image_encoder.forward = orig
    for k in live:
        assert torch.allclose(again[k].detach(), live[k].detach(), rtol=2e-2, atol=2e-3), (k, again[k], live[k])
        assert torch.equal(again[k].detach(), first[k].detach()), k  # the filling run already used fp16 values

    # A changed image file is recomputed (only that one).
    st = os.stat(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cached_d(batch, res)
    assert calls == [2, 1]
    # Another teacher / image size / preprocessing is another key.
    key = cache.key(files[0], batch.image[0])
    assert cache.load(key) is not None
    other = EmbeddingCache(tmp_path / "cache", "t", "tiny:seed=1:dim=32", S)
    assert other.load(other.key(files[0], batch.image[0])) is None
    assert EmbeddingCache(tmp_path / "cache", "t", "tiny:seed=0:dim=32", 256).load(key | {"image_size": 256}) is None
    assert cache.load(key | {"preprocess": "v0"}) is None


def test_cache_command_precomputes_a_dataset(tmp_path):
    overrides = [
        "distillation=encoder", "distillation.tiny_teacher=true", f"distillation.cache_dir={tmp_path / 'c'}",
        f"model.image_size={S}", "dataset.train.num_images=3", "dataset.val.num_images=1", "dataset.grid_points=4",
    ]
    cache_main(overrides)
    assert len(list((tmp_path / "c" / "tiny").rglob("*.pt"))) == 3
    counts = precompute(compose_cfg(overrides), progress=False)
    assert counts == {"images": 3, "computed": 0}


# -- mask teacher ---------------------------------------------------------------------------------
class QuadrantTeacher(torch.nn.Module):
    """A hand-made teacher: every prompt yields the image quadrant it lies in (predicted IoU 0.95),
    the whole image (0.9) and a speck (0.3, below pred_iou_thresh)."""

    image_size, low_res_size = S, S // 4

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def encode(self, pixels):
        return torch.zeros(pixels.shape[0], 32, S // 16, S // 16)

    def predict_grid(self, emb, points, multimask_output=True, points_per_batch=None, **_):
        B, P = points.shape[:2]
        side, half = S // 4, S // 8
        masks = torch.full((B, P, 3, side, side), -8.0)
        for b in range(B):
            for p in range(P):
                x, y = (points[b, p] / 4).long().tolist()
                r0, c0 = (y // half) * half, (x // half) * half
                masks[b, p, 0, r0 : r0 + half, c0 : c0 + half] = 8.0
                masks[b, p, 1] = 8.0
                masks[b, p, 2, 0, 0] = 8.0
        iou = torch.tensor([0.95, 0.9, 0.3]).expand(B, P, 3)
        return DecoderOutput(masks=masks, iou_pred=iou.clone())


def test_replace_gt_targets_from_a_hand_made_teacher():
    side, half = S // 4, S // 8
    batch = make_batch()
    gt = torch.zeros(2, side, side, dtype=torch.bool)
    gt[0, :half, :half] = True  # the top-left quadrant, annotated
    gt[1, 20:24, 20:24] = True  # a small object no teacher mask matches
    batch.masks_lowres = [gt]
    d = Distiller([Teacher(TeacherSpec("q", "tiny"), QuadrantTeacher())], {"encoder_patch": TERM_KW["encoder_patch"]},
                  PlateauLambda(1.0), mask_teacher=MaskTeacherSettings("replace_gt", None, 0.5, 0.88, 0.7))
    out = d.prepare_targets(batch, CPU)
    targets = out.masks_lowres[0]
    # GT (2) + the 3 other quadrants + the whole image (IoU 0.25 with the GT quadrant); the speck is
    # filtered by predicted IoU, the 4 prompts per quadrant collapse to one mask by NMS.
    assert targets.shape == (6, side, side)
    assert torch.equal(targets[:2], gt)
    areas = sorted(int(m.sum()) for m in targets[2:])
    assert areas == [half * half] * 3 + [side * side]
    assert out.image is batch.image and batch.masks_lowres[0] is gt  # the input batch is untouched
    assert d._target_stats == {"replaced": 1.0, "added": 4.0, "duplicates": 0.0}


def test_dual_supervision_adds_a_soft_loss_toward_teacher_masks():
    model = student()
    batch = make_batch()
    d = Distiller([Teacher(TeacherSpec("q", "tiny"), QuadrantTeacher())], {}, PlateauLambda(1.0), multimask_output=True,
                  mask_teacher=MaskTeacherSettings("dual_supervision", "q", 0.5, 0.88, 0.7, weight=2.0),
                  matching={"fg_iou": 0.0})
    out = run_distill(d, model, batch)
    assert out["distill/mask_teacher/teacher_masks"] == 5 and out["distill/mask_teacher/pairs"] > 0
    assert torch.allclose(out["distill/total"], 2.0 * out["distill/mask_teacher/loss"])
    out["distill/total"].backward()
    assert model.mask_decoder.output_upscaling[0].weight.grad.abs().sum() > 0


# -- end to end -------------------------------------------------------------------------------------
def _fit(overrides, out_dir):
    cfg = compose_cfg(["debug=default", f"model.image_size={S}", "trainer.max_epochs=1", "trainer.max_steps=2",
                                  "trainer.log_every=1"] + overrides)
    trainer, cleanup = build_run(cfg, out_dir=Path(out_dir))
    try:
        return trainer, trainer.fit()
    finally:
        cleanup()


def test_end_to_end_full_preset_with_the_tiny_teacher(tmp_path):
    trainer, result = _fit(["distillation=full", "model.multimask_output=false", "distillation.tiny_teacher=true"], tmp_path)
    assert result["step"] == 2
    train = result["history"][-1]
    for term in ("encoder_patch", "prompt_embed", "decoder_mask_token", "dense_mask_logits"):
        v = train[f"train/distill/tiny/{term}"]
        assert math.isfinite(v) and v > 0, term
    assert math.isfinite(train["train/distill/total"]) and train["train/distill/lambda"] == 1.0
    log = (tmp_path / "checkpoints" / "training_log.txt").read_text()
    assert "train/distill/tiny/dense_mask_logits=" in log
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["distiller"]["lambda"]["value"] == 1.0


def test_end_to_end_replace_gt_feeds_teacher_masks_to_the_loss(tmp_path):
    trainer, result = _fit(["distillation=encoder", "distillation.tiny_teacher=true", "distillation.mask_teacher.method=replace_gt",
                            "distillation.mask_teacher.pred_iou_thresh=-100", "trainer.val_every=0"], tmp_path)
    train = result["history"][-1]
    assert train["train/distill/mask_teacher/added"] > 0  # the random teacher's masks all pass the filter
    assert train["train/num_gt"] > 0 and math.isfinite(train["train/loss"])
