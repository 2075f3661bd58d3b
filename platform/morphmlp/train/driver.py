"""Driver side of a training run: check everything, plan the run, assemble the TorchTrainer, fit.

Everything that can be wrong with the user's input is checked in `prepare` before Ray starts a
single worker: the architecture (built on the meta device), the index, the storage URI and the
MLflow store. `prepare` returns a `TrainPlan`: the config as resolved (never changed after) and
what the driver worked out from it (absolute storage root, run name and folder, steps per epoch,
where an earlier attempt stopped). A search plans each trial from its parent's plan
(`plan_trial`), reusing the index and the checks. Recording in MLflow is `recording`'s job;
where a run stands and how it continues is `resume`'s.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from morphmlp import storage, tracking
from morphmlp.config import ConfigError, to_dict
from morphmlp.data import schedule
from morphmlp.train import recording
from morphmlp.train.checkpoint import BAD_DATA_FILE, Progress, read_progress
from morphmlp.train.config import TrainJobConfig, default_run_name, steps_per_epoch
from morphmlp.train.loop import RunInfo, train_func
from morphmlp.train.resume import ResumeError, latest_progress, recover_from_broken_snapshot

if TYPE_CHECKING:
    from morphmlp.data.index import VideoIndex

log = logging.getLogger("morphmlp.train")

Resume = Literal["auto", "must", "never"]


@dataclass
class TrainPlan:
    cfg: TrainJobConfig  # as resolved from the user's layers; the driver never changes it
    index_uri: str  # the dataset's index (the demo's, once generated, for `dataset: demo`)
    train_index: VideoIndex
    val_index: VideoIndex
    storage_root: str  # run.storage made absolute (a URI stays as given)
    run_name: str  # run.name, or the name derived from variant, frames and dataset
    run_dir: str  # <storage_root>/<run_name>
    steps_per_epoch: int
    progress: Progress | None  # where an earlier attempt of this run stopped
    # Set when Ray Train's snapshot was cut short: the checkpoint folder the run continues from.
    recovered_checkpoint: str | None = None

    def recorded_config(self) -> dict[str, Any]:
        """The config as MLflow records it: the tree, with the storage root the run used."""
        tree = to_dict(self.cfg)
        tree["run"]["storage"] = self.storage_root
        return tree


@dataclass
class TrainOutcome:
    run_name: str
    run_dir: str
    mlflow_run_id: str | None
    progress: Progress
    model_versions: dict[str, str] = field(default_factory=dict)
    bad_data_report: str | None = None
    already_finished: bool = False  # a re-run of a finished run: nothing was done

    @property
    def best_model_uri(self) -> str:
        return storage.join(self.run_dir, "best", "model.pt")

    @property
    def final_model_uri(self) -> str:
        return storage.join(self.run_dir, "final", "model.pt")


def prepare(cfg: TrainJobConfig, *, resume: Resume = "auto") -> TrainPlan:
    """All checks that need no cluster; raises MorphMLPError subclasses with one-line messages."""
    from morphmlp.data.demo import ensure_demo_dataset
    from morphmlp.data.index import read_index

    check_architecture(cfg)
    index_uri = ensure_demo_dataset() if cfg.dataset == "demo" else cfg.dataset
    index = read_index(index_uri)
    train_index, val_index = index.split("train"), index.split("val")
    spe = steps_per_epoch(len(train_index), cfg)
    dataset_name = "demo" if cfg.dataset == "demo" else _stem(index_uri)
    run_name = cfg.run.name or default_run_name(cfg, dataset_name)
    storage_root = absolute_storage(cfg.run.storage)
    storage.check_writable(storage_root)
    plan = _plan(cfg, index_uri, train_index, val_index, storage_root, run_name, spe, resume)
    tracking.check_reachable(tracking.tracking_uri())
    return plan


def _check_continuation(plan: TrainPlan) -> None:
    """A re-run continues its run exactly, or refuses in one line naming why it can't."""
    from morphmlp.data.bad_data import load_states
    from morphmlp.data.errors import BadDataError

    recorded = recording.recorded_schedule(plan.run_dir)
    if plan.progress is not None and recorded is not None:
        now = recording.schedule_identity(plan)
        for key, was in recorded.items():
            if now.get(key) != was:
                raise ResumeError(
                    f"run {plan.run_name!r} can't continue exactly: its {key} was {was!r}, now "
                    f"{now.get(key)!r} (sample positions would mean other videos); choose "
                    "another --name"
                )
    states = load_states(storage.join(plan.run_dir, BAD_DATA_FILE))
    limit = plan.cfg.data.max_bad_fraction
    for split in ("train", "val"):
        state = states.get(split)
        if not state:
            continue
        bad, seen = len(state["bad"]), len(set(state["seen"]) | {r["uri"] for r in state["bad"]})
        fraction = bad / max(seen, 1)
        if fraction > limit:
            from morphmlp.data.bad_data import describe_offenders

            raise BadDataError(
                f"run {plan.run_name!r} stopped for bad data: {bad} of {seen} {split} videos "
                f"({fraction:.2%}) could not be read, more than data.max_bad_fraction="
                f"{limit:.2%}. First: {describe_offenders(state['bad'])}. Full report: "
                f"{storage.redact(storage.join(plan.run_dir, f'bad_data_{split}.csv'))}. Fix "
                "them, or raise data.max_bad_fraction to go on with this run"
            )
        if states.get("stopped") and fraction > states.get("max_bad_fraction", limit):
            log.warning(
                "run %s had stopped for bad data (%s: %.2f%% > %.2f%%); data.max_bad_fraction "
                "is now %.2f%%, so it continues",
                plan.run_name,
                split,
                100 * fraction,
                100 * states["max_bad_fraction"],
                100 * limit,
            )


