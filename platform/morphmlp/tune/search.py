"""The architecture search: Ray Tune runs one Ray Train run per trial, ASHA stops the laggards.

Flow: `prepare_search` (no cluster) resolves the base training config, checks the dataset,
storage, MLflow and the whole search space (the base's TrainPlan), and draws every trial's
configuration with its params and GMACs. `run_search` then joins the cluster, bounds
concurrency by its resources, and runs (or, for a name that exists, resumes) the Tune
experiment. Each trial is `run_trial`: a function that plans the trial from the base's plan
(`train.driver.plan_trial`: the index and the checks are the parent's), builds its TorchTrainer
and calls fit() (Train V2's Tune pattern); Train's reports reach Tune through
TuneReportCallback. The plan and the trials' configs reach the trials as objects
(`tune.with_parameters`), not as files. At the end: the trials ranked by Pareto front, a plot,
and the best configuration as a variant file, all in storage and in MLflow (one parent run per
search, the trials' training runs nested under it).

Storage, under <storage>/<name>/:
    search.json                 the parent MLflow run and the drawn trials (read on resume)
    tune/                       Ray Tune's experiment (restored when the same name is re-run)
    trials/<trial>/             the trial's variant.yaml and config.yaml (the record of what
                                it trains: a resumed search reads the configs back), then its
                                Ray Train run (checkpoints, best/ and final/ models, MLflow run)
    pareto.csv, pareto.md, pareto.png, best.yaml (variant), best_config.yaml (training config)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import ray
import ray.train
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from morphmlp import storage, tracking
from morphmlp.cluster import connect_ray
from morphmlp.config import (
    ConfigError,
    check,
    check_at_least,
    flatten,
    from_dict,
    load_yaml,
    merge,
    to_dict,
    to_yaml,
)
from morphmlp.errors import MorphMLPError
from morphmlp.models import load_variant_file, save_variant_file
from morphmlp.models.factory import model_config
from morphmlp.train.config import TrainJobConfig, resolve_config, steps_per_epoch
from morphmlp.train.driver import TrainPlan, absolute_storage, plan_trial, prepare, run_training
from morphmlp.train.recording import MLFLOW_RUN_FILE
from morphmlp.train.resume import ResumeError
from morphmlp.tune import report
from morphmlp.tune.space import DEFAULT_SPACE, SearchSpace, Trial, load_space, training_tree

log = logging.getLogger("morphmlp.tune")

SEARCH_FILE, TUNE_DIR, TRIALS_DIR = "search.json", "tune", "trials"
VARIANT_FILE, CONFIG_FILE = "variant.yaml", "config.yaml"
BEST_VARIANT, BEST_CONFIG = "best.yaml", "best_config.yaml"
# ASHA compares trials on this metric, reported by the training workers after every epoch.
METRIC, TIME_ATTR = "val_top1", "epoch"
# A trial function only drives its Ray Train run, whose workers and decode actors hold the CPUs
# and GPUs: it asks for memory alone (its process holds about 1 GiB), so that it never takes a
# CPU that training needs.
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 1024**3}
Objective = Literal["top1", "top1-under-gmacs"]


class SearchInterrupted(MorphMLPError):
    """The search stopped before every trial finished; re-running the same name resumes it."""


@dataclass
class SearchConfig:
    space: str = DEFAULT_SPACE  # search-space YAML (path or URI)
    trials: int = 8  # random draws per grid point (Tune's num_samples)
    max_concurrent: int | None = None  # None: as many trials as the cluster's resources fit
    # top1: best val top-1. top1-under-gmacs: the same, among configurations within the budget
    # (drawn configurations over it are rejected before anything trains)
    objective: Objective = "top1"
    gmacs_budget: float | None = None
    grace_epochs: int = 1  # ASHA: a trial trains at least this many epochs
    reduction_factor: float = 2.0  # ASHA: keeps the best 1/rf of the trials at each rung
    name: str | None = None  # None: tune-<space>-<dataset>; re-running a name resumes it
    seed: int = 0  # draws of the search space
    experiment: str = "morphmlp-tune"  # MLflow experiment of the parent and trial runs

    def __post_init__(self) -> None:
        check_at_least("", self, 1, "trials", "grace_epochs")
        check_at_least("", self, 1, "max_concurrent", optional=True)
        check("", self, "reduction_factor", self.reduction_factor > 1, "> 1")
        if self.objective not in ("top1", "top1-under-gmacs"):
            raise ConfigError(f"objective {self.objective!r}: choose 'top1' or 'top1-under-gmacs'")
        if self.objective == "top1-under-gmacs":
            if self.gmacs_budget is None or self.gmacs_budget <= 0:
                raise ConfigError(
                    "objective top1-under-gmacs needs a GMACs budget > 0 (--gmacs-budget), "
                    f"got {self.gmacs_budget}"
                )
        elif self.gmacs_budget is not None:
            raise ConfigError(
                f"a GMACs budget ({self.gmacs_budget}) needs --objective top1-under-gmacs"
            )

    @property
    def max_gmacs(self) -> float | None:
        """The budget drawn configurations must fit, if the objective has one."""
        return self.gmacs_budget if self.objective == "top1-under-gmacs" else None


@dataclass
class SearchPlan:
    search: SearchConfig
    space: SearchSpace
    base: TrainJobConfig  # the training config every trial starts from
    name: str
    root: str  # <storage>/<name>
    trials: list[Trial]
    configs: dict[str, TrainJobConfig]  # trial name -> its full training config
    train: TrainPlan  # the base's plan: the index and the checks every trial shares

    @property
    def epochs(self) -> int:
        return self.base.optim.epochs


@dataclass
class SearchOutcome:
    name: str
    root: str
    parent_run_id: str
    results: list[report.TrialResult]
    best: report.TrialResult | None
    best_variant: str | None  # URI of best.yaml (for jobs/train.py --variant)
    best_config: str | None  # URI of best_config.yaml (for jobs/train.py --config)
    report_files: list[str]  # URIs of pareto.csv, pareto.md, pareto.png


def base_config(
    search: SearchConfig, train_tree: dict[str, Any]
) -> tuple[SearchSpace, TrainJobConfig]:
    """The search space and the training config its trials start from (the space's variant,
    its recipe, then the user's layers); reads the space, checks nothing else."""
    space = load_space(search.space)
    given = train_tree.get("model", {}).get("variant")
    if given is not None and given != space.variant:
        raise ConfigError(
            f"model.variant={given!r}: the search space {search.space} starts from variant "
            f"{space.variant!r}; remove model.variant from the training config"
        )
    base = resolve_config(merge(train_tree, {"model": {"variant": space.variant}}))
    if base.model.pretrained and space.architecture:
        raise ConfigError(
            "model.pretrained can't initialise trials whose architecture is searched; remove it "
            f"or search only training keys (architecture: {', '.join(space.architecture)})"
        )
    return space, base


def prepare_search(search: SearchConfig, train_tree: dict[str, Any]) -> SearchPlan:
    """Every check that needs no cluster, and the trials' configurations; writes nothing but
    storage and MLflow probes. Raises MorphMLPError subclasses with one-line messages."""
    space, user_base = base_config(search, train_tree)
    dataset_name = "demo" if user_base.dataset == "demo" else _stem(user_base.dataset)
    name = search.name or f"tune-{_stem(search.space)}-{dataset_name}"
    root = storage.join(absolute_storage(user_base.run.storage), name)
    # The base config must train: dataset, batch, storage and MLflow are checked as for a run,
    # with its runs under the search's trials folder.
    trials_dir = storage.join(root, TRIALS_DIR)
    with_trials_dir = dataclasses.replace(
        user_base, run=dataclasses.replace(user_base.run, storage=trials_dir)
    )
    train = prepare(with_trials_dir, resume="auto")
    # the index resolved once (the demo's, when generated): trial configs name it as it is
    base = dataclasses.replace(with_trials_dir, dataset=train.index_uri)
    if search.grace_epochs > base.optim.epochs:
        raise ConfigError(
            f"grace_epochs={search.grace_epochs} exceeds the {base.optim.epochs} epochs per trial"
        )

    overrides = {"num_classes": train.train_index.num_classes}
    for key in ("num_frames", "img_size", "drop_path_rate"):
        if getattr(base.model, key) is not None:
            overrides[key] = getattr(base.model, key)
    base_arch = model_config(space.variant, **overrides)
    space.check(base_arch, to_dict(base))
    trials = space.sample(base_arch, search.trials, seed=search.seed, max_gmacs=search.max_gmacs)
    num_train = len(train.train_index)
    configs = {t.name: _trial_config(base, t, root, search.experiment, num_train) for t in trials}
    return SearchPlan(search, space, base, name, root, trials, configs, train)


def _trial_config(
    base: TrainJobConfig, trial: Trial, root: str, experiment: str, num_train: int
) -> TrainJobConfig:
    trial_dir = storage.join(root, TRIALS_DIR, trial.name)
    tree = merge(
        training_tree(to_dict(base), trial.training),
        {
            # the variant file holds the whole architecture, drop path included
            "model": {"variant": storage.join(trial_dir, VARIANT_FILE), "drop_path_rate": None},
            "run": {
                "name": trial.name,
                "storage": storage.join(root, TRIALS_DIR),
                "experiment": experiment,
                # trials are candidates: register the model of the configuration you pick
                "register_model": False,
            },
        },
    )
    try:
        cfg = from_dict(TrainJobConfig, tree)
        steps_per_epoch(num_train, cfg)
    except ConfigError as err:
        raise ConfigError(f"{trial.name} ({trial.values}): {err}") from err
    return cfg


def run_search(prep: SearchPlan, *, address: str | None = None) -> SearchOutcome:
    """Run the search (or resume it: same name), then rank, plot and record the trials."""
    connect_ray(address)
    tune_dir = storage.join(prep.root, TUNE_DIR)

    def trainable(configs: dict[str, TrainJobConfig]):
        # the base's plan and the trials' configs go through the object store, once
        with_plan = tune.with_parameters(run_trial, base=prep.train, configs=configs)
        return tune.with_resources(with_plan, TRIAL_DRIVER_RESOURCES)

    if tune.Tuner.can_restore(tune_dir):
        # Tune keeps the trials and settings of the first run, but not ASHA's records: resumed
        # trials report where they stand again (see run_trial).
        parent_run_id, planned = _parent_run(prep, resume=True)
        log.info("Resuming search %s from %s", prep.name, storage.redact(tune_dir))
        tuner = tune.Tuner.restore(
            tune_dir, trainable=trainable(_saved_configs(prep)), resume_unfinished=True
        )
    else:
        max_concurrent = concurrency(prep)
        parent_run_id, planned = _parent_run(prep, resume=False)
        _write_trial_files(prep)
        tuner = _new_tuner(prep, trainable(prep.configs), parent_run_id, max_concurrent)
    grid = tuner.fit()
    # After Ctrl-C, Tune ends the running trials and returns: trials never started are missing,
    # and the interrupted ones have no final ("done") result and no error.
    unfinished = planned - sum(
        1 for r in grid if r.error is not None or (r.metrics or {}).get("done")
    )
    if unfinished:
        tracking.Tracker(parent_run_id).end("KILLED")
        raise SearchInterrupted(
            f"search {prep.name} stopped with {unfinished} of {planned} trials unfinished; "
            f"re-run the same command (--name {prep.name}) to resume it"
        )
    return _finish(prep, grid, parent_run_id)


def run_trial(
    config: dict[str, Any], *, base: TrainPlan, configs: dict[str, TrainJobConfig]
) -> None:
    """One trial: a Ray Train run of the trial's configuration, reporting to Tune."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    search = config["search"]
    # A trial runs in a Ray worker, which doesn't inherit the driver's environment.
    os.environ["MLFLOW_TRACKING_URI"] = search["tracking_uri"]
    # A restarted trial (search resumed) continues from its run's latest checkpoint.
    plan = plan_trial(base, configs[config["trial"]["name"]])
    if plan.progress is not None:
        # Tune keeps no ASHA state across a restore: report where the run stands, so that the
        # scheduler judges it again (and may stop it) before it trains on.
        tune.report(ray.train.Result.from_path(plan.run_dir).metrics)
    run_training(plan, callbacks=[TuneReportCallback()], parent_run_id=search["parent_run_id"])


class EpochASHA(AsyncHyperBandScheduler):
    """ASHA over epochs that never stops a trial at its last epoch: there is nothing left to
    save, and a stop would kill the trial before it records its run (final model, curves)."""

    def __init__(self, *, max_t: int, **kwargs: Any):
        super().__init__(time_attr=TIME_ATTR, max_t=max_t, stop_last_trials=False, **kwargs)
        self.epochs = max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if result.get(TIME_ATTR, 0) >= self.epochs else decision


# ---------------------------------------------------------------------------------------------
# Launch


def concurrency(prep: SearchPlan) -> int:
    """Trials at once: what the cluster's CPUs and GPUs fit (a trial needs its workers and its
    smallest train and validation decode pools), at most --max-concurrent."""
    cfg = prep.base
    need = {
        "CPU": cfg.scaling.workers * cfg.scaling.cpus_per_worker
        + 2 * cfg.data.decode_actors[0] * cfg.data.cpus_per_decode_actor,
        "GPU": cfg.scaling.workers * cfg.scaling.gpus_per_worker,
    }
    have = ray.cluster_resources()
    fits = min(
        (
            math.floor(have.get(kind, 0.0) / amount + 1e-9)
            for kind, amount in need.items()
            if amount
        ),
        default=len(prep.trials),
    )
    if fits < 1:
        raise ConfigError(
            f"a trial needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs (workers, decode "
            f"actors); the cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} "
            "GPUs: lower --workers, --cpus-per-worker or --gpus-per-worker"
        )
    limit = min(fits, prep.search.max_concurrent or fits, len(prep.trials))
    log.info(
        "%d trials at once: a trial needs %g CPUs and %g GPUs, the cluster has %g and %g",
        limit,
        need["CPU"],
        need["GPU"],
        have.get("CPU", 0),
        have.get("GPU", 0),
    )
    return limit


def _new_tuner(prep: SearchPlan, trainable, parent_run_id: str, max_concurrent: int):
    search_info = {
        "root": prep.root,
        "parent_run_id": parent_run_id,
        "tracking_uri": tracking.tracking_uri(),
    }
    trials = [
        {"name": t.name, "gmacs": t.gmacs, "params": t.params, "values": t.values}
        for t in prep.trials
    ]
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials), "search": search_info},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            scheduler=EpochASHA(
                max_t=prep.epochs,
                grace_period=prep.search.grace_epochs,
                reduction_factor=prep.search.reduction_factor,
            ),
            max_concurrent_trials=max_concurrent,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=TUNE_DIR,
            storage_path=prep.root,
            # a failing trial is recorded with its error; the others go on
            failure_config=tune.FailureConfig(fail_fast=False, max_failures=0),
        ),
    )


def _trial_name(trial) -> str:
    return trial.config["trial"]["name"]


def _write_trial_files(prep: SearchPlan) -> None:
    for trial in prep.trials:
        trial_dir = storage.join(prep.root, TRIALS_DIR, trial.name)
        save_variant_file(trial.arch, storage.join(trial_dir, VARIANT_FILE))
        text = to_yaml(prep.configs[trial.name])
        storage.write_bytes_atomic(storage.join(trial_dir, CONFIG_FILE), text.encode())


def _saved_configs(prep: SearchPlan) -> dict[str, TrainJobConfig]:
    """A resumed search's trials train as they were drawn: their configs as the first run of
    the search wrote them (the space may have changed since; _parent_run warns)."""
    saved = json.loads(storage.read_bytes(storage.join(prep.root, SEARCH_FILE)))["trials"]
    return {
        name: from_dict(
            TrainJobConfig, load_yaml(storage.join(prep.root, TRIALS_DIR, name, CONFIG_FILE))
        )
        for name in saved
    }


def _parent_run(prep: SearchPlan, *, resume: bool) -> tuple[str, int]:
    """The search's MLflow run (created, or reopened on resume) and the number of trials."""
    marker = storage.join(prep.root, SEARCH_FILE)
    search = prep.search
    plan = {t.name: t.values for t in prep.trials}
    tags = {
        "search": prep.name,
        "space": search.space,
        "variant": prep.space.variant,
        "dataset": prep.base.dataset,
        "objective": search.objective,
        "git_commit": tracking.git_commit(),
    }
    if resume:
        if not storage.exists(marker):
            raise ResumeError(
                f"{storage.redact(prep.root)} holds a Tune experiment but no {SEARCH_FILE}; "
                "choose another --name"
            )
        saved = json.loads(storage.read_bytes(marker))
        if saved["trials"] != plan:
            log.warning(
                "The space or the trial settings differ from those search %s started with; "
                "resuming its %d trials as they were drawn",
                prep.name,
                len(saved["trials"]),
            )
        run_id = tracking.start_run(
            search.experiment, prep.name, tags=tags, run_id=saved["parent_run_id"]
        )
        return run_id, len(saved["trials"])
    run_id = tracking.start_run(search.experiment, prep.name, tags=tags)
    saved = {"parent_run_id": run_id, "trials": plan}
    storage.write_bytes_atomic(marker, json.dumps(saved).encode())
    tracker = tracking.Tracker(run_id)
    tracker.log_params(
        {
            **{f"search.{k}": v for k, v in dataclasses.asdict(search).items()},
            "search.num_trials": len(prep.trials),
            **flatten(to_dict(prep.base), "base"),
        }
    )
    tracker.log_text(storage.read_bytes(search.space).decode(), "search_space.yaml")
    costed = [
        {"trial": t.name, "gmacs": t.gmacs, "params": t.params, **t.values} for t in prep.trials
    ]
    tracker.log_text(yaml.safe_dump(costed, sort_keys=False), "trials.yaml")
    return run_id, len(prep.trials)


