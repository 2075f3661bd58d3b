"""The per-worker training function: `train_func(config)` runs on every Ray Train worker.

Importable and callable on its own (tests call it under Ray Train's local mode). The training
stream is one pass over the remaining sample schedule (data/pipeline.py). How far the run is, is
the sample position (data/schedule.py): epochs end and the learning rate moves by position, so a
restart resumes mid-epoch at the checkpoint's sample, at whatever global batch is now in force.
Steps are counted for the log and for the per-step random seeds only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from morphmlp import storage
from morphmlp.config import from_dict
from morphmlp.data import schedule, transforms
from morphmlp.models.factory import create_model
from morphmlp.train import optim
from morphmlp.train.checkpoint import (
    BAD_DATA_FILE,
    CHECKPOINT_DIR_PREFIX,
    Progress,
    export_model,
    unwrap,
    write_checkpoint_dir,
)
from morphmlp.train.config import TrainJobConfig
from morphmlp.train.resume import restore

log = logging.getLogger("morphmlp.train")


@dataclass
class RunInfo:
    """What the driver worked out before launching workers (not user configuration)."""

    class_names: list[str]
    epoch_size: int  # training videos: the positions of one epoch (data/schedule.py)
    run_dir: str  # storage/name: best/ and final/ exports go here
    mlflow_run_id: str | None
    tracking_uri: str
    # names of the BadDataLedger actors, by split ("train", "val")
    bad_data_ledgers: dict[str, str] = field(default_factory=dict)
    # The checkpoint folder to start from while Ray Train has none of its own (its snapshot was
    # cut short by a crash; resume.recover_from_broken_snapshot).
    recovered_checkpoint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against soft targets (mixup/cutmix, label smoothing; timm's
    SoftTargetCrossEntropy), computed in float32 whatever the autocast dtype."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16


def step_seed(seed: int, rank: int, step: int) -> int:
    """Every random draw of a step (drop path, erasing, mixup) derives from this, so a resumed
    run continues the exact random streams without saving RNG state."""
    return (seed * 1_000_003 + rank * 7919 + step) % (2**63 - 1)


def train_func(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = from_dict(TrainJobConfig, config["job"])
    info = RunInfo(**config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, math.ceil(cfg.scaling.cpus_per_worker)))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Ray 2.60 logs every ray.train.report() at INFO with the whole metrics dict ("Reporting
    # training result N: TrainingReport(...)"), from a logger named by its file's path: the
    # LoggingConfig(log_level="WARNING") the driver sets filters "ray.train.*" names only and
    # misses it. The step and epoch lines already say it; so that logger gets the same level.
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)

    # The initial weights follow run.seed: a run can be reproduced, and trials of a search that
    # differ only in hyperparameters start from the same network.
    torch.manual_seed(cfg.run.seed)
    model = create_model(
        cfg.model.variant,
        num_classes=info.num_classes,
        pretrained=cfg.model.pretrained,
        **cfg.model.factory_kwargs(),
    ).to(device)
    optimizer = optim.build_optimizer(
        model, lr=cfg.scaled_lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas
    )
    amp_dtype = autocast_dtype(cfg.optim.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    progress = restore(
        model,
        optimizer,
        scaler,
        recovered_checkpoint=info.recovered_checkpoint,
        mlflow_run_id=info.mlflow_run_id,
        rank=rank,
    )

    net = ray.train.torch.prepare_model(model)  # DDP when world > 1, device placement
    if cfg.model.compile:
        net = torch.compile(net)

    from morphmlp.tracking import Tracker

    tracker = Tracker(info.mlflow_run_id, info.tracking_uri, enabled=rank == 0)
    parts = LoopParts(net, optimizer, scaler, amp_dtype, device, rank, world, tracker)
    _Loop(cfg, info, parts).run(progress)


@dataclass
class LoopParts:
    """What one worker's loop works with, built by train_func."""

    net: torch.nn.Module  # as prepared by Ray Train (DDP when world > 1), compiled on request
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    amp_dtype: torch.dtype | None  # None: no autocast
    device: torch.device
    rank: int
    world: int
    tracker: Any  # morphmlp.tracking.Tracker, enabled on rank 0