def plan_trial(parent: TrainPlan, cfg: TrainJobConfig) -> TrainPlan:
    """The plan of one search trial, `cfg` a variation of the parent's config: the parent's
    index and checks stand (the search checked the trial's architecture and batch when it drew
    it); where the trial's own run stands is read again (a resumed search continues it)."""
    if cfg.run.name is None:
        raise ConfigError("a trial's config needs run.name")
    train_index, val_index = parent.train_index, parent.val_index
    if cfg.dataset != parent.index_uri:
        # a trial config saved with another dataset (edited before a resume): that one trains
        from morphmlp.data.index import read_index

        index = read_index(cfg.dataset)
        train_index, val_index = index.split("train"), index.split("val")
    return _plan(
        cfg,
        cfg.dataset,
        train_index,
        val_index,
        absolute_storage(cfg.run.storage),
        cfg.run.name,
        steps_per_epoch(len(train_index), cfg),
        "auto",
    )


def _plan(cfg, index_uri, train_index, val_index, storage_root, run_name, spe, resume):
    run_dir = storage.join(storage_root, run_name)
    recovered = recover_from_broken_snapshot(run_dir)
    progress = read_progress(recovered) if recovered else latest_progress(run_dir)
    if progress is not None and resume == "never":
        raise ResumeError(
            f"run {run_name!r} already has checkpoints in {storage.redact(run_dir)}; "
            "choose another --name or use --resume auto"
        )
    if progress is None and resume == "must":
        raise ResumeError(f"no checkpoint to resume in {storage.redact(run_dir)}")
    plan = TrainPlan(
        cfg,
        index_uri,
        train_index,
        val_index,
        storage_root,
        run_name,
        run_dir,
        spe,
        progress,
        recovered,
    )
    _check_continuation(plan)
    return plan


def absolute_storage(root: str) -> str:
    """A local storage root as an absolute path (workers may run elsewhere); URIs as given."""
    return root if storage.is_uri(root) else os.path.abspath(root)