# ---------------------------------------------------------------------------------------------
# Results


def _finish(prep: SearchPlan, grid, parent_run_id: str) -> SearchOutcome:
    results = sorted((_trial_result(prep, r) for r in grid), key=lambda r: r.name)
    for result in results:
        _close_trial_run(prep, result, parent_run_id)
    parent = tracking.Tracker(parent_run_id)
    with tempfile.TemporaryDirectory(prefix="morphmlp-tune-") as tmp:
        files = []
        for local in report.write_report(results, tmp, gmacs_budget=prep.search.max_gmacs):
            uri = storage.join(prep.root, os.path.basename(local))
            with open(local, "rb") as f:
                storage.write_bytes_atomic(uri, f.read())
            parent.log_artifact(local)
            files.append(uri)
    best = report.best(results)
    best_variant = best_config = None
    if best is not None:
        best_variant, best_config = _write_best(prep, best)
        for uri in (best_variant, best_config):
            parent.log_text(storage.read_bytes(uri).decode(), os.path.basename(uri))
        parent.set_tags({"best_trial": best.name})
        parent.log_metrics({"best_val_top1": best.top1, "best_gmacs": best.gmacs}, step=0)
    statuses = [r.status for r in results]
    parent.log_metrics(
        {
            "trials": len(results),
            "trials_failed": statuses.count("failed"),
            "trials_stopped_early": statuses.count("stopped early"),
        },
        step=0,
    )
    parent.end("FINISHED")
    return SearchOutcome(
        prep.name, prep.root, parent_run_id, results, best, best_variant, best_config, files
    )


