"""Which (model version, benchmark) pairs already have a result: read from MLflow, nowhere else.

A result is a FINISHED run in the `morphmlp-eval` experiment tagged with the model version, the
benchmark's name and content hash and the protocol hash. A run that was killed stays RUNNING (or
ends FAILED) and so never counts: re-running the schedule redoes that pair. A pair that can't be
scored for a lasting reason (no shared class, frames the network isn't built for) is recorded as
a FINISHED run with outcome `skipped` and the reason, so it isn't retried until the benchmark
or the protocol changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from morphmlp import tracking

EVAL_EXPERIMENT = "morphmlp-eval"

# Tags of an evaluation run (and what the ledger and the leaderboard read back).
TAG_JOB = "job"  # "evaluate" for a pair's run, "leaderboard" for the re-evaluation's table
TAG_MODEL_VERSION = "model_version"
TAG_BENCHMARK = "benchmark"
TAG_BENCHMARK_HASH = "benchmark_hash"
TAG_PROTOCOL = "protocol"
TAG_PROTOCOL_HASH = "protocol_hash"
TAG_OUTCOME = "outcome"  # "evaluated" or "skipped"
TAG_SKIP_REASON = "skip_reason"
TAG_LABEL_OVERLAP = "label_overlap"  # "full" or "partial"
TAG_SHARED_CLASSES = "shared_classes"
TAG_BENCHMARK_CLASSES = "benchmark_classes"
TAG_LEADERBOARD_HASH = "leaderboard_hash"
JOB_EVALUATE = "evaluate"
JOB_LEADERBOARD = "leaderboard"
OUTCOME_EVALUATED = "evaluated"
OUTCOME_SKIPPED = "skipped"


@dataclass(frozen=True)
class PairKey:
    model_version: str
    benchmark: str
    benchmark_hash: str
    protocol_hash: str


@dataclass
class PairResult:
    key: PairKey
    run_id: str
    outcome: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def skip_reason(self) -> str:
        return self.tags.get(TAG_SKIP_REASON, "")


class ResultsLedger:
    """The finished evaluation results in one MLflow store."""

    def __init__(self, uri: str | None = None, experiment: str = EVAL_EXPERIMENT):

        self.client = tracking.client(uri)
        self.experiment = experiment

    def _runs(self, filter_string: str):
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            return
        token = None
        while True:
            page = self.client.search_runs(
                [exp.experiment_id],
                filter_string,
                max_results=1000,
                order_by=["attributes.start_time ASC"],
                page_token=token,
            )
            yield from page
            token = page.token
            if not token:
                return

    def results(self) -> dict[PairKey, PairResult]:
        """The latest FINISHED run of every pair that has one."""
        found: dict[PairKey, PairResult] = {}
        query = f"tags.{TAG_JOB} = '{JOB_EVALUATE}' and attributes.status = 'FINISHED'"
        for run in self._runs(query):
            tags = run.data.tags
            if TAG_MODEL_VERSION not in tags:
                continue  # a checkpoint evaluated by path: not part of the schedule's ledger
            key = PairKey(
                tags[TAG_MODEL_VERSION],
                tags.get(TAG_BENCHMARK, ""),
                tags.get(TAG_BENCHMARK_HASH, ""),
                tags.get(TAG_PROTOCOL_HASH, ""),
            )
            found[key] = PairResult(
                key, run.info.run_id, tags.get(TAG_OUTCOME, ""), dict(run.data.metrics), tags
            )
        return found

    def unfinished(self) -> dict[PairKey, list[str]]:
        """Runs of pairs that never finished (killed or failed): reported, never counted."""
        pending: dict[PairKey, list[str]] = {}
        query = f"tags.{TAG_JOB} = '{JOB_EVALUATE}' and attributes.status != 'FINISHED'"
        for run in self._runs(query):
            tags = run.data.tags
            if TAG_MODEL_VERSION in tags:
                key = PairKey(
                    tags[TAG_MODEL_VERSION],
                    tags.get(TAG_BENCHMARK, ""),
                    tags.get(TAG_BENCHMARK_HASH, ""),
                    tags.get(TAG_PROTOCOL_HASH, ""),
                )
                pending.setdefault(key, []).append(run.info.run_id)
        return pending

    def latest_leaderboard_hash(self) -> str | None:
        """Content hash of the last leaderboard logged to MLflow (None if there is none)."""
        query = f"tags.{TAG_JOB} = '{JOB_LEADERBOARD}' and attributes.status = 'FINISHED'"
        runs = list(self._runs(query))
        return runs[-1].data.tags.get(TAG_LEADERBOARD_HASH) if runs else None
