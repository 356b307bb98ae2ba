"""Distillation terms: pure functions of a student tensor and the matching teacher tensor.

Each returns a dict of named parts plus "loss", the weighted sum that is optimised. Every term is 0
when the student's tensor equals the teacher's and has a zero gradient there (a minimum), so a
perfect student is never pushed away. Teacher tensors are detached here; losses are in float32.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Terms = Dict[str, Tensor]


def _check_shapes(name: str, s: Tensor, t: Tensor) -> None:
    if s.shape != t.shape:
        raise ValueError(
            f"distillation term {name}: student {tuple(s.shape)} vs teacher {tuple(t.shape)}; "
            "the compared tensors must have the same shape (same image_size, embedding width and decoder)"
        )


def encoder_patch(student: Tensor, teacher: Tensor, w_l2: float = 1.0, w_cos: float = 1.0) -> Terms:
    """Image embeddings (B, C, h, w): per-patch squared L2 (mean over channels and patches, i.e.
    MSE) and 1 - cosine similarity of each patch's C-vector (mean over patches)."""
    _check_shapes("encoder_patch", student, teacher)
    s, t = student.float(), teacher.detach().float()
    l2 = (s - t).pow(2).mean()
    cos = (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-6)).mean()
    return {"loss": w_l2 * l2 + w_cos * cos, "l2": l2, "cos": cos}


def prompt_embed(student: Tensor, teacher: Tensor, w_mse: float = 1.0, w_cos: float = 0.0) -> Terms:
    """Transformer query outputs `tokens` (B, P, T, C) for the same prompts: MSE over all entries and
    1 - cosine of each token's C-vector (mean over B, P, T)."""
    _check_shapes("prompt_embed", student, teacher)
    s, t = student.float(), teacher.detach().float()
    mse = (s - t).pow(2).mean()
    cos = (1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-6)).mean()
    return {"loss": w_mse * mse + w_cos * cos, "mse": mse, "cos": cos}


def mask_token_kl(student: Tensor, teacher: Tensor, w_kl: float = 1.0, temperature: float = 1.0) -> Terms:
    """Mask-token outputs (B, P, M, C) of the used mask tokens (the hypernetwork inputs), each read
    as logits over its C channels: KL(softmax(t / T) || softmax(s / T)) * T^2, mean over candidates.

    Softmax removes a shared offset, so the term matches which channels dominate each candidate's
    token, not its absolute level (prompt_embed covers that); T^2 keeps the gradient scale
    independent of T (Hinton et al.)."""
    _check_shapes("decoder_mask_token", student, teacher)
    if temperature <= 0:
        raise ValueError(f"decoder_mask_token.temperature must be > 0, got {temperature}")
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean() * temperature**2
    return {"loss": w_kl * kl, "kl": kl}


