"""The per-worker training function: `train_func(config)` runs on every Ray Train worker.

Importable and callable on its own (tests call it under Ray Train's local mode). The training
stream is one pass over the remaining sample schedule (see data/pipeline.py): epochs are counted
in optimizer steps, so a restart resumes mid-epoch at the checkpoint's step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from morphmlp import storage
from morphmlp.config import from_dict
from morphmlp.data import transforms
from morphmlp.train import optim
from morphmlp.train.checkpoint import (
    CHECKPOINT_DIR_PREFIX,
    Progress,
    export_model,
    read_checkpoint_dir,
    unwrap,
    write_checkpoint_dir,
)
from morphmlp.train.config import TrainJobConfig

log = logging.getLogger("morphmlp.train")


@dataclass
class RunInfo:
    """What the driver worked out before launching workers (not user configuration)."""

    class_names: list[str]
    steps_per_epoch: int
    run_dir: str  # storage/name: best/ and final/ exports go here
    mlflow_run_id: str | None
    tracking_uri: str
    bad_data_ledger: str | None = None  # name of the BadDataLedger actor
    # The checkpoint folder to start from while Ray Train has none of its own (its snapshot was
    # cut short by a crash; trainer.recover_from_broken_snapshot).
    recovered_checkpoint: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def build_model(cfg: TrainJobConfig, num_classes: int) -> torch.nn.Module:
    from morphmlp import models
    from morphmlp.train.config import architecture

    given = {
        "num_classes": num_classes,
        "num_frames": cfg.model.num_frames,
        "img_size": cfg.model.img_size,
        "drop_path_rate": cfg.model.drop_path_rate,
    }
    model = models.build_model(
        architecture(cfg.model.variant, **{k: v for k, v in given.items() if v is not None})
    )
    if cfg.model.pretrained:
        # an image checkpoint is inflated (kernels at the middle frame); a video one loads as is
        models.load_checkpoint(model, cfg.model.pretrained, strict=True, inflate="center")
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


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

    # The initial weights follow run.seed: a run can be reproduced, and trials of a search that
    # differ only in hyperparameters start from the same network.
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, info.num_classes).to(device)
    optimizer = optim.build_optimizer(
        model, lr=cfg.scaled_lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas
    )
    amp_dtype = autocast_dtype(cfg.optim.precision, device)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    progress = Progress(mlflow_run_id=info.mlflow_run_id)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and info.recovered_checkpoint:
        fs, path = storage.resolve(info.recovered_checkpoint)
        checkpoint = ray.train.Checkpoint(path, filesystem=fs)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = read_checkpoint_dir(directory)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        if rank == 0:
            log.info("resumed at epoch %d, step %d", progress.epoch, progress.step)

    net = ray.train.torch.prepare_model(model)  # DDP when world > 1, device placement
    if cfg.model.compile:
        net = torch.compile(net)

    from morphmlp.tracking import Tracker

    tracker = Tracker(info.mlflow_run_id, info.tracking_uri, enabled=rank == 0)
    loop = _Loop(cfg, info, net, optimizer, scaler, amp_dtype, device, rank, world, tracker)
    loop.run(progress)


class _Loop:
    def __init__(self, cfg, info, net, optimizer, scaler, amp_dtype, device, rank, world, tracker):
        self.cfg, self.info, self.net = cfg, info, net
        self.optimizer, self.scaler, self.amp_dtype = optimizer, scaler, amp_dtype
        self.device, self.rank, self.world, self.tracker = device, rank, world, tracker
        self.total_steps = cfg.optim.epochs * info.steps_per_epoch
        self.warmup_steps = math.ceil(cfg.optim.warmup_epochs * info.steps_per_epoch)
        self.mean = torch.tensor(cfg.data.mean, device=device).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(cfg.data.std, device=device).view(1, 3, 1, 1, 1)
        # Validation views are deterministic: a shard that fits data.val_cache_mb is decoded once
        # and kept (on the host), so later epochs skip the decode pool's start and work.
        self.val_cache: list[dict[str, torch.Tensor]] | None = None
        self.val_cache_fits = cfg.data.val_cache_mb > 0

    # -- the pieces of one step ------------------------------------------------------------
    def lr(self, step: int) -> float:
        o = self.cfg.optim
        return optim.lr_at(
            step,
            base_lr=self.cfg.scaled_lr,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            warmup_start_lr=o.warmup_start_lr,
            min_lr=o.min_lr,
        )

    def prepare(self, clips: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        """uint8 (B, T, H, W, 3) → normalised (B, 3, T, H, W), erased, mixed; soft targets."""
        o, d = self.cfg.optim, self.cfg.data
        x = transforms.normalize(clips, self.mean, self.std)
        if d.random_erasing > 0:
            x = transforms.random_erasing(x, d.random_erasing, generator=gen)
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
            batch_size=self.cfg.optim.batch_size,
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
        if progress.step >= self.total_steps:
            self.finish(progress)
            return
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
                optim.set_lr(self.optimizer, self.lr(progress.step))
            meter.wait += waited
            x, targets = self.prepare(batch["clip"], batch["label"], gen)
            sync = micro == accum - 1 or self.world == 1
            ctx = contextlib.nullcontext() if sync else self.net.no_sync()
            with ctx, self.autocast():
                logits = self.net(x)
                loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
            meter.loss += loss.detach()
            meter.clips += x.shape[0]
            micro += 1
            if micro < accum:
                continue
            micro = 0
            self.optimizer_step()
            progress.step += 1
            progress.position += cfg.global_batch
            meter.steps += 1
            meter.time += time.perf_counter() - step_start
            step_start = time.perf_counter()

            epoch_end = progress.step % info.steps_per_epoch == 0
            # also at each epoch's end, so that short epochs still get their step metrics
            if progress.step % cfg.run.log_every_steps == 0 or epoch_end:
                self.log_step(progress, meter)
                meter = _Meter()
            if epoch_end:
                progress.epoch = progress.step // info.steps_per_epoch
                stop = self.end_epoch(progress)
                self.net.train()
                if stop or progress.step >= self.total_steps:
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
        eta = (self.total_steps - progress.step) * step_time
        metrics = {
            "train/loss": loss,
            "train/lr": self.lr(progress.step - 1),
            "train/clips_per_s": clips_per_s,
            "train/data_wait_fraction": meter.wait / max(meter.time, 1e-9),
        }
        self.tracker.log_metrics(metrics, progress.step)
        log.info(
            "step %d/%d  epoch %.2f  loss %.4f  lr %.2e  %.1f clips/s  data wait %.0f%%  ETA %s",
            progress.step,
            self.total_steps,
            progress.step / self.info.steps_per_epoch,
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
                int(bad.get("data/bad_videos", 0)),
                time.perf_counter() - t0,
            )
        stop = bad.get("data/bad_fraction", 0.0) > self.cfg.data.max_bad_fraction
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
        if not self.info.bad_data_ledger:
            return {}
        from morphmlp.data.pipeline import BadDataLedger

        summary = BadDataLedger.lookup(self.info.bad_data_ledger).summary()
        return {
            "data/bad_videos": float(summary["bad"]),
            "data/bad_fraction": float(summary["fraction"]),
        }

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
        if progress.step >= self.total_steps:
            self.export("final", {"step": progress.step, "best_val_top1": progress.best_top1})


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