def _trial_result(prep: SearchPlan, result) -> report.TrialResult:
    """One trial's outcome from Tune's last result (its config says which trial it was)."""
    spec = result.config["trial"]
    trial_dir = storage.join(prep.root, TRIALS_DIR, spec["name"])
    epochs_planned = load_yaml(storage.join(trial_dir, CONFIG_FILE))["optim"]["epochs"]
    metrics = result.metrics or {}
    epochs = int(metrics.get(TIME_ATTR, 0))
    top1 = metrics.get("best_val_top1", -1.0)  # -1: never validated
    error = None
    if result.error is not None:
        status = "failed"
        lines = [line for line in str(result.error).splitlines() if line.strip()]
        error = lines[-1].strip() if lines else type(result.error).__name__
    elif epochs < epochs_planned:
        status = "stopped early"
    else:
        status = "completed"
    marker = storage.join(trial_dir, MLFLOW_RUN_FILE)
    run_id = json.loads(storage.read_bytes(marker))["run_id"] if storage.exists(marker) else None
    return report.TrialResult(
        name=spec["name"],
        status=status,
        gmacs=spec["gmacs"],
        params=spec["params"],
        top1=top1 if top1 >= 0 else None,
        epochs=epochs,
        values=spec["values"],
        run_id=run_id,
        error=error,
    )


