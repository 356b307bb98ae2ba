"""Structured-config schemas: a mistyped key or a wrong type fails at compose time, in Hydra's words.

`conf/config.yaml` puts `config_schema` first in its defaults, so every group's YAML is merged
onto these dataclasses. Parts that `run.py` builds with `hydra.utils.instantiate` carry a
`_target_`; open-ended sub-trees (dataset kwargs, teacher lists) are typed `Any`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelConfig:
    # Defaults in conf/model/*.yaml (mobilesam.yaml holds the `net` that builds the model).
    name: str = MISSING
    size: str = MISSING  # mobilesam: TinyViT-5M + SAM decoder; small; tiny: a small test model (the model= names)
    image_size: int = MISSING
    checkpoint: Optional[str] = MISSING  # mobile_sam.pt, our best.pt or last.ckpt
    multimask_output: bool = MISSING  # 3 candidates per prompt (tokens 1-3) or 1 (token 0)
    points_per_batch: int = MISSING  # prompts decoded per chunk
    activation_checkpointing: bool = MISSING  # recompute each prompt chunk in backward (the model's grad_checkpointing flag)
    attention_init: str = MISSING  # default | tied_qk: the decoder's key projections start equal to its queries
    drop_path_rate: float = MISSING
    pe_scale: float = MISSING  # std of the positional encoding's Gaussian frequencies (SAM: 1.0)
    net: Any = MISSING  # {_target_: ..., **arguments}


@dataclass
class DatasetConfig:
    # Defaults in conf/dataset/shared/dataset.yaml, which every option merges first.
    name: str = MISSING
    # where the data is (which keys matter depends on the dataset option)
    root: Optional[str] = MISSING
    val_root: Optional[str] = MISSING  # null: validate on the training data, with a warning
    val_is_train: bool = MISSING  # set at start-up: the val split is the training data
    image_dir: Optional[str] = MISSING
    annotation_file: Optional[str] = MISSING
    val_image_dir: Optional[str] = MISSING
    val_annotation_file: Optional[str] = MISSING
    grid_points: int = MISSING  # G: G x G single-point prompts per image
    prompts_per_step: Optional[int] = MISSING  # sub-sample the grid per step (None: all)
    prompt_sampling: str = MISSING  # uniform | balanced (about equal odds for every object under the grid)
    max_masks_per_image: Optional[int] = MISSING
    soft_targets: bool = MISSING  # the mask losses' target: low-res cell coverage (true) or coverage >= 0.5
    on_error: str = MISSING  # raise | skip
    batch_size: int = MISSING
    val_batch_size: int = MISSING
    num_workers: int = MISSING
    val_max_images: Optional[int] = MISSING
    train: Any = MISSING  # {_target_: ..., **dataset kwargs}
    val: Any = MISSING


@dataclass
class PromptedConfig:
    """The training mode and the prompted loss (conf/prompted/default.yaml)."""

    _target_: str = MISSING
    mode: str = MISSING  # everything | single | mixed
    mixed_weight: float = MISSING
    prompt_mode: str = MISSING  # box | point | mixed
    objects_per_image: int = MISSING
    max_bbox_shift: int = MISSING
    min_points: int = MISSING
    max_points: int = MISSING
    negative_points: int = MISSING
    w_focal: float = MISSING
    w_dice: float = MISSING
    w_iou: float = MISSING
    focal_alpha: float = MISSING  # the everything loss's, by interpolation
    focal_gamma: float = MISSING
    multimask_output: bool = MISSING  # the model's, by interpolation
    points_per_batch: int = MISSING


@dataclass
class PathsConfig:
    """Paths from the environment (conf/paths/default.yaml); null: the code's fallback."""

    root_dir: str = MISSING
    data_dir: str = MISSING
    coco_sample_dir: str = MISSING
    weights_dir: Optional[str] = MISSING
    cache_dir: Optional[str] = MISSING


@dataclass
class MatchingConfig:
    fg_iou: float = MISSING
    point_credit: float = MISSING  # added to the assignment score when the prompt lies in the object
    point_fg: bool = MISSING  # an assigned pair whose prompt lies in the object is foreground
    allow_random_init: bool = False  # start the plain rule from random weights anyway (it cannot learn)


@dataclass
class LossConfig:
    _target_: str = MISSING
    w_bce: float = MISSING
    w_focal: float = MISSING
    w_dice: float = MISSING
    w_iou: float = MISSING
    w_cls: float = MISSING
    focal_alpha: float = MISSING
    focal_gamma: float = MISSING
    iou_target: str = MISSING  # assigned | assigned_zero | best
    iou_over: str = MISSING  # all | assigned | fg: the candidates the IoU MSE averages over
    cls_term: str = MISSING  # recipe | no_duplicates | off
    fg_iou: float = MISSING  # the matching rule's, by interpolation in conf/loss/everything.yaml
    point_credit: float = MISSING
    point_fg: bool = MISSING
    point_supervision: bool = MISSING  # also supervise each prompt's best candidate toward its object (on with matching=bootstrap)