def run_training(
    plan: TrainPlan, *, callbacks: list | None = None, parent_run_id: str | None = None
) -> TrainOutcome:
    """Fit (or resume) the run and record it. `callbacks` go to Ray Train's RunConfig (the
    search passes Tune's report callback); `parent_run_id` nests the MLflow run under a search.

    A finished run is said to be finished and nothing is written. A fit that fails or is
    interrupted ends its MLflow run FAILED or KILLED."""
    import ray.data
    from ray import train as ray_train
    from ray.train.torch import TorchTrainer

    from morphmlp.data.bad_data import BadDataLedger, load_states
    from morphmlp.data.pipeline import build_eval_dataset

    cfg = plan.cfg
    epoch_size, gb = len(plan.train_index), cfg.global_batch
    total = cfg.optim.epochs * epoch_size
    if plan.progress is not None and plan.progress.position >= total:
        return _finished(plan)
    check_resources(cfg)
    _quiet(ray.data.DataContext.get_current())  # for the validation dataset, built here
    run_id = recording.mlflow_run(plan, parent_run_id)
    states = load_states(storage.join(plan.run_dir, BAD_DATA_FILE))
    ledgers = {
        split: BadDataLedger.create(
            f"morphmlp-bad-data-{plan.run_name}-{split}", restore=states.get(split)
        )
        for split in ("train", "val")
    }
    info = RunInfo(
        class_names=list(plan.train_index.class_names),
        epoch_size=epoch_size,
        run_dir=plan.run_dir,
        mlflow_run_id=run_id,
        tracking_uri=tracking.tracking_uri(),
        bad_data_ledgers={split: ledger.name for split, ledger in ledgers.items()},
        recovered_checkpoint=plan.recovered_checkpoint,
    )
    if plan.progress is not None:
        p = plan.progress
        left = schedule.steps_left(p.position, cfg.optim.epochs, epoch_size, gb)
        log.info(
            "Resuming run %s from step %d/%d (epoch %d, sample %d/%d); pass --name to start a "
            "new run",
            plan.run_name,
            p.step,
            p.step + left,
            p.epoch,
            p.position,
            total,
        )
        if p.global_batch and p.global_batch != gb:
            log.info(
                "The global batch is now %d (was %d): the run continues at sample %d, its "
                "remaining epochs in steps of %d",
                gb,
                p.global_batch,
                p.position,
                gb,
            )
        recording.record_resume(run_id, plan)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"job": to_dict(cfg), "run": asdict(info)},
        scaling_config=ray_train.ScalingConfig(
            num_workers=cfg.scaling.workers,
            use_gpu=cfg.scaling.gpus_per_worker > 0,
            resources_per_worker=_worker_resources(cfg),
        ),
        run_config=ray_train.RunConfig(
            name=plan.run_name,
            storage_path=plan.storage_root,
            # worker failures restart from the checkpoint; a worker group that can't be
            # started (placed) fails the run after a few tries instead of retrying forever
            failure_config=ray_train.FailureConfig(
                max_failures=cfg.scaling.max_failures,
                controller_failure_limit=max(3, cfg.scaling.max_failures),
            ),
            checkpoint_config=ray_train.CheckpointConfig(num_to_keep=cfg.run.keep_last),
            callbacks=callbacks,
            # Train's own INFO lines (every report's metrics dict, every checkpoint's path)
            # repeat what the loop logs in one line; its warnings and errors still show
            logging_config=ray_train.LoggingConfig(log_level="WARNING"),
        ),
        # positions must reach the workers in order ("samples consumed" is then a position);
        # Train replaces each dataset's own execution options with these
        dataset_config=ray_train.DataConfig(execution_options={"train": _train_ingest(cfg)}),
        datasets={
            # a factory: Ray Train calls it on every (re)start of the worker group, so the
            # sample schedule restarts at the latest checkpoint's position
            "train": TrainDatasetFactory(plan, ledgers["train"].name),
            # CPUs only: the training pool may hold every unit of data.decode_resource for the
            # whole run, while _train_ingest's CPU limit keeps room for this pool
            "val": build_eval_dataset(
                plan.val_index,
                dataclasses.replace(cfg.data, decode_resource=None),
                num_clips=1,
                num_crops=1,
                ledger=ledgers["val"],
            ),
        },
    )
    try:
        trainer.fit()
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, `ray job stop` (SIGTERM)
        recording.end_run(run_id, "KILLED")
        raise
    except BaseException:
        recording.end_run(run_id, "FAILED")
        raise
    progress = latest_progress(plan.run_dir) or plan.progress or Progress()
    outcome = TrainOutcome(plan.run_name, plan.run_dir, run_id, progress)
    recording.record(plan, outcome, ledgers)
    return outcome


def _finished(plan: TrainPlan) -> TrainOutcome:
    p = plan.progress
    log.info(
        "Run %s is finished (%d epochs, best val top-1 %.2f%% at epoch %d): nothing to do; "
        "pass --name to start a new run, or raise --epochs to train it further",
        plan.run_name,
        p.epoch,
        100 * p.best_top1,
        p.best_epoch,
    )
    marker = storage.join(plan.run_dir, recording.MLFLOW_RUN_FILE)
    run_id = json.loads(storage.read_bytes(marker))["run_id"] if storage.exists(marker) else None
    return TrainOutcome(plan.run_name, plan.run_dir, run_id, p, already_finished=True)


def check_resources(cfg: TrainJobConfig) -> None:
    """Before any worker starts: the training workers and the minimal decode pool fit the
    cluster, or an autoscaler can add what's missing within scaling.resource_wait_s."""
    from morphmlp.cluster import Demand, check_resources

    data = cfg.data
    decode = {"CPU": data.cpus_per_decode_actor}
    if data.decode_resource:
        decode[data.decode_resource] = data.cpus_per_decode_actor
    check_resources(
        [
            Demand("training worker", cfg.scaling.workers, _worker_resources(cfg)),
            Demand("decode actor", data.decode_actors[0], decode),
        ],
        wait_s=cfg.scaling.resource_wait_s,
    )


