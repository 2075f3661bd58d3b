"""One (checkpoint, benchmark) evaluation from checks to a FINISHED MLflow run.

`plan_pair` does every check that needs no cluster (protocol vs. the network, label overlap) and
raises ProtocolError / LabelSpaceError; `evaluate_pair` scores the views on Ray and records the
run; `record_skip` records a pair that can't be scored, with the reason. The MLflow run is
created RUNNING with every tag the ledger keys on and is marked FINISHED only after its metrics
and artifacts are stored, so a killed evaluation never counts as a result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from morphmlp import storage, tracking
from morphmlp.config import flatten, to_dict
from morphmlp.data.config import DataConfig
from morphmlp.evaluate import results
from morphmlp.evaluate.catalog import ResolvedBenchmark
from morphmlp.evaluate.labels import LabelMap, LabelSpaceError, match_labels
from morphmlp.evaluate.metrics import (
    Metrics,
    VideoScores,
    compute_metrics,
    confusion_png,
    per_class_table,
    predictions_table,
)
from morphmlp.evaluate.model_refs import Checkpoint
from morphmlp.evaluate.multiview import EvalConfig, eval_data_config, score_views

log = logging.getLogger(__name__)

BAD_DATA_FILE = "bad_data.csv"


@dataclass
class EvalPlan:
    ckpt: Checkpoint
    bench: ResolvedBenchmark
    data_cfg: DataConfig
    label_map: LabelMap
    index: object  # VideoIndex: the benchmark's videos of the shared classes

    @property
    def class_names(self) -> list[str]:
        """Names of the evaluated classes, in the order of the score columns."""
        return [self.bench.class_names[i] for i in self.label_map.benchmark_labels]


@dataclass
class EvalOutcome:
    run_id: str
    plan: EvalPlan
    metrics: Metrics
    scores: VideoScores
    num_bad_videos: int


def plan_pair(ckpt: Checkpoint, bench: ResolvedBenchmark, cfg: EvalConfig) -> EvalPlan:
    """Check that the pair can be scored; raises ProtocolError or LabelSpaceError if not."""
    where = f"{ckpt.describe()} on {bench.name}"
    data_cfg = eval_data_config(bench.spec.protocol, ckpt, cfg)
    label_map = match_labels(ckpt.class_names, ckpt.num_classes, bench.class_names, where=where)
    table = bench.index.table
    shared = table.filter(
        pc.is_in(table["label"], pa.array(label_map.benchmark_labels, pa.int64()))
    )
    if shared.num_rows == 0:
        raise LabelSpaceError(
            f"{where}: the benchmark has no videos of the {label_map.num_shared} shared classes"
        )
    index = dataclasses.replace(bench.index, table=shared)
    return EvalPlan(ckpt, bench, data_cfg, label_map, index)


def evaluate_pair(
    plan: EvalPlan, cfg: EvalConfig, *, output: str | None = None, uri: str | None = None
) -> EvalOutcome:
    """Score the pair on Ray, log the run to MLflow (and the reports to `output`, if given)."""
    from morphmlp.data.bad_data import BadDataLedger

    client = tracking.client(uri)
    tags = {
        **identity_tags(plan.ckpt, plan.bench),
        results.TAG_LABEL_OVERLAP: plan.label_map.overlap,
        results.TAG_SHARED_CLASSES: str(plan.label_map.num_shared),
        results.TAG_BENCHMARK_CLASSES: str(plan.label_map.num_benchmark_classes),
        "model_classes": str(plan.label_map.num_model_classes),
    }
    bad_data = BadDataLedger.create()
    run_id = tracking.start_run(
        results.EVAL_EXPERIMENT, _run_name(plan.ckpt, plan.bench), tags=tags, uri=uri
    )
    log.info(
        "evaluating %s on %s (%s, %d videos, %s): MLflow run %s",
        plan.ckpt.describe(),
        plan.bench.name,
        plan.bench.spec.protocol.describe(),
        len(plan.index),
        plan.label_map.describe(),
        run_id,
    )
    try:
        _log_params(client, run_id, plan, cfg)
        scores = score_views(
            plan.index,
            plan.data_cfg,
            plan.ckpt,
            plan.label_map,
            plan.bench.spec.protocol,
            cfg,
            bad_data=bad_data,
        )
        bad = bad_data.records()
        with tempfile.TemporaryDirectory() as tmp:
            if bad:
                bad_data.write_report(os.path.join(tmp, BAD_DATA_FILE))
                # logged first: the check below may fail the run, and this says why
                client.log_artifact(run_id, os.path.join(tmp, BAD_DATA_FILE))
            bad_data.check(plan.data_cfg.max_bad_fraction)
            metrics = compute_metrics(scores.scores, scores.label)
            _write_reports(tmp, plan, scores, metrics)
            for name in sorted(os.listdir(tmp)):
                path = os.path.join(tmp, name)
                if name != BAD_DATA_FILE:
                    client.log_artifact(run_id, path)
                if output is not None:
                    with open(path, "rb") as f:
                        storage.write_bytes_atomic(storage.join(output, name), f.read())
        _log_metrics(client, run_id, plan, metrics, len(bad))
        client.set_tag(run_id, results.TAG_OUTCOME, results.OUTCOME_EVALUATED)
        client.set_terminated(run_id, "FINISHED")
    except BaseException as err:
        client.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        _stop(bad_data)
    log.info(
        "%s on %s: top-1 %.2f%%, top-5 %.2f%%, mean class accuracy %.2f%% (%d videos)",
        plan.ckpt.describe(),
        plan.bench.name,
        100 * metrics.top1,
        100 * metrics.top5,
        100 * metrics.mean_class_accuracy,
        metrics.num_videos,
    )
    return EvalOutcome(run_id, plan, metrics, scores, len(bad))


def record_skip(
    ckpt: Checkpoint, bench: ResolvedBenchmark, reason: str, *, uri: str | None = None
) -> str:
    """A FINISHED run saying why this pair can't be scored, so the schedule doesn't retry it."""
    tags = {
        **identity_tags(ckpt, bench),
        results.TAG_OUTCOME: results.OUTCOME_SKIPPED,
        results.TAG_SKIP_REASON: reason[:5000],
    }
    run_id = tracking.start_run(results.EVAL_EXPERIMENT, _run_name(ckpt, bench), tags=tags, uri=uri)
    tracking.client(uri).set_terminated(run_id, "FINISHED")
    return run_id


def identity_tags(ckpt: Checkpoint, bench: ResolvedBenchmark) -> dict[str, str]:
    """What a result is about: the ledger's key plus what makes the run readable in the UI."""
    protocol = bench.spec.protocol
    tags = {
        results.TAG_JOB: results.JOB_EVALUATE,
        "checkpoint": ckpt.reference,
        "frames": str(ckpt.model_config.num_frames),
        "img_size": str(ckpt.model_config.img_size),
        results.TAG_BENCHMARK: bench.name,
        results.TAG_BENCHMARK_HASH: bench.content_hash,
        "benchmark_index": storage.redact(bench.index.uri),
        "benchmark_split": bench.spec.split or "all",
        results.TAG_PROTOCOL: json.dumps(to_dict(protocol), sort_keys=True),
        results.TAG_PROTOCOL_HASH: bench.protocol_hash,
        "git_commit": tracking.git_commit(),
    }
    if ckpt.model_version is not None:
        tags[results.TAG_MODEL_VERSION] = ckpt.model_version
    if ckpt.run_id is not None:
        tags["model_run_id"] = ckpt.run_id
    if "variant" in ckpt.version_tags:
        tags["variant"] = ckpt.version_tags["variant"]
    return tags