@dataclass
class FreezeConfig:
    image_encoder: bool = MISSING
    prompt_encoder: bool = MISSING
    mask_decoder: bool = MISSING
    unfreeze_epoch: int = MISSING  # > 0: frozen parts join the optimizer at this epoch; 0: never
    batchnorm_stats: bool = MISSING  # keep BatchNorm running statistics fixed
    batchnorm_stats_epoch: Optional[int] = MISSING  # N: at epoch N estimate BatchNorm statistics on batchnorm_stats_images training images, then keep them fixed; null: train-mode BatchNorm
    batchnorm_stats_images: int = MISSING


@dataclass
class PlateauConfig:
    enabled: bool = False
    factor: float = 0.5
    patience: int = 3
    min: float = 0.0
    max: float = 10.0
    mode: str = "max"


@dataclass
class TeacherConfig:
    """One frozen teacher (see `mobilesam_se.models.teachers`)."""

    name: str = MISSING  # used in the logged keys: train/distill/<name>/<term>
    model: str = MISSING  # sam_vit_h | sam_vit_l | sam_vit_b | mobilesam | tiny
    checkpoint: Optional[str] = None  # required except for tiny (random, seeded)
    weight: float = 1.0
    seed: int = 0  # tiny only


@dataclass
class EncoderPatchTerm:
    enable: bool = False
    w_l2: float = 1.0
    w_cos: float = 1.0


@dataclass
class PromptEmbedTerm:
    enable: bool = False
    w_mse: float = 1.0
    w_cos: float = 0.0


@dataclass
class MaskTokenTerm:
    enable: bool = False
    w_kl: float = 1.0
    temperature: float = 1.0


@dataclass
class DenseMaskTerm:
    enable: bool = False
    w_kl: float = 1.0
    w_focal: float = 0.0
    gamma: float = 2.0  # >= 1 (the focal factor |p_t - p_s|^gamma must be differentiable at 0)
    candidates: str = "matched"  # matched: the Hungarian-assigned candidates | all: every candidate


@dataclass
class AttentionTerm:
    enable: bool = False
    weight: float = 1.0


@dataclass
class RkdTerm:
    enable: bool = False
    w_dist: float = 1.0
    w_angle: float = 2.0
    max_prompts: int = 64  # the angle relation is cubic in the prompts: sub-sample evenly


@dataclass
class DistillTermsConfig:
    encoder_patch: EncoderPatchTerm = field(default_factory=EncoderPatchTerm)
    prompt_embed: PromptEmbedTerm = field(default_factory=PromptEmbedTerm)
    decoder_mask_token: MaskTokenTerm = field(default_factory=MaskTokenTerm)
    dense_mask_logits: DenseMaskTerm = field(default_factory=DenseMaskTerm)
    attention: AttentionTerm = field(default_factory=AttentionTerm)
    rkd: RkdTerm = field(default_factory=RkdTerm)


@dataclass
class MaskTeacherConfig:
    method: str = "none"  # none | replace_gt | dual_supervision
    teacher: Optional[str] = None  # a teacher's name; None: the first teacher
    iou_threshold: float = 0.5  # replace_gt: a teacher mask this close to a GT mask is replaced by it
    pred_iou_thresh: float = 0.88  # keep teacher candidates whose predicted IoU reaches this
    nms_iou: float = 0.7  # drop a candidate overlapping a better-scored kept one by more than this
    weight: float = 1.0  # dual_supervision: weight of the soft loss toward the teacher masks


@dataclass
class DistillationConfig:
    name: str = "none"
    enabled: bool = False
    lambda_coef: float = 1.0
    dynamic_lambda: PlateauConfig = field(default_factory=PlateauConfig)
    teachers: List[TeacherConfig] = field(default_factory=list)
    tiny_teacher: bool = False  # replace `teachers` by one random tiny teacher (CPU runs, tests)
    terms: DistillTermsConfig = field(default_factory=DistillTermsConfig)
    cache_dir: Optional[str] = None  # per-image teacher embeddings, fp16 (python -m mobilesam_se.distill.cache)
    mask_teacher: MaskTeacherConfig = field(default_factory=MaskTeacherConfig)