class _Loop:
    def __init__(self, cfg: TrainJobConfig, info: RunInfo, parts: LoopParts):
        self.cfg, self.info = cfg, info
        self.net, self.optimizer, self.scaler = parts.net, parts.optimizer, parts.scaler
        self.amp_dtype, self.device = parts.amp_dtype, parts.device
        self.rank, self.world, self.tracker = parts.rank, parts.world, parts.tracker
        device = parts.device
        # The schedule in positions (samples): the same for every global batch.
        self.total_positions = cfg.optim.epochs * info.epoch_size
        self.warmup_positions = math.ceil(cfg.optim.warmup_epochs * info.epoch_size)
        self.mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1, 1)
        # Validation views are deterministic: a shard that fits data.val_cache_mb is decoded once
        # and kept (on the host), so later epochs skip the decode pool's start and work.
        self.val_cache: list[dict[str, torch.Tensor]] | None = None
        self.val_cache_fits = cfg.data.val_cache_mb > 0

    # -- the pieces of one step ------------------------------------------------------------
    def lr(self, position: int) -> float:
        """The release's warmup + cosine, as a function of the sample position."""
        o = self.cfg.optim
        return optim.lr_at(
            position,
            base_lr=self.cfg.scaled_lr,
            total_steps=self.total_positions,
            warmup_steps=self.warmup_positions,
            warmup_start_lr=o.warmup_start_lr,
            min_lr=o.min_lr,
        )

    def prepare(self, clips: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        """uint8 (B, T, H, W, 3) → normalised (B, 3, T, H, W), erased, mixed; soft targets."""
        o = self.cfg.optim
        x = transforms.prepare_clips(clips, self.cfg.data, generator=gen)
        return transforms.mixup_cutmix(
            x,
            labels,
            self.info.num_classes,
            mixup_alpha=o.mixup_alpha,
            cutmix_alpha=o.cutmix_alpha,
            prob=o.mixup_prob,
            switch_prob=o.mixup_switch_prob,
            label_smoothing=o.label_smoothing,
            generator=gen,
        )

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def micro_batches(self) -> Iterator[tuple[dict, float]]:
        """Training batches with the time spent waiting for each one."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        batches = shard.iter_torch_batches(
            # a batch is batch_size videos, each as data.num_samples clips that the decode actor
            # made from one decode (PySlowFast's multiple_samples_collate); positions count videos
            batch_size=self.cfg.optim.batch_size * self.cfg.data.num_samples,
            device=self.device,
            drop_last=True,
            prefetch_batches=2,
        )
        iterator = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            yield batch, time.perf_counter() - t0

    # -- the loop ----------------------------------------------------------------------------
    def run(self, progress: Progress) -> None:
        cfg, info = self.cfg, self.info
        if progress.position >= self.total_positions:
            self.finish(progress)
            return
        gb = cfg.global_batch
        epoch_stop = schedule.epoch_stop(progress.position, info.epoch_size, gb)
        progress.global_batch = gb
        accum = cfg.optim.grad_accum_steps
        meter = _Meter()
        micro = 0
        step_start = time.perf_counter()
        gen = torch.Generator(device=self.device)
        self.net.train()
        for batch, waited in self.micro_batches():
            if micro == 0:
                seed = step_seed(cfg.run.seed, self.rank, progress.step)
                torch.manual_seed(seed)  # drop path
                gen.manual_seed(seed)  # erasing, mixup
                optim.set_lr(self.optimizer, self.lr(progress.position))
            meter.wait += waited
            x, targets = self.prepare(batch["clip"], batch["label"], gen)
            sync = micro == accum - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx, self.autocast():
                logits = self.net(x)
                loss = soft_target_cross_entropy(logits, targets)
            (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
            meter.loss += loss.detach()
            meter.clips += x.shape[0]
            micro += 1
            if micro < accum:
                continue
            micro = 0
            self.optimizer_step()
            progress.step += 1
            progress.position += gb
            meter.steps += 1
            meter.time += time.perf_counter() - step_start
            step_start = time.perf_counter()

            epoch_end = progress.position >= epoch_stop
            # also at each epoch's end, so that short epochs still get their step metrics
            if progress.step % cfg.run.log_every_steps == 0 or epoch_end:
                self.log_step(progress, meter)
                meter = _Meter()
            if epoch_end:
                # the epoch's remainder (under one global batch) is skipped, as drop_last does
                progress.epoch = schedule.epoch_of(progress.position - 1, info.epoch_size) + 1
                progress.position = progress.epoch * info.epoch_size
                epoch_stop = schedule.epoch_stop(progress.position, info.epoch_size, gb)
                stop = self.end_epoch(progress)
                self.net.train()
                if stop or progress.position >= self.total_positions:
                    break
            elif cfg.run.checkpoint_every_steps and (
                progress.step % cfg.run.checkpoint_every_steps == 0
            ):
                self.save(progress, {})
            step_start = time.perf_counter()
        self.finish(progress)

    def optimizer_step(self) -> None:
        clip = self.cfg.optim.clip_grad_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def log_step(self, progress: Progress, meter: _Meter) -> None:
        if self.rank != 0 or meter.steps == 0:
            return
        loss = float(meter.loss) / (meter.steps * self.cfg.optim.grad_accum_steps)
        clips_per_s = meter.clips * self.world / max(meter.time, 1e-9)
        step_time = meter.time / meter.steps
        gb, n = self.cfg.global_batch, self.info.epoch_size
        left = schedule.steps_left(progress.position, self.cfg.optim.epochs, n, gb)
        eta = left * step_time
        metrics = {
            "train/loss": loss,
            "train/lr": self.lr(progress.position - gb),
            "train/global_batch": gb,
            "train/world_size": self.world,
            "train/clips_per_s": clips_per_s,
            "train/data_wait_fraction": meter.wait / max(meter.time, 1e-9),
        }
        self.tracker.log_metrics(metrics, progress.step)
        log.info(
            "step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %.1f clips/s  data wait %.0f%%  ETA %s",
            progress.step,
            progress.step + left,
            progress.position / n,
            loss,
            metrics["train/lr"],
            clips_per_s,
            100 * metrics["train/data_wait_fraction"],
            _hms(eta),
        )

    def end_epoch(self, progress: Progress) -> bool:
        """Validate, track the best, checkpoint. Returns True when training must stop."""
        t0 = time.perf_counter()
        val = self.validate()
        bad = self.bad_data_summary()
        metrics = {**val, **bad}
        improved = val["val/top1"] > progress.best_top1
        if improved:
            progress.best_top1, progress.best_epoch = val["val/top1"], progress.epoch
            self.export("best", {**val, "epoch": progress.epoch})
        self.tracker.log_metrics({**metrics, "epoch": progress.epoch}, progress.step)
        if self.rank == 0:
            log.info(
                "epoch %d/%d  val top1 %.2f%%  top5 %.2f%%  loss %.4f  (best %.2f%% @ %d)  "
                "%s bad videos  [val %.0fs]",
                progress.epoch,
                self.cfg.optim.epochs,
                100 * val["val/top1"],
                100 * val["val/top5"],
                val["val/loss"],
                100 * progress.best_top1,
                progress.best_epoch,
                int(sum(v for k, v in bad.items() if k.endswith("_bad_videos"))),
                time.perf_counter() - t0,
            )
        stop = any(
            v > self.cfg.data.max_bad_fraction for k, v in bad.items() if k.endswith("_fraction")
        )
        self.save_bad_data(stop)
        self.save(progress, {**metrics, "stop_bad_data": float(stop)})
        return stop

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        self.net.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # n, top1, top5, loss
        for batch in self._val_batches():
            x = transforms.normalize(batch["clip"].to(self.device), self.mean, self.std)
            labels = batch["label"].to(self.device).long()
            with self.autocast():
                logits = self.net(x).float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            totals[0] += labels.numel()
            totals[1] += (top5[:, 0] == labels).sum()
            totals[2] += (top5 == labels[:, None]).any(dim=1).sum()
            totals[3] += F.cross_entropy(logits, labels, reduction="sum")
        if self.world > 1:
            dist.all_reduce(totals)
        n = max(float(totals[0]), 1.0)
        return {
            "val/top1": float(totals[1]) / n,
            "val/top5": float(totals[2]) / n,
            "val/loss": float(totals[3]) / n,
            "val/videos": float(totals[0]),
        }

    def _val_batches(self):
        if self.val_cache is not None:
            yield from self.val_cache
            return
        import ray.train

        budget, kept = self.cfg.data.val_cache_mb * 2**20, []
        shard = ray.train.get_dataset_shard("val")
        for batch in shard.iter_torch_batches(
            batch_size=self.cfg.optim.batch_size, prefetch_batches=2
        ):
            if self.val_cache_fits:
                kept.append(batch)
                budget -= sum(t.numel() * t.element_size() for t in batch.values())
                if budget < 0:
                    self.val_cache_fits, kept = False, []
            yield batch
        if self.val_cache_fits:
            self.val_cache = kept

    def bad_data_summary(self) -> dict[str, float]:
        """Bad videos and their fraction per split, over every attempt of this run."""
        from morphmlp.data.bad_data import BadDataLedger

        metrics = {}
        for split, name in self.info.bad_data_ledgers.items():
            summary = BadDataLedger.lookup(name).summary()
            metrics[f"data/{split}_bad_videos"] = float(summary["bad"])
            metrics[f"data/{split}_bad_fraction"] = float(summary["fraction"])
        return metrics

    def save_bad_data(self, stopped: bool) -> None:
        """Rank 0 keeps what the ledgers found in the run's storage, beside the checkpoints, so
        that a re-run counts it (and refuses to go on past the threshold: train/driver.py)."""
        if self.rank != 0 or not self.info.bad_data_ledgers:
            return
        from morphmlp.data.bad_data import BadDataLedger, save_states

        states = {s: BadDataLedger.lookup(n).state() for s, n in self.info.bad_data_ledgers.items()}
        save_states(
            storage.join(self.info.run_dir, BAD_DATA_FILE),
            {"stopped": stopped, "max_bad_fraction": self.cfg.data.max_bad_fraction, **states},
        )

    def export(self, kind: str, metrics: dict[str, float]) -> None:
        """Weights-only model file at <run_dir>/<kind>/model.pt (rank 0, atomic)."""
        if self.rank != 0:
            return
        from morphmlp.config import to_dict

        export_model(
            storage.join(self.info.run_dir, kind, "model.pt"),
            model=self.net,
            model_config=to_dict(unwrap(self.net).cfg),
            class_names=self.info.class_names,
            data_config=to_dict(self.cfg.data),
            metrics=metrics,
        )

    def save(self, progress: Progress, metrics: dict[str, float]) -> None:
        """Report to Ray Train with a checkpoint (written by rank 0; every rank reports)."""
        import ray.train

        report = {
            "step": progress.step,
            "epoch": progress.epoch,
            "val_top1": progress.best_top1 if not metrics else metrics.get("val/top1", 0.0),
            "best_val_top1": progress.best_top1,
            **{k.replace("/", "_"): v for k, v in metrics.items()},
        }
        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        from morphmlp.config import to_dict

        with tempfile.TemporaryDirectory(prefix="morphmlp-ckpt-") as directory:
            write_checkpoint_dir(
                directory,
                model=self.net,
                optimizer=self.optimizer,
                scaler=self.scaler,
                progress=progress,
                config=to_dict(self.cfg),
            )
            ray.train.report(
                report,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_dir_name=f"{CHECKPOINT_DIR_PREFIX}{progress.step:08d}",
            )

    def finish(self, progress: Progress) -> None:
        if progress.position >= self.total_positions:
            self.export("final", {"step": progress.step, "best_val_top1": progress.best_top1})
        # The queued metrics of an outage go out when the server is back; past this wait the
        # tracker says how many calls it could not send (the checkpoints hold the run anyway).
        self.tracker.flush(timeout_s=180.0)


@dataclass
class _Meter:
    loss: Any = 0.0
    clips: int = 0
    steps: int = 0
    time: float = 0.0
    wait: float = 0.0


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