def _close_trial_run(prep: SearchPlan, result: report.TrialResult, parent_run_id: str) -> None:
    """Cost, architecture and outcome on the trial's MLflow run, and its final status: the
    search's verdict. A trial cut off by ASHA or by an error may have left its run open, or
    ended it itself as the cut reached it (a fit that raises ends FAILED, also when the cause
    is Tune stopping it, or the search's Ctrl-C before a resume that ASHA then stopped): so
    stopped trials end KILLED and failed ones FAILED whatever the run says. A completed trial's
    own recording ended it FINISHED; it is ended here only if that never happened."""
    variant_uri = storage.join(prep.root, TRIALS_DIR, result.name, VARIANT_FILE)
    if result.run_id is None:  # failed before its training run existed
        tags = {"mlflow.parentRunId": parent_run_id}
        result.run_id = tracking.start_run(prep.search.experiment, result.name, tags=tags)
    tracker = tracking.Tracker(result.run_id)
    arch = to_dict(load_variant_file(variant_uri))
    tracker.log_params(
        {"gmacs": result.gmacs, "num_params": result.params, **flatten(arch, "arch")}
    )
    tracker.set_tags({"search": prep.name, "trial": result.name, "trial_status": result.status})
    tracker.log_text(storage.read_bytes(variant_uri).decode(), VARIANT_FILE)
    if result.error is not None:
        tracker.log_text(result.error, "error.txt")
    try:
        status = tracker.client.get_run(result.run_id).info.status
    except Exception as err:  # a tracking outage must not lose the search's report
        log.warning("could not read MLflow run %s of %s: %s", result.run_id, result.name, err)
        return
    want = "FAILED" if result.status == "failed" else "KILLED"
    if status != want and (result.status != "completed" or status == "RUNNING"):
        tracker.end(want)


def _write_best(prep: SearchPlan, best: report.TrialResult) -> tuple[str, str]:
    """best.yaml: the best trial's architecture; best_config.yaml: its training config, with
    the architecture taken from best.yaml, ready for `jobs/train.py --config best_config.yaml`."""
    trial_dir = storage.join(prep.root, TRIALS_DIR, best.name)
    variant_uri = storage.join(prep.root, BEST_VARIANT)
    save_variant_file(load_variant_file(storage.join(trial_dir, VARIANT_FILE)), variant_uri)
    tree = load_yaml(storage.join(trial_dir, CONFIG_FILE))
    tree["model"]["variant"] = variant_uri
    for key in ("name", "storage", "experiment", "register_model"):
        tree["run"].pop(key, None)  # a new run of its own, with the user's defaults
    config_uri = storage.join(prep.root, BEST_CONFIG)
    storage.write_bytes_atomic(config_uri, yaml.safe_dump(tree, sort_keys=False).encode())
    return variant_uri, config_uri


def _stem(uri: str) -> str:
    return os.path.splitext(os.path.basename(uri.rstrip("/")))[0] or "dataset"