@dataclass
class MuonConfig:
    lr: float = MISSING  # Muon's peak learning rate (the schedule scales it as it scales trainer.lr)
    weight_decay: float = MISSING
    momentum: float = MISSING
    convs: bool = MISSING  # convolution filters too (as (out, in*k*k) matrices), depthwise ones excepted
    exclude: List[str] = MISSING  # fnmatch patterns of weight names left to AdamW (input layer, output heads)


@dataclass
class TrainerConfig:
    _target_: str = MISSING
    max_epochs: int = MISSING
    max_steps: Optional[int] = MISSING  # stop after this many optimizer steps (None: run all epochs)
    time_limit_min: Optional[float] = MISSING  # save and stop after this long
    lr: float = MISSING
    weight_decay: float = MISSING
    betas: List[float] = MISSING
    optimizer_impl: str = MISSING  # fused | foreach | for_loop: how AdamW runs its update (same maths)
    optimizer: str = MISSING  # adamw | muon (Muon for weight matrices, AdamW for the rest)
    muon: MuonConfig = MISSING  # used with optimizer=muon
    warmup_steps: int = MISSING
    min_lr_ratio: float = MISSING
    # this share of the first epochs trains at low_res_scale x model.image_size (from random init only; 0: off)
    low_res_fraction: float = MISSING
    low_res_scale: float = MISSING
    low_res_schedule: str = MISSING  # restart (own warm-up + cosine at full size) | continue
    grad_accum: int = MISSING
    grad_clip: Optional[float] = MISSING
    precision: str = MISSING  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    device: str = MISSING
    val_every: int = MISSING  # epochs
    early_stop_patience: Optional[int] = MISSING  # validations without improvement
    monitor: str = MISSING
    max_nonfinite: int = MISSING
    log_every: int = MISSING
    deterministic: bool = MISSING
    progress: bool = MISSING
    prompted_eval: bool = MISSING  # also log val/prompted/* (always on when prompted.mode != everything)
    # COCO mask AP/AR + IoU-head calibration (val/coco_raw/*, val/coco_amg/*, val/calibration/*) at the
    # validations of every N-th epoch and the last one; 0: off (COCOeval and the AMG pass are slow)
    coco_eval_every: int = MISSING
    coco_eval_amg: bool = MISSING  # also score the stock AMG output (a second pass over each image)
    tune_amg: bool = MISSING  # at the end, tune the AMG thresholds for best.pt on val (best.amg.yaml)
    tune_max_images: Optional[int] = MISSING  # val images the tuning decodes (null: all)
    tune_objective: str = MISSING  # what that tuning maximises: AR_100 | f1


@dataclass
class VisualConfig:
    save_every_n_epochs: int = MISSING  # 0: only when a new best score is reached
    num_images: int = MISSING


@dataclass
class LoggerConfig:
    _target_: str = MISSING
    project: str = MISSING
    entity: Optional[str] = MISSING
    mode: str = MISSING  # auto: online when W&B is set up, else offline | online | offline | disabled
    group: Optional[str] = MISSING
    name: Optional[str] = MISSING
    tags: List[str] = MISSING
    log_images: bool = MISSING


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    prompted: PromptedConfig = field(default_factory=PromptedConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    logger: Optional[LoggerConfig] = None
    seed: int = 0
    task_name: str = "train"
    output_dir: Optional[str] = None  # defaults to Hydra's run directory
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


# Keys that moved to a group of their own (issue 13): Hydra alone would only call the old key unknown.
MOVED_KEYS = {
    "dataset.mode": "prompted.mode",
    "dataset.mixed_weight": "prompted.mixed_weight",
    "dataset.prompt_mode": "prompted.prompt_mode",
    "dataset.objects_per_image": "prompted.objects_per_image",
    "dataset.max_bbox_shift": "prompted.max_bbox_shift",
    "dataset.min_points": "prompted.min_points",
    "dataset.max_points": "prompted.max_points",
    "dataset.negative_points": "prompted.negative_points",
    "dataset.prompted_w_focal": "prompted.w_focal",
    "dataset.prompted_w_dice": "prompted.w_dice",
    "dataset.prompted_w_iou": "prompted.w_iou",
    "dataset.check_cache": "paths.cache_dir",
    "matching.point_supervision": "loss.point_supervision",
    "weights_dir": "paths.weights_dir",
}


def check_moved_keys(overrides: List[str]) -> None:
    """Exit with the new names when a command-line override uses a key that moved."""
    moved = []
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("+~")
        if "=" in arg and key in MOVED_KEYS:
            moved.append(f"{key} is now {MOVED_KEYS[key]} ({MOVED_KEYS[key]}={arg.split('=', 1)[1]})")
    if moved:
        raise SystemExit("error: renamed config key(s): " + "; ".join(moved))