def _run_name(ckpt: Checkpoint, bench: ResolvedBenchmark) -> str:
    what = f"v{ckpt.model_version}" if ckpt.model_version is not None else "checkpoint"
    return f"{what}-{bench.name}"


def _log_params(client, run_id: str, plan: EvalPlan, cfg: EvalConfig) -> None:
    params = {
        **flatten({"protocol": to_dict(plan.bench.spec.protocol)}),
        **flatten({"data": to_dict(plan.data_cfg)}),
        **flatten({"eval": to_dict(cfg)}),
        **flatten({"model": to_dict(plan.ckpt.model_config)}),
        "benchmark_videos": len(plan.bench.index),
        "evaluated_videos": len(plan.index),
        "evaluated_classes": json.dumps(plan.class_names),
        **tracking.package_versions(),
    }
    tracking.log_params(client, run_id, params)


def _log_metrics(client, run_id: str, plan: EvalPlan, metrics: Metrics, num_bad: int) -> None:
    values = {
        **metrics.summary(),
        "bad_videos": num_bad,
        "videos_outside_shared_classes": len(plan.bench.index) - len(plan.index),
        "views_per_video": plan.bench.spec.protocol.num_views,
    }
    for name, value in values.items():
        client.log_metric(run_id, name, float(value))


def _write_reports(folder: str, plan: EvalPlan, scores: VideoScores, metrics: Metrics) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    uris = np.asarray(plan.index.table["uri"].to_pylist(), dtype=object)[scores.video]
    predictions = predictions_table(scores, [storage.redact(u) for u in uris], plan.class_names)
    pq.write_table(predictions, os.path.join(folder, "predictions.parquet"))
    pacsv.write_csv(
        per_class_table(metrics, plan.class_names), os.path.join(folder, "per_class_accuracy.csv")
    )
    title = (
        f"{plan.ckpt.describe()} on {plan.bench.name} ({plan.bench.spec.protocol.describe()}): "
        f"top-1 {100 * metrics.top1:.1f}%"
    )
    with open(os.path.join(folder, "confusion_matrix.png"), "wb") as f:
        f.write(confusion_png(metrics.confusion, plan.class_names, title))
    summary = {
        **metrics.summary(),
        "label_overlap": plan.label_map.overlap,
        "shared_classes": plan.label_map.num_shared,
        "benchmark": plan.bench.name,
        "benchmark_hash": plan.bench.content_hash,
        "protocol": to_dict(plan.bench.spec.protocol),
        "protocol_hash": plan.bench.protocol_hash,
        "checkpoint": plan.ckpt.reference,
        "model_version": plan.ckpt.model_version,
    }
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=2)


def _stop(bad_data) -> None:
    """End the bad-data ledger actor of this evaluation (one per pair)."""
    import ray

    ray.kill(ray.get_actor(bad_data.name, namespace=bad_data.namespace))