def _train_ingest(cfg: TrainJobConfig):
    import ray
    from ray.data import DataContext, ExecutionOptions, ExecutionResources

    # The training pool streams for the whole run; left alone it can grow into every CPU the
    # workers leave, and the validation pool, started each epoch, then waits forever for one.
    # So it is limited to the cluster's CPUs less the workers' and one validation pool's.
    data = cfg.data
    reserve = data.decode_actors[0] * data.cpus_per_decode_actor
    workers = cfg.scaling.workers * cfg.scaling.cpus_per_worker
    cpus = ray.cluster_resources().get("CPU", 0.0)
    # Built here rather than from DataConfig.default_ingest_options(), which copies the
    # deprecated exclude_resources (Ray 2.60 warns at each copy); what else it carries over
    # from the DataContext is verbose_progress.
    return ExecutionOptions(
        resource_limits=ExecutionResources(cpu=max(reserve, cpus - workers - reserve)),
        preserve_order=True,  # positions in order: "consumed so far" is one number
        verbose_progress=DataContext.get_current().execution_options.verbose_progress,
    )


def _quiet(context) -> None:
    """Training's Ray Data settings: the loop's step lines are the progress (with ETA), so no
    progress bars (from a remote SplitCoordinator they reach the console as escape codes, and
    redrawing them cost that actor ~40% of a core on 2 cores), and no dump of every DataContext
    field per dataset."""
    context.enable_progress_bars = False
    context.print_on_execution_start = False


class TrainDatasetFactory:
    """Builds the remaining sample schedule from the latest checkpoint's position."""

    def __init__(self, plan: TrainPlan, ledger_name: str):
        self.index = plan.train_index
        self.data_cfg = plan.cfg.data
        self.seed = plan.cfg.run.seed
        self.epochs = plan.cfg.optim.epochs
        self.epoch_size = len(plan.train_index)
        self.global_batch = plan.cfg.global_batch
        self.run_dir = plan.run_dir
        self.ledger_name = ledger_name
        # Until Ray Train registers a checkpoint of its own, a recovered run starts from there.
        self.recovered_progress = plan.progress if plan.recovered_checkpoint else None

    def __call__(self):
        import ray.data

        from morphmlp.data.pipeline import BadDataLedger, build_train_dataset

        progress = latest_progress(self.run_dir) or self.recovered_progress
        # Ray Train calls this in its controller, whose DataContext the dataset copies: its
        # SplitCoordinator would otherwise draw progress bars, 3 per dataset, all run long.
        _quiet(ray.data.DataContext.get_current())
        return build_train_dataset(
            self.index,
            self.data_cfg,
            seed=self.seed,
            num_epochs=self.epochs,
            samples_per_epoch=self.epoch_size,
            global_batch=self.global_batch,
            start_position=progress.position if progress else 0,
            ledger=BadDataLedger.lookup(self.ledger_name),
        )


def check_architecture(cfg: TrainJobConfig) -> None:
    """Build the model on the meta device: invalid frames/size/chunk combinations raise here;
    then check that the pretrained file is there (its weights load on the workers)."""
    import torch

    from morphmlp.models.factory import create_model

    with torch.device("meta"):
        model = create_model(cfg.model.variant, num_classes=2, **cfg.model.factory_kwargs())
        # shapes the constructor accepts can still fail in forward (e.g. 1 frame under the
        # stem's temporal stride): one forward on the meta device finds them without compute
        m = model.cfg
        try:
            model(torch.empty(1, m.in_chans, m.num_frames, m.img_size, m.img_size))
        except (RuntimeError, ValueError, IndexError) as err:
            raise ConfigError(
                f"model: {m.num_frames} frames at {m.img_size}x{m.img_size} (--frames, "
                f"--img-size) don't run through {cfg.model.variant}: {str(err).splitlines()[0]}"
            ) from err
    if cfg.model.pretrained and not storage.exists(cfg.model.pretrained):
        raise ConfigError(f"model.pretrained: {storage.redact(cfg.model.pretrained)} not found")


def _worker_resources(cfg: TrainJobConfig) -> dict[str, float]:
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    if cfg.scaling.gpus_per_worker > 0:
        resources["GPU"] = cfg.scaling.gpus_per_worker
    return resources


def _stem(uri: str) -> str:
    base = os.path.basename(uri.rstrip("/"))
    return os.path.splitext(base)[0] or "dataset"
