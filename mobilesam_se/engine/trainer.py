"""The training loop: AdamW + warm-up/cosine, accumulation, autocast, clipping, freezing, validation,
early stopping, exact resume, atomic checkpoints, append-only logs, pictures and W&B.

The trainer receives built parts (model, criterion, datasets, logger, distiller); `run.py` builds
them from the Hydra config with `hydra.utils.instantiate`.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mobilesam_se.data.sample import collate_samples
from mobilesam_se.engine.distributed import DistInfo, all_reduce_max, all_reduce_mean, barrier, cuda_index
from mobilesam_se.engine.everything import everything_step
from mobilesam_se.engine.freeze import estimate_batchnorm_stats, freeze_batchnorm_stats, freeze_parts, unfreeze_parts
from mobilesam_se.engine.optim import build_optimizer, build_scheduler
from mobilesam_se.engine.preemption import SignalCatcher, code_of, signal_of
from mobilesam_se.engine.sampler import EpochSampler
from mobilesam_se.engine.state import capture_rng, restore_rng
from mobilesam_se.engine.validate import validate
from mobilesam_se.models.checkpoint import atomic_save, export_official, load_official_state_dict, official_state_dict
from mobilesam_se.visual import overlay_masks_on_image, save_rgb, side_by_side

log = logging.getLogger(__name__)


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_autocast(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast on CUDA by default; fp32 on CPU unless bf16 is asked for explicitly."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "fp32":
        return None
    raise ValueError(f"trainer.precision must be auto|bf16|fp16|fp32, got {precision!r}")


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        model: nn.Module,
        criterion: nn.Module,
        train_set,
        val_set,
        out_dir: Path,
        logger=None,
        distiller=None,
        dist_info: Optional[DistInfo] = None,
        extra_loss: Optional[Callable[..., Dict[str, torch.Tensor]]] = None,
    ) -> None:
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.dist = dist_info or DistInfo()
        self.device = resolve_device(self.tcfg.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", cuda_index(self.dist.local_rank))
        self.autocast_dtype = resolve_autocast(self.tcfg.precision, self.device)
        self.model = model.to(self.device)
        self.criterion = criterion
        self.distiller = distiller
        self.extra_loss = extra_loss
        self.train_set, self.val_set = train_set, val_set
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.logger = logger if self.dist.is_main else None
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

        frozen = [p for p in ("image_encoder", "prompt_encoder", "mask_decoder") if cfg.freeze[p]]
        self.frozen_parts = freeze_parts(self.model, frozen)
        self.optimizer = build_optimizer(self.model, self.tcfg.lr, self.tcfg.weight_decay, self.tcfg.betas)
        self.sampler = EpochSampler(len(train_set), seed=cfg.seed, rank=self.dist.rank, world_size=self.dist.world_size)
        self.loader = DataLoader(
            train_set, batch_size=cfg.dataset.batch_size, sampler=self.sampler, collate_fn=collate_samples,
            num_workers=cfg.dataset.num_workers, drop_last=False,
        )
        self.shard_len = len(self.sampler)
        self.steps_per_epoch = math.ceil(self._micro_per_epoch() / self.tcfg.grad_accum)
        self.total_steps = self.steps_per_epoch * self.tcfg.max_epochs
        self.scheduler = build_scheduler(self.optimizer, self.tcfg.warmup_steps, self.total_steps, self.tcfg.min_lr_ratio)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.wrapped = self._wrap_ddp(self.model)

    # -- set-up ----------------------------------------------------------------------------------
    @property
    def _manual_grad_sync(self) -> bool:
        """Prompted (single / mixed) mode decodes outside the model's forward, which DDP's hooks
        do not see; there gradients are averaged across ranks by hand before each step."""
        return self.dist.enabled and self.cfg.dataset.mode != "everything"

    def _sync_gradients(self) -> None:
        import torch.distributed as tdist

        for g in self.optimizer.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)  # every rank must join every all-reduce
                tdist.all_reduce(p.grad)
                p.grad /= self.dist.world_size

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        if not self.dist.enabled or self._manual_grad_sync:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # Some parameters are legitimately unused (mask-prompt path, token 0 in multimask mode).
        return DDP(model, device_ids=ids, find_unused_parameters=True)

    def _val_loader(self) -> Optional[DataLoader]:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        return DataLoader(self.val_set, batch_size=self.cfg.dataset.val_batch_size, shuffle=False,
                          collate_fn=collate_samples, num_workers=self.cfg.dataset.num_workers)

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.ckpt"

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
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save_last(self) -> None:
        if self.dist.is_main:
            atomic_save(self.state_dict(), self.last_path)

    def load_last(self) -> Dict[str, Any]:
        state = torch.load(self.last_path, map_location="cpu", weights_only=True)
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
    def _append_log(self, record: Dict[str, Any]) -> None:
        """Append-only, one line per epoch, beside the weights."""
        if not self.dist.is_main:
            return
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        line = "\t".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items())
        with open(self.ckpt_dir / "training_log.txt", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _log(self, metrics: Dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step=self.step)

    # -- freezing --------------------------------------------------------------------------------
    def _unfreeze(self) -> None:
        n = unfreeze_parts(self.model, self.frozen_parts, self.optimizer, self.tcfg.weight_decay, self.scheduler)
        self.unfrozen = True
        log.info("unfroze %s: %d tensors handed to the optimizer", self.frozen_parts, n)

    # -- the loop --------------------------------------------------------------------------------
    def request_stop(self, signum: Optional[int] = None, *_: Any) -> None:
        """Save at the next step boundary and return; `signum`: the preemption signal (engine/preemption.py)."""
        self.stop_requested = True
        if signum is not None and code_of(signum) >= code_of(self.stop_signal):
            self.stop_signal = signum

    def _micro_step(self, batch: Dict[str, Any], micro_index: int) -> Dict[str, torch.Tensor]:
        """Losses of one micro-batch: everything mode, plus the prompted loss (mixed / single mode)
        and distillation when configured. `loss` is what is optimised; the rest are its named terms."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + micro_index * self.dist.world_size + self.dist.rank)
        mcfg = self.cfg.model
        mode = self.cfg.dataset.mode
        res = None
        losses: Dict[str, torch.Tensor] = {}
        if mode != "single":
            if self.distiller is not None:
                # A mask teacher may add its own masks to the targets (distillation.mask_teacher.method=replace_gt).
                batch = self.distiller.prepare_targets(batch, self.device, self.autocast_dtype)
            need_features = self.distiller is not None and self.distiller.needs_features
            res = everything_step(
                self.wrapped, self.criterion, batch, self.device, mcfg.multimask_output, mcfg.points_per_batch,
                mcfg.activation_checkpointing, self.cfg.dataset.prompts_per_step, g, self.autocast_dtype,
                return_features=need_features,
                record_attention=need_features and self.distiller.needs_attention,
            )
            losses.update(res.losses)
            losses.update({k: torch.tensor(v) for k, v in res.stats.items()})
        if self.extra_loss is not None:
            # Prompted (single / mixed) mode: reuses res's image embeddings when there are some.
            extra = self.extra_loss(self.model, batch, res, self.device, self.autocast_dtype, g)
            losses["loss"] = losses["loss"] + extra["loss"] if "loss" in losses else extra["loss"]
            losses.update({k: v for k, v in extra.items() if k != "loss"})
        if self.distiller is not None and res is not None:
            dist_losses = self.distiller(self.model, batch, res, self.device, self.autocast_dtype)
            losses["loss"] = losses["loss"] + dist_losses["distill/total"]
            losses.update(dist_losses)
        return losses

    def _optimizer_step(self) -> bool:
        if self._manual_grad_sync:
            self._sync_gradients()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.tcfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
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
        if self.nonfinite > self.tcfg.max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite} non-finite losses/gradients (trainer.max_nonfinite={self.tcfg.max_nonfinite}); "
                "lower trainer.lr, enable trainer.grad_clip, or check the data"
            )

    def _train_epoch(self) -> Dict[str, float]:
        self.model.train()
        self.sampler.set_epoch(self.epoch, start=self.batch_in_epoch * self.cfg.dataset.batch_size)
        if hasattr(self.train_set, "set_epoch"):  # a stream of fresh scenes per epoch (data/synthetic.py)
            self.train_set.set_epoch(self.epoch)
        bn_epoch = self.cfg.freeze.get("batchnorm_stats_epoch")
        if bn_epoch is not None and self.epoch == bn_epoch and self.batch_in_epoch == 0 and not self.cfg.model.get("checkpoint"):
            # Population statistics on this epoch's first images, fixed from here on (a resume
            # after this epoch finds them in the checkpoint's buffers). From a checkpoint the
            # loaded statistics, those its weights were trained with, are kept fixed instead.
            n = min(len(self.train_set), int(self.cfg.freeze.get("batchnorm_stats_images", 64)))
            estimate_batchnorm_stats(self.model, [self.train_set[i].image for i in range(n)])
        if self.cfg.freeze.batchnorm_stats or (bn_epoch is not None and self.epoch >= bn_epoch):
            freeze_batchnorm_stats(self.model)
        # On the device (no host sync per step); a run resumed mid-epoch continues the sums it saved.
        sums: Dict[str, torch.Tensor] = {k: torch.tensor(v, device=self.device) for k, v in self._resumed_sums.items()}
        count = self._resumed_count
        self._resumed_sums, self._resumed_count = {}, 0
        self._epoch_sums, self._epoch_count = sums, count
        accum = self.tcfg.grad_accum
        backward_done = 0  # micro-batches with a finite loss in the current accumulation window
        bar = tqdm(self.loader, desc=f"epoch {self.epoch}", leave=False,
                   disable=not (self.tcfg.progress and self.dist.is_main))
        for batch in bar:
            micro_index = self.epoch * self._micro_per_epoch() + self.batch_in_epoch
            sync = (self.batch_in_epoch + 1) % accum == 0 or self.batch_in_epoch + 1 == self._micro_per_epoch()
            # The last window of an epoch may be shorter: average over the micro-batches it has.
            window_start = self.batch_in_epoch - self.batch_in_epoch % accum
            window = min(accum, self._micro_per_epoch() - window_start)
            use_no_sync = self.dist.enabled and not sync and not self._manual_grad_sync
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
                if stepped and self.step % self.tcfg.log_every == 0:
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
        return math.ceil(self.shard_len / self.cfg.dataset.batch_size)

    def _should_stop_now(self) -> bool:
        if self.tcfg.max_steps is not None and self.step >= self.tcfg.max_steps:
            self.stop_requested = True
        if self.tcfg.time_limit_min is not None and time.time() - self._t0 > 60 * self.tcfg.time_limit_min:
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

    def _validate(self, visuals: int) -> tuple:
        loader = self._val_loader()
        if loader is None:
            return {}, []
        from mobilesam_se.evaluation.everything import figure_to_rgb, training_evaluator

        # COCO mask AP/AR + IoU-head calibration when trainer.coco_eval_every is due (else None).
        evaluator = training_evaluator(self.model, self.cfg, self.epoch)
        metrics, vis = validate(
            self.model, loader, self.device, self.cfg.model.image_size, self.cfg.model.multimask_output,
            self.cfg.model.points_per_batch, self.autocast_dtype, max_images=self.cfg.dataset.val_max_images,
            progress=self.tcfg.progress and self.dist.is_main, keep_visuals=visuals, evaluator=evaluator,
        )
        if evaluator is not None and self.logger is not None:
            self.logger.log_image("val/calibration", figure_to_rgb(evaluator.plot_calibration()), self.step,
                                  caption=f"epoch {self.epoch}: IoU head reliability")
        if self.tcfg.get("prompted_eval", False) or self.cfg.dataset.mode != "everything":
            # Promptable quality (point / box / corrective clicks), logged as val/prompted/*.
            from mobilesam_se.evaluation.prompted import evaluate_promptable

            prompted = evaluate_promptable(
                self.model, loader, self.device, self.cfg.model.multimask_output,
                max_images=self.cfg.dataset.val_max_images, autocast_dtype=self.autocast_dtype,
                points_per_batch=self.cfg.model.points_per_batch, progress=self.tcfg.progress and self.dist.is_main,
            )
            metrics.update({f"prompted/{k}": v for k, v in prompted.items()})
        return all_reduce_mean(metrics, self.dist, self.device) if self.dist.enabled else metrics, vis

    def _calibration_guard(self, metrics: Dict[str, float]) -> None:
        message = calibration_warning(metrics, self.epoch)
        if message and self.dist.is_main:
            log.warning(message)

    def _tune_amg(self) -> Dict[str, float]:
        """AMG thresholds that fit the final best.pt, written beside it (best.amg.yaml), so that
        `segment` and `evaluate` use values this model's IoU head can pass (stock: generator.tuned=false)."""
        best = self.ckpt_dir / "best.pt"
        if self.val_set is None or len(self.val_set) == 0 or not best.is_file():
            return {}
        from hydra.utils import instantiate

        from mobilesam_se.evaluation.tuning import tune_amg_thresholds
        from mobilesam_se.inference.thresholds import write_tuned
        from mobilesam_se.models.checkpoint import load_model_weights

        model = instantiate(OmegaConf.merge(self.cfg.model.net, {"checkpoint": None}))
        load_model_weights(model, best)
        result = tune_amg_thresholds(
            model, self.val_set, self.device, multimask_output=self.cfg.model.multimask_output,
            points_per_batch=self.cfg.model.points_per_batch, max_images=self.tcfg.get("tune_max_images"),
            progress=self.tcfg.progress,
        )
        path = write_tuned(best, result.best, {"objective": result.objective, "split": "val",
                                               "num_images": result.num_images, "stock": result.stock, "tuned": result.tuned})
        log.info("AMG thresholds for best.pt -> %s\n%s", path, result.summary())
        out = {f"amg_tuned/{k}": v for k, v in result.best.items()}
        out.update({f"amg_tuned/{k}": v for k, v in result.tuned.items()})
        out.update({f"amg_stock/{k}": v for k, v in result.stock.items()})
        return out

    def _save_visuals(self, visuals: List[Dict[str, Any]]) -> None:
        if not visuals or not self.dist.is_main:
            return
        folder = self.out_dir / "vis" / f"epoch_{self.epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        for item in visuals:
            pts = item["points"]
            colors = np.full((len(pts), 3), 255, np.uint8)
            colors[item["points_matched"]] = (255, 40, 40)  # prompts that produced a matched mask
            pred = overlay_masks_on_image(item["image"], item["pred"], points=pts, point_colors=colors)
            gt = overlay_masks_on_image(item["image"], item["gt"])
            pic = side_by_side(gt, pred)
            save_rgb(folder / f"{item['image_id']}.png", pic)
            if self.logger is not None:
                self.logger.log_image(f"val/overlay/{item['image_id']}", pic, self.step,
                                      caption=f"epoch {self.epoch}: ground truth | matched predictions")

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
        complete = self.epoch >= self.tcfg.max_epochs or result["stopped_early"]
        result["preempted"] = self.stop_signal if (self.stop_signal is not None and not complete) else None
        return result

    def _fit(self) -> Dict[str, Any]:
        self._t0 = time.time()
        if self.last_path.exists() and self.cfg.trainer.get("resume", True):
            state = self.load_last()
            run_id = state.get("wandb_run_id")
            if self.unfrozen:
                self.wrapped = self._wrap_ddp(self.model)  # DDP must see the parameters that now train
        else:
            run_id = None
        if self.logger is not None:
            self.logger.start(self.out_dir, OmegaConf.to_container(self.cfg, resolve=True), run_id=run_id)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        if self.tcfg.deterministic and self.device.type == "cuda":
            # CPU kernels already repeat exactly for a fixed thread count; CUDA needs cuDNN pinned.
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        patience = self.tcfg.early_stop_patience
        stopped_early = False
        while self.epoch < self.tcfg.max_epochs:
            if self.frozen_parts and not self.unfrozen and 0 < self.cfg.freeze.unfreeze_epoch <= self.epoch:
                self._unfreeze()
                self.wrapped = self._wrap_ddp(self.model)  # DDP must see the parameters that now train
            t = time.time()
            train_means = self._train_epoch()
            if self.stop_requested and self.batch_in_epoch < self._micro_per_epoch():
                self.save_last()  # mid-epoch: resume continues this epoch
                break
            record: Dict[str, Any] = {"epoch": self.epoch, "step": self.step}
            record.update({f"train/{k}": v for k, v in train_means.items()})
            val_due = self.tcfg.val_every > 0 and ((self.epoch + 1) % self.tcfg.val_every == 0 or self.epoch + 1 == self.tcfg.max_epochs)
            if val_due:
                n_vis = self.cfg.visual.num_images if self.dist.is_main else 0
                metrics, visuals = self._validate(n_vis)
                record.update({f"val/{k}": v for k, v in metrics.items()})
                self._calibration_guard(metrics)
                score = metrics.get(self.tcfg.monitor, float("nan"))
                improved = not math.isnan(score) and score > self.best_score
                if improved:
                    self.best_score = score
                    self.bad_validations = 0
                    if self.dist.is_main:
                        export_official(self.model, self.ckpt_dir / "best.pt")
                else:
                    self.bad_validations += 1
                every = self.cfg.visual.save_every_n_epochs
                if improved or (every > 0 and (self.epoch + 1) % every == 0):
                    self._save_visuals(visuals)
                if self.distiller is not None:
                    self.distiller.on_validation(score)
                self._log({f"val/{k}": v for k, v in metrics.items()} | {"val/best": self.best_score})
                if patience is not None and self.bad_validations >= patience:
                    stopped_early = True
            record["time_s"] = round(time.time() - t, 2)
            self.history.append({k: v for k, v in record.items() if isinstance(v, (int, float))})
            self._append_log(record)
            if self.dist.is_main:
                log.info("epoch %d: %s", self.epoch, ", ".join(f"{k}={v:.4g}" for k, v in record.items()
                                                              if isinstance(v, float)))
            self.epoch += 1
            self.batch_in_epoch = 0
            self.save_last()
            if stopped_early:
                log.info("early stop: no improvement of val/%s in %d validations", self.tcfg.monitor, patience)
                break
            if self._agree_on_stop():
                break
        barrier(self.dist)
        summary = {"best/" + self.tcfg.monitor: self.best_score, "epochs": self.epoch, "steps": self.step}
        finished = self.epoch >= self.tcfg.max_epochs or stopped_early
        if finished and self.dist.is_main and self.tcfg.get("tune_amg", False):
            summary.update(self._tune_amg())
        if self.logger is not None:
            self.logger.summary(summary)
        return {"best_score": self.best_score, "epoch": self.epoch, "step": self.step, "history": self.history,
                "stopped_early": stopped_early, "stopped": self.stop_requested}
