"""The training loop: AdamW + warm-up/cosine, accumulation, autocast, clipping, freezing, validation,
early stopping, exact resume, atomic checkpoints, append-only logs, pictures and W&B.

The trainer receives built parts, keyword-only (the objective, the datasets, a validator, a logger),
and its own settings (`conf/trainer/*.yaml`); `assembly.build_run` makes it with
`instantiate(cfg.trainer, _partial_=True)(**parts)`. It never reads the other config groups.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mobilesam_se.data.sample import Batch, collate_samples
from mobilesam_se.engine.checkpointing import RunCheckpoints
from mobilesam_se.engine.distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier, cuda_index
from mobilesam_se.engine.freeze import PARTS, estimate_batchnorm_stats, freeze_batchnorm_stats, freeze_parts, unfreeze_parts
from mobilesam_se.engine.optim import build_optimizer, build_scheduler, muon_rule, uses_foreach
from mobilesam_se.engine.pictures import save_validation_pictures
from mobilesam_se.engine.preemption import SignalCatcher, code_of, signal_of
from mobilesam_se.engine.sampler import EpochSampler
from mobilesam_se.engine.state import capture_rng, restore_rng
from mobilesam_se.models.checkpoint import load_official_state_dict, official_state_dict
from mobilesam_se.precision import resolve_autocast, resolve_device

log = logging.getLogger(__name__)


# trainer.low_res_schedule: the learning-rate schedule of a run with low-resolution epochs.
LOW_RES_SCHEDULES = ("restart", "continue")

# Validation warns when |mean predicted IoU - mean true IoU| exceeds this.
CALIBRATION_GAP_WARN = 0.1


def calibration_warning(metrics: Dict[str, float], epoch: int) -> Optional[str]:
    """The warning of the calibration guard, or None: the IoU head must stay an IoU estimate the
    stock AMG thresholds (pred_iou_thresh 0.88) can use."""
    gap = metrics.get("calibration/gap", float("nan"))
    if not gap > CALIBRATION_GAP_WARN:
        return None
    return (
        f"epoch {epoch}: the IoU head is miscalibrated: mean predicted IoU {metrics['calibration/mean_pred_iou']:.3f} "
        f"vs true {metrics['calibration/mean_true_iou']:.3f} (gap {gap:.3f} > {CALIBRATION_GAP_WARN:.2f}); "
        f"{100 * metrics.get('calibration/pred_above_88', float('nan')):.1f}% of candidates predicted above 0.88 vs "
        f"{100 * metrics.get('calibration/true_above_88', float('nan')):.1f}% truly above; the stock AMG keeps "
        f"{metrics.get('amg/masks_per_image', float('nan')):.1f} masks per image. See loss.iou_over / "
        "loss.cls_term (README, Loss)."
    )


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    def __init__(
        self,
        *,
        objective: nn.Module,
        train_set,
        out_dir: Path,
        val_set=None,
        validator: Optional[Any] = None,
        logger: Optional[Any] = None,
        dist: Optional[DistInfo] = None,
        run_config: Optional[Any] = None,
        model_config: Optional[Mapping[str, Any]] = None,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        freeze: Optional[Mapping[str, Any]] = None,
        visual: Optional[Mapping[str, Any]] = None,
        max_epochs: int,
        max_steps: Optional[int] = None,
        time_limit_min: Optional[float] = None,
        lr: float,
        weight_decay: float,
        betas: Sequence[float] = (0.9, 0.999),
        optimizer_impl: str = "for_loop",
        optimizer: str = "adamw",
        muon: Optional[Mapping[str, Any]] = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        low_res_fraction: float = 0.0,
        low_res_scale: float = 0.5,
        low_res_schedule: str = "restart",
        grad_accum: int = 1,
        grad_clip: Optional[float] = None,
        precision: str = "auto",
        device: str = "auto",
        val_every: int = 1,
        early_stop_patience: Optional[int] = None,
        monitor: str = "dice",
        max_nonfinite: int = 10,
        log_every: int = 10,
        deterministic: bool = True,
        progress: bool = True,
        prompted_eval: bool = False,
        coco_eval_every: int = 0,
        coco_eval_amg: bool = False,
        tune_amg: bool = False,
        tune_max_images: Optional[int] = None,
        tune_objective: str = "AR_100",
    ) -> None:
        """`objective`: `objective.SegmentEverythingObjective` (its `.model` is the student);
        `validator`: `evaluation.validation.Validator` of `val_set`; `run_config`: the composed
        config, recorded (config_resolved.yaml, W&B, last.ckpt), never read; `model_config`: the
        `model` group, written beside best.pt as its description; `freeze`: the freeze
        group (parts, unfreeze_epoch, batchnorm_stats, batchnorm_stats_epoch / _images, and
        estimate_batchnorm_stats: false when the model starts from a checkpoint, whose statistics
        are kept); `visual`: num_images, save_every_n_epochs."""
        self.dist = dist or DistInfo()
        self.device = resolve_device(device, "trainer.device")
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", cuda_index(self.dist.local_rank))
        self.autocast_dtype = resolve_autocast(precision, self.device, "trainer.precision")
        self.objective = objective.to(self.device)
        self.objective.autocast_dtype = self.autocast_dtype  # the trainer owns device and precision
        self.model = objective.model
        self.distiller = getattr(objective, "distiller", None)
        self.train_set, self.val_set, self.validator = train_set, val_set, validator
        self.out_dir = Path(out_dir)
        self.files = RunCheckpoints(self.out_dir / "checkpoints", is_main=self.dist.is_main, model_config=model_config)
        self.logger = logger if self.dist.is_main else None
        self.run_config = run_config
        self.seed = seed
        self.batch_size = batch_size
        self.max_epochs, self.max_steps, self.time_limit_min = max_epochs, max_steps, time_limit_min
        self.weight_decay = weight_decay
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.val_every, self.early_stop_patience, self.monitor = val_every, early_stop_patience, monitor
        self.max_nonfinite, self.log_every = max_nonfinite, log_every
        self.deterministic, self.progress = deterministic, progress
        self.prompted_eval = prompted_eval
        self.coco_eval_every, self.coco_eval_amg = coco_eval_every, coco_eval_amg
        self.tune_amg, self.tune_max_images = tune_amg, tune_max_images
        from mobilesam_se.evaluation.tuning import OBJECTIVES

        if tune_objective not in OBJECTIVES:  # now, not after the training it would end
            raise ValueError(f"trainer.tune_objective must be one of {OBJECTIVES}, got {tune_objective!r}")
        self.tune_objective = tune_objective
        self.image_size = int(getattr(self.model, "image_size", 0))
        self.low_res_epochs = self._low_res_epochs(low_res_fraction, max_epochs)
        self.low_res_size = self._check_low_res(low_res_scale)
        freeze = dict(freeze or {})
        visual = dict(visual or {})
        self.unfreeze_epoch = int(freeze.get("unfreeze_epoch", 0))
        self.freeze_bn_stats = bool(freeze.get("batchnorm_stats", False))
        self.bn_stats_epoch = freeze.get("batchnorm_stats_epoch")
        self.bn_stats_images = int(freeze.get("batchnorm_stats_images", 64))
        # Estimated only for a model that starts from its init (assembly: not from model.checkpoint).
        self.estimate_bn_stats = bool(freeze.get("estimate_batchnorm_stats", True))
        self.visual_images = int(visual.get("num_images", 0))
        self.visual_every = int(visual.get("save_every_n_epochs", 0))

        self.epoch = 0
        self.step = 0  # optimizer steps
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.best_score = -math.inf
        self.bad_validations = 0
        self.nonfinite = 0
        self.unfrozen = False
        self.stop_requested = False
        self.stop_signal: Optional[int] = None  # the preemption signal that asked for the stop, if any
        self.history: List[Dict[str, float]] = []
        # Loss sums of the epoch in progress (saved in last.ckpt, so a mid-epoch resume logs the
        # epoch's mean over all of its batches, not only those after the resume).
        self._epoch_sums: Dict[str, torch.Tensor] = {}
        self._epoch_count = 0
        self._resumed_sums: Dict[str, float] = {}
        self._resumed_count = 0

        self.frozen_parts = freeze_parts(self.model, [p for p in PARTS if freeze.get(p, False)])
        self.optimizer = build_optimizer(self.model, lr, weight_decay, betas, optimizer_impl, optimizer,
                                         muon_rule(muon) if optimizer == "muon" else None)
        self._foreach = uses_foreach(self.optimizer)
        self.sampler = EpochSampler(len(train_set), seed=seed, rank=self.dist.rank, world_size=self.dist.world_size)
        self.loader = DataLoader(
            train_set, batch_size=batch_size, sampler=self.sampler, collate_fn=collate_samples,
            num_workers=num_workers, drop_last=False,
        )
        self.shard_len = len(self.sampler)
        self.steps_per_epoch = math.ceil(self._micro_per_epoch() / grad_accum)
        self.total_steps = self.steps_per_epoch * max_epochs
        if low_res_schedule not in LOW_RES_SCHEDULES:
            raise ValueError(f"trainer.low_res_schedule must be one of {LOW_RES_SCHEDULES}, got {low_res_schedule!r}")
        # restart: the full-size epochs get their own warm-up and cosine, as a fine-tune of the
        # low-size model would (experiments/learning, fifth round); continue: one schedule for all.
        restarts = [self.steps_per_epoch * self.low_res_epochs] if self.low_res_epochs and low_res_schedule == "restart" else []
        self.scheduler = build_scheduler(self.optimizer, warmup_steps, self.total_steps, min_lr_ratio, restarts)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.wrapped = self._wrap_ddp()

    # -- set-up ----------------------------------------------------------------------------------
    @staticmethod
    def _low_res_epochs(fraction: float, max_epochs: int) -> int:
        """How many first epochs train at the low size: `fraction` of them, the last one always at full size."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"trainer.low_res_fraction must be in [0, 1) (0: off), got {fraction}")
        return min(int(round(fraction * max_epochs)), max(0, max_epochs - 1))

    def _check_low_res(self, scale: float) -> int:
        """The input side of the low-resolution epochs (trainer.low_res_fraction / low_res_scale)."""
        if self.low_res_epochs == 0:
            return self.image_size
        # What can change its size first: a model without one would otherwise read as a 0 px model.
        for part, what in ((self.model, "the model"), (self.train_set, "the training dataset")):
            if not hasattr(part, "set_image_size"):
                raise ValueError(f"trainer.low_res_fraction > 0: {what} ({type(part).__name__}) cannot change its image "
                                 "size (set trainer.low_res_fraction=0)")
        if self.distiller is not None:
            raise ValueError("trainer.low_res_fraction > 0 needs distillation=none: the teachers' targets are made at "
                             "model.image_size (set trainer.low_res_fraction=0)")
        size = int(round(self.image_size * float(scale) / 16)) * 16
        if not 16 <= size < self.image_size:
            raise ValueError(f"trainer.low_res_scale={scale} gives a {size}px input for a {self.image_size}px model; "
                             "it must give at least 16 px and less than model.image_size (0.5 halves it)")
        return size

    def _set_train_image_size(self, size: int) -> None:
        if self.low_res_epochs > 0 and self.model.image_size != size:
            self.model.set_image_size(size)
            self.train_set.set_image_size(size)

    def _wrap_ddp(self) -> nn.Module:
        """DDP wraps the whole objective: every decode of a step (grid and prompted) is inside its
        forward, so its hooks average every gradient."""
        if not self.dist.enabled:
            return self.objective
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Some parameters are legitimately unused (mask-prompt path, token 0 in multimask mode).
        return DDP(self.objective, device_ids=ids, find_unused_parameters=True)

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.files.last_path

    @property
    def ckpt_dir(self) -> Path:
        return self.files.folder

    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": official_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": capture_rng(),
            "lambda": self.distiller.lambda_coef if self.distiller is not None else None,
            "distiller": self.distiller.state_dict() if self.distiller is not None else None,
            "best_score": self.best_score,
            "bad_validations": self.bad_validations,
            "unfrozen": self.unfrozen,
            "nonfinite": self.nonfinite,
            "wandb_run_id": getattr(self.logger, "run_id", None),
            "history": self.history,
            "epoch_sums": {k: float(v) for k, v in self._epoch_sums.items()} if self.batch_in_epoch else {},
            "epoch_count": self._epoch_count if self.batch_in_epoch else 0,
            "config": self._config_container(),
        }

    def _config_container(self) -> Optional[Dict[str, Any]]:
        if self.run_config is None:
            return None
        return OmegaConf.to_container(self.run_config, resolve=True)

    def save_last(self) -> None:
        self.files.save_last(self.state_dict())

    def load_last(self) -> Dict[str, Any]:
        state = self.files.load_last()
        load_official_state_dict(self.model, state["model"], str(self.last_path))
        if state["unfrozen"] and self.frozen_parts:
            self._unfreeze()
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best_score, self.bad_validations = state["best_score"], state["bad_validations"]
        self.nonfinite = state["nonfinite"]
        self.history = list(state.get("history") or [])
        self._resumed_sums = dict(state.get("epoch_sums") or {})
        self._resumed_count = int(state.get("epoch_count") or 0)
        if self.distiller is not None and state.get("distiller") is not None:
            self.distiller.load_state_dict(state["distiller"])
        restore_rng(state["rng"])
        log.info("resumed from %s at epoch %d, step %d", self.last_path, self.epoch, self.step)
        return state

    # -- logging ---------------------------------------------------------------------------------
    def _log(self, metrics: Dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step=self.step)

    # -- freezing --------------------------------------------------------------------------------
    def _unfreeze(self) -> None:
        n = unfreeze_parts(self.model, self.frozen_parts, self.optimizer, self.weight_decay, self.scheduler)
        self.unfrozen = True
        log.info("unfroze %s: %d tensors handed to the optimizer", self.frozen_parts, n)

    # -- the loop --------------------------------------------------------------------------------
    def request_stop(self, signum: Optional[int] = None, *_: Any) -> None:
        """Save at the next step boundary and return; `signum`: the preemption signal (engine/preemption.py)."""
        self.stop_requested = True
        if signum is not None and code_of(signum) >= code_of(self.stop_signal):
            self.stop_signal = signum

    def _micro_step(self, batch: Batch, micro_index: int) -> Dict[str, torch.Tensor]:
        """The objective's terms for one micro-batch (`loss` is what is optimised). Each micro-batch
        has its own seeded generator (prompt sub-sampling, prompted-object sampling)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_index * self.dist.world_size + self.dist.rank)
        return self.wrapped(batch, g)

    def _optimizer_step(self) -> bool:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=self._foreach or None)
        else:
            norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None))
        if not torch.isfinite(norm):
            self._nonfinite("gradient norm")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            return False
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return True

    def _nonfinite(self, what: str) -> None:
        self.nonfinite += 1
        log.warning("non-finite %s at epoch %d step %d: step skipped (%d so far)", what, self.epoch, self.step, self.nonfinite)
        if self.nonfinite > self.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite} non-finite losses/gradients (trainer.max_nonfinite={self.max_nonfinite}); "
                "lower trainer.lr, enable trainer.grad_clip, or check the data"
            )

    def _train_epoch(self) -> Dict[str, float]:
        self.objective.train()
        # The first low_res_epochs (trainer.low_res_fraction of all) train at low_res_size (a cheaper
        # step, same weights); the caller restores the full size before validation and saving.
        self._set_train_image_size(self.low_res_size if self.epoch < self.low_res_epochs else self.image_size)
        self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.batch_size)
        if hasattr(self.train_set, "set_epoch"):  # a stream of fresh scenes per epoch (data/synthetic.py)
            self.train_set.set_epoch(self.epoch)
        bn_epoch = self.bn_stats_epoch
        if bn_epoch is not None and self.epoch == bn_epoch and self.batch_in_epoch == 0 and self.estimate_bn_stats:
            # Population statistics on this epoch's first images, fixed from here on (a resume
            # after this epoch finds them in the checkpoint's buffers). From a checkpoint the
            # loaded statistics, those its weights were trained with, are kept fixed instead.
            n = min(len(self.train_set), self.bn_stats_images)
            estimate_batchnorm_stats(self.model, [self.train_set[i].image for i in range(n)])
        if self.freeze_bn_stats or (bn_epoch is not None and self.epoch >= bn_epoch):
            freeze_batchnorm_stats(self.model)
        # On the device (no host sync per step); a run resumed mid-epoch continues the sums it saved.
        sums: Dict[str, torch.Tensor] = {k: torch.tensor(v, device=self.device) for k, v in self._resumed_sums.items()}
        count = self._resumed_count
        self._resumed_sums, self._resumed_count = {}, 0
        self._epoch_sums, self._epoch_count = sums, count
        accum = self.grad_accum
        backward_done = 0  # micro-batches with a finite loss in the current accumulation window
        bar = tqdm(self.loader, desc=f"epoch {self.epoch}", leave=False, disable=not (self.progress and self.dist.is_main))
        for batch in bar:
            micro_index = self.epoch * self._micro_per_epoch() + self.batch_in_epoch
            sync = (self.batch_in_epoch + 1) % accum == 0 or self.batch_in_epoch + 1 == self._micro_per_epoch()
            # The last window of an epoch may be shorter: average over the micro-batches it has.
            window_start = self.batch_in_epoch - self.batch_in_epoch % accum
            window = min(accum, self._micro_per_epoch() - window_start)
            use_no_sync = self.dist.enabled and not sync
            ctx = self.wrapped.no_sync() if use_no_sync else contextlib.nullcontext()
            with ctx:
                losses = self._micro_step(batch, micro_index)
                loss = losses["loss"]
                if not torch.isfinite(loss):
                    self._nonfinite("loss")
                    loss = None
                if loss is not None:
                    scaled = loss / window
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    backward_done += 1
            self.batch_in_epoch += 1
            if loss is not None:
                for k, v in losses.items():
                    v = v.detach().float().to(self.device)
                    sums[k] = sums[k] + v if k in sums else v
                count += 1
                self._epoch_sums, self._epoch_count = sums, count
            if sync:
                if backward_done == 0:  # every micro-batch of the window was non-finite: no step at all
                    self.optimizer.zero_grad(set_to_none=True)
                    continue
                backward_done = 0
                stepped = self._optimizer_step()
                if stepped and self.step % self.log_every == 0:
                    cur = {f"train/{k}": float(v.detach()) for k, v in losses.items()}
                    cur = all_reduce_mean(cur, self.dist, self.device)  # mean over ranks
                    cur["train/lr"] = self.optimizer.param_groups[0]["lr"]
                    if self.distiller is not None:
                        cur["train/lambda"] = self.distiller.lambda_coef
                    cur["epoch"] = self.epoch
                    self._log(cur)
                    bar.set_postfix(loss=f"{cur['train/loss']:.4f}", lr=f"{cur['train/lr']:.2e}")
                if self._should_stop_now():
                    break
        means = {k: float(v) / max(1, count) for k, v in sums.items()}
        return all_reduce_mean(means, self.dist, self.device)

    def _micro_per_epoch(self) -> int:
        return math.ceil(self.shard_len / self.batch_size)

    def _should_stop_now(self) -> bool:
        if self.max_steps is not None and self.step >= self.max_steps:
            self.stop_requested = True
        if self.time_limit_min is not None and time.time() - self._t0 > 60 * self.time_limit_min:
            self.stop_requested = True
        return self._agree_on_stop()

    def _agree_on_stop(self) -> bool:
        """All ranks stop after the same step: a signal reaches them at different moments (collective)."""
        if self.dist.enabled:
            stop, code = all_reduce_max([self.stop_requested, code_of(self.stop_signal)], self.dist, self.device)
            self.stop_requested = bool(stop)
            if code and code_of(self.stop_signal) != code:
                self.stop_signal = signal_of(code)
        return self.stop_requested

    def _coco_due(self) -> bool:
        every = int(self.coco_eval_every or 0)
        return every > 0 and ((self.epoch + 1) % every == 0 or self.epoch + 1 == self.max_epochs)

    def _validate(self, visuals: int):
        if self.validator is None or self.val_set is None or len(self.val_set) == 0:
            return {}, []
        mode = getattr(self.objective, "mode", "everything")
        result = self.validator(
            self.model, self.device, self.autocast_dtype, coco=self._coco_due(), amg=self.coco_eval_amg,
            prompted=self.prompted_eval or mode != "everything", keep_visuals=visuals,
            progress=self.progress and self.dist.is_main,
        )
        if self.logger is not None and "calibration" in result.figures:
            self.logger.log_image("val/calibration", result.figures["calibration"], self.step,
                                  caption=f"epoch {self.epoch}: IoU head reliability")
        metrics = all_reduce_mean(result.metrics, self.dist, self.device) if self.dist.enabled else result.metrics
        return metrics, result.visuals

    def _calibration_guard(self, metrics: Dict[str, float]) -> None:
        message = calibration_warning(metrics, self.epoch)
        if message and self.dist.is_main:
            log.warning(message)

    def _tune_amg(self) -> Dict[str, float]:
        """AMG thresholds that fit the final best.pt, written beside it (best.amg.yaml), so that
        `segment` and `evaluate` use values this model's IoU head can pass (stock: generator.tuned=false)."""
        best = self.files.best_path
        if self.validator is None or self.val_set is None or len(self.val_set) == 0 or not best.is_file():
            return {}
        from mobilesam_se.evaluation.tuning import tune_amg_thresholds
        from mobilesam_se.inference.thresholds import write_tuned
        from mobilesam_se.models.checkpoint import load_model_weights

        model = copy.deepcopy(self.model)  # the trained architecture, with best.pt's weights
        load_model_weights(model, best)
        result = tune_amg_thresholds(
            model, self.val_set, self.device, multimask_output=self.validator.multimask_output,
            points_per_batch=self.validator.points_per_batch, max_images=self.tune_max_images, progress=self.progress,
            objective=self.tune_objective,
        )
        path = write_tuned(best, result.best, {"objective": result.objective, "split": "val",
                                               "num_images": result.num_images, "stock": result.stock, "tuned": result.tuned})
        log.info("AMG thresholds for best.pt -> %s\n%s", path, result.summary())
        out = {f"amg_tuned/{k}": v for k, v in result.best.items()}
        out.update({f"amg_tuned/{k}": v for k, v in result.tuned.items()})
        out.update({f"amg_stock/{k}": v for k, v in result.stock.items()})
        return out

    def fit(self) -> Dict[str, Any]:
        """Train (resuming from last.ckpt when there is one). A preemption signal (SIGUSR1/2, SIGTERM)
        stops at the next step with last.ckpt saved; `result["preempted"]` is then that signal and
        the caller exits (run.py: engine.preemption.exit_after_checkpoint, which requeues)."""
        catcher = SignalCatcher(self.request_stop).install()
        try:
            result = self._fit()
            self._agree_on_stop()  # a signal during the final barrier: all ranks must decide alike
        finally:
            catcher.restore()
        complete = self.epoch >= self.max_epochs or result["stopped_early"]
        result["preempted"] = self.stop_signal if (self.stop_signal is not None and not complete) else None
        return result

    def _fit(self) -> Dict[str, Any]:
        self._t0 = time.time()
        if self.files.has_last():
            state = self.load_last()
            run_id = state.get("wandb_run_id")
            if self.unfrozen:
                self.wrapped = self._wrap_ddp()  # DDP must see the parameters that now train
        else:
            run_id = None
        config = self._config_container()
        if self.logger is not None:
            self.logger.start(self.out_dir, config, run_id=run_id)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                (self.out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(self.run_config, resolve=True))
        if self.deterministic and self.device.type == "cuda":
            # CPU kernels already repeat exactly for a fixed thread count; CUDA needs cuDNN pinned.
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        patience = self.early_stop_patience
        stopped_early = False
        while self.epoch < self.max_epochs:
            if self.frozen_parts and not self.unfrozen and 0 < self.unfreeze_epoch <= self.epoch:
                self._unfreeze()
                self.wrapped = self._wrap_ddp()  # DDP must see the parameters that now train
            t = time.time()
            try:
                train_means = self._train_epoch()
            finally:
                self._set_train_image_size(self.image_size)
            if self.stop_requested and self.batch_in_epoch < self._micro_per_epoch():
                self.save_last()  # mid-epoch: resume continues this epoch
                break
            record: Dict[str, Any] = {"epoch": self.epoch, "step": self.step}
            record.update({f"train/{k}": v for k, v in train_means.items()})
            val_due = self.val_every > 0 and ((self.epoch + 1) % self.val_every == 0 or self.epoch + 1 == self.max_epochs)
            if val_due:
                metrics, visuals = self._validate(self.visual_images if self.dist.is_main else 0)
                record.update({f"val/{k}": v for k, v in metrics.items()})
                self._calibration_guard(metrics)
                score = metrics.get(self.monitor, float("nan"))
                improved = not math.isnan(score) and score > self.best_score
                if improved:
                    self.best_score = score
                    self.bad_validations = 0
                    self.files.save_best(self.model)
                else:
                    self.bad_validations += 1
                if self.dist.is_main and (improved or (self.visual_every > 0 and (self.epoch + 1) % self.visual_every == 0)):
                    save_validation_pictures(visuals, self.out_dir / "vis" / f"epoch_{self.epoch}", self.logger,
                                             self.step, self.epoch)
                if self.distiller is not None:
                    self.distiller.on_validation(score)
                self._log({f"val/{k}": v for k, v in metrics.items()} | {"val/best": self.best_score})
                if patience is not None and self.bad_validations >= patience:
                    stopped_early = True
            record["time_s"] = round(time.time() - t, 2)
            self.history.append({k: v for k, v in record.items() if isinstance(v, (int, float))})
            self.files.append_log(record)
            if self.dist.is_main:
                log.info("epoch %d: %s", self.epoch, ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                              if isinstance(v, float)))
            self.epoch += 1
            self.batch_in_epoch = 0
            self.save_last()
            if stopped_early:
                log.info("early stop: no improvement of val/%s in %d validations", self.monitor, patience)
                break
            if self._agree_on_stop():
                break
        barrier(self.dist)
        summary = {"best/" + self.monitor: self.best_score, "epochs": self.epoch, "steps": self.step}
        finished = self.epoch >= self.max_epochs or stopped_early
        if finished and self.dist.is_main and self.tune_amg:
            summary.update(self._tune_amg())
        if self.logger is not None:
            self.logger.summary(summary)
        return {"best_score": self.best_score, "epoch": self.epoch, "step": self.step, "history": self.history,
                "stopped_early": stopped_early, "stopped": self.stop_requested}