def bernoulli_kl(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """Per-pixel KL(Bern(p_t) || Bern(p_s)) over BOTH classes, from logits:
    p_t log(p_t / p_s) + (1 - p_t) log((1 - p_t) / (1 - p_s)) = BCE(s; p_t) - H(p_t), computed
    with the stable BCE-with-logits. The background half is what stops an all-foreground student
    from scoring well: a positive-class-only KL, p_t log(p_t / p_s), falls as p_s -> 1 everywhere."""
    s, t = student_logits.float(), teacher_logits.detach().float()
    p_t = torch.sigmoid(t)
    return F.binary_cross_entropy_with_logits(s, p_t, reduction="none") - F.binary_cross_entropy_with_logits(
        t, p_t, reduction="none"
    )


def soft_focal(student_logits: Tensor, teacher_logits: Tensor, gamma: float = 2.0) -> Tensor:
    """Per-pixel focal loss toward soft targets (quality-focal form): |p_t - p_s|^gamma * BCE(s; p_t).
    0 exactly when p_s = p_t; the factor concentrates on pixels the student gets most wrong."""
    s, t = student_logits.float(), teacher_logits.detach().float()
    p_t = torch.sigmoid(t)
    return (p_t - torch.sigmoid(s)).abs().pow(gamma) * F.binary_cross_entropy_with_logits(s, p_t, reduction="none")


def dense_mask_logits(
    student: Tensor, teacher: Tensor, w_kl: float = 1.0, w_focal: float = 0.0, gamma: float = 2.0
) -> Terms:
    """Low-res mask logits (Q, h, w) of paired candidates: Bernoulli KL (both classes) and the soft
    focal term, each averaged over the pixels of a mask, then over the Q masks."""
    _check_shapes("dense_mask_logits", student, teacher)
    if gamma < 1:
        raise ValueError(f"dense_mask_logits.gamma must be >= 1 (differentiable at p_s = p_t), got {gamma}")
    if student.shape[0] == 0:
        zero = student.float().sum() * 0.0  # on the graph, so backward() stays valid
        return {"loss": zero, "kl": zero, "focal": zero}
    kl = bernoulli_kl(student, teacher).flatten(1).mean(1).mean()
    focal = soft_focal(student, teacher, gamma).flatten(1).mean(1).mean()
    return {"loss": w_kl * kl + w_focal * focal, "kl": kl, "focal": focal}


def _row_kl(p_student: Tensor, p_teacher: Tensor, eps: float = 1e-8) -> Tensor:
    """KL(teacher || student) of distributions along the last axis, mean over the other axes."""
    s, t = p_student.float(), p_teacher.detach().float()
    return (t * (t.clamp_min(eps).log() - s.clamp_min(eps).log())).sum(-1).mean()


def attention_maps(
    student: Dict[str, Sequence[Tensor]], teacher: Dict[str, Sequence[Tensor]], weight: float = 1.0
) -> Terms:
    """Decoder attention probabilities, head-averaged, per layer: token-to-image (.., T, N) rows
    are distributions over image positions, image-to-token (.., N, T) rows over tokens. KL(t || s)
    per row, mean over rows, then mean over all maps of both directions.

    Averaging the heads (a mean of distributions is one) lets students and teachers with different
    head counts be compared; the maps' token and position counts must match. Teacher maps may come
    already head-averaged (B, P, T, N); student maps are (B, P, heads, T, N)."""
    parts: Terms = {}
    kls: List[Tensor] = []
    for key in ("token_to_image", "image_to_token"):
        s_maps, t_maps = list(student.get(key, [])), list(teacher.get(key, []))
        if len(s_maps) != len(t_maps):
            raise ValueError(f"attention term: student has {len(s_maps)} {key} maps, teacher {len(t_maps)} (decoder depth)")
        per_key = []
        for s, t in zip(s_maps, t_maps):
            s_mean = head_mean(s)
            t_mean = head_mean(t) if t.dim() == s.dim() else t
            _check_shapes(f"attention/{key}", s_mean, t_mean)
            per_key.append(_row_kl(s_mean, t_mean))
        if per_key:
            parts[key] = torch.stack(per_key).mean()
            kls += per_key
    if not kls:
        raise ValueError("attention term: no attention maps were recorded")
    kl = torch.stack(kls).mean()
    return {"loss": weight * kl, "kl": kl, **parts}


def head_mean(attn: Tensor) -> Tensor:
    """(B, P, heads, A, B') attention -> (B, P, A, B') mean over heads."""
    return attn.float().mean(2)


def _pairwise_distances(x: Tensor) -> Tensor:
    """(P, D) -> (P, P) Euclidean distances, 0 on the diagonal with no NaN gradient there."""
    sq = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    eye = torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(eye, torch.zeros_like(sq), sq.clamp_min(1e-12).sqrt())


def _angles(x: Tensor) -> Tensor:
    """(P, D) -> (P, P, P): cos of the angle at vertex j between x_i - x_j and x_k - x_j."""
    diff = F.normalize(x[None, :, :] - x[:, None, :], p=2, dim=-1, eps=1e-12)  # [j, i] = x_i - x_j
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd(student: Tensor, teacher: Tensor, w_dist: float = 1.0, w_angle: float = 2.0) -> Terms:
    """Relational KD (Park et al. 2019) among the P prompt embeddings of ONE image, (P, Ds) / (P, Dt):
    distance-wise (pairwise distances, each divided by its mean) and angle-wise (cosines of all
    triplet angles), both smooth-L1. Relations only, so Ds and Dt may differ and one image suffices."""
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"rkd: {student.shape[0]} student vs {teacher.shape[0]} teacher prompts")
    s, t = student.float().flatten(1), teacher.detach().float().flatten(1)
    if s.shape[0] < 3:
        zero = s.sum() * 0.0
        return {"loss": zero, "dist": zero, "angle": zero}
    off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
    d_s, d_t = _pairwise_distances(s), _pairwise_distances(t)
    d_s = d_s / d_s[off].mean().clamp_min(1e-12)
    d_t = d_t / d_t[off].mean().clamp_min(1e-12)
    dist = F.smooth_l1_loss(d_s[off], d_t[off])
    angle = F.smooth_l1_loss(_angles(s), _angles(t))
    return {"loss": w_dist * dist + w_angle * angle, "dist": dist, "angle": angle}


def soft_dice(student_logits: Tensor, teacher_probs: Tensor, eps: float = 1e-6) -> Tensor:
    """Dice loss toward soft targets, (Q, h, w) each, mean over Q: 1 - 2 sum(p q) / (sum p^2 + sum q^2).

    The squared denominator makes it 0 exactly at p = q (sum p^2 + sum q^2 >= 2 sum p q, equal only
    there) with a vanishing gradient, so the teacher's probabilities are its minimum. The linear form
    1 - 2 sum(p q) / (sum p + sum q) is not: against soft targets it prefers a sharper student."""
    p = torch.sigmoid(student_logits.float()).flatten(1)
    t = teacher_probs.detach().float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / ((p * p).sum(1) + (t * t).sum(1) + eps)).mean()
