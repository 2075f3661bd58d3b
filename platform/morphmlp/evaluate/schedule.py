"""Scheduled re-evaluation: score every (registered version, catalog benchmark) pair that has no
result for the benchmark's current content and protocol, then write the leaderboard.

What is done is read from MLflow each time (see `ledger`), so a run is idempotent and a killed
run, re-run, does only what is missing. Pairs that can't be evaluated are reported one line each
and the others go on:
- recorded as skipped (a lasting property of the pair): no shared class, a protocol the network
  can't follow;
- reported only (fixable, so retried next time): an index that no longer matches the catalog's
  hash or can't be read, a version whose checkpoint can't be loaded, an unknown version asked for;
- failed (unexpected: a bug, an outage, too many unreadable videos): the MLflow run is marked
  FAILED, the traceback logged, and the job's exit code says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from morphmlp import storage, tracking
from morphmlp.errors import ConfigError, MorphMLPError
from morphmlp.evaluate import model_refs, results
from morphmlp.evaluate.catalog import Catalog, ProtocolError, ResolvedBenchmark, resolve_benchmark
from morphmlp.evaluate.labels import LabelSpaceError
from morphmlp.evaluate.leaderboard import Leaderboard, build_leaderboard
from morphmlp.evaluate.multiview import EvalConfig
from morphmlp.evaluate.runner import evaluate_pair, plan_pair, record_skip

log = logging.getLogger(__name__)

LEADERBOARD_FILES = ("leaderboard.md", "leaderboard.html")


@dataclass
class ScheduleReport:
    evaluated: list[str] = field(default_factory=list)  # one line per pair scored now
    skipped: list[str] = field(default_factory=list)  # recorded as skipped now, with the reason
    reported: list[str] = field(default_factory=list)  # not evaluated, not recorded, with why
    failed: list[str] = field(default_factory=list)  # failed unexpectedly
    up_to_date: int = 0  # pairs that already had a result
    leaderboard: Leaderboard | None = None
    leaderboard_logged: bool = False  # a new leaderboard went to MLflow

    @property
    def did_nothing(self) -> bool:
        return not (self.evaluated or self.skipped or self.failed)


def reevaluate(
    catalog: Catalog,
    *,
    output: str | None,
    cfg: EvalConfig,
    versions: list[str] | None = None,
    uri: str | None = None,
    address: str | None = None,
) -> ScheduleReport:
    """Evaluate the missing pairs (of `versions`, default all registered) and write the
    leaderboard to `output` (a folder URI; None: MLflow only)."""
    report = ScheduleReport()
    store = results.ResultsLedger(uri)
    registered = model_refs.registered_versions(uri)
    chosen = _choose_versions(registered, versions)
    benchmarks, left_out = _resolve_benchmarks(catalog, report)
    done = store.results()
    stale = store.unfinished()

    todo: dict[str, list[ResolvedBenchmark]] = {}
    for version in chosen:
        for bench in benchmarks:
            key = results.PairKey(
                version.version, bench.name, bench.content_hash, bench.protocol_hash
            )
            if key in done:
                report.up_to_date += 1
                continue
            if key in stale:
                log.info(
                    "v%s on %s: earlier run(s) %s did not finish; evaluating again",
                    version.version,
                    bench.name,
                    ", ".join(stale[key]),
                )
            todo.setdefault(version.version, []).append(bench)

    if todo:
        from morphmlp.cluster import connect_ray

        connect_ray(address)
    for version, pending in todo.items():
        _run_version(version, pending, cfg, uri, report)

    board = build_leaderboard(registered, benchmarks, store.results(), left_out=left_out)
    report.leaderboard = board
    if output is not None:
        storage.write_bytes_atomic(
            storage.join(output, LEADERBOARD_FILES[0]), board.to_markdown().encode()
        )
        storage.write_bytes_atomic(
            storage.join(output, LEADERBOARD_FILES[1]), board.to_html().encode()
        )
    if store.latest_leaderboard_hash() != board.content_hash():
        _log_leaderboard(board, uri)
        report.leaderboard_logged = True
    return report


def _choose_versions(registered, wanted):
    """The versions asked for; one that isn't registered stops the job before any work."""
    if wanted is None:
        return registered
    known = {v.version: v for v in registered}
    for version in wanted:
        if version not in known:
            raise ConfigError(
                f"--versions: {version!r} is not a registered version of "
                f"{tracking.REGISTERED_MODEL} (registered: {', '.join(known) or 'none'})"
            )
    return [known[v] for v in wanted]


def check_promotable(catalog: Catalog, benchmark: str) -> None:
    """--promote names a benchmark of the catalog (checked before any work)."""
    names = [b.name for b in catalog.benchmarks]
    if benchmark not in names:
        raise ConfigError(
            f"--promote: {benchmark!r} is not a benchmark of the catalog ({', '.join(names)})"
        )


def promote(catalog: Catalog, benchmark: str, uri: str | None = None) -> tuple[str, float]:
    """Move the `champion` alias to the registered version with the best top-1 on `benchmark`
    as it is now (its current content and protocol hashes); returns (version, top-1)."""
    check_promotable(catalog, benchmark)
    spec = next(b for b in catalog.benchmarks if b.name == benchmark)
    bench = resolve_benchmark(spec)
    registered = {v.version for v in model_refs.registered_versions(uri)}
    scored = [
        (result.metrics["top1"], int(key.model_version))
        for key, result in results.ResultsLedger(uri).results().items()
        if (key.benchmark, key.benchmark_hash, key.protocol_hash)
        == (bench.name, bench.content_hash, bench.protocol_hash)
        and result.outcome == results.OUTCOME_EVALUATED
        and "top1" in result.metrics
        and key.model_version in registered
    ]
    if not scored:
        raise ConfigError(f"--promote: no registered version has a result on {benchmark!r} yet")
    top1, version = max(scored)
    tracking.set_alias(tracking.ALIAS_CHAMPION, str(version), uri)
    return str(version), top1


def _resolve_benchmarks(catalog: Catalog, report: ScheduleReport):
    resolved, left_out = [], {}
    for bench in catalog.benchmarks:
        try:
            resolved.append(resolve_benchmark(bench))
        except MorphMLPError as err:  # hash mismatch, unreadable index: fix and re-run
            report.reported.append(f"benchmark {bench.name}: {err}")
            left_out[bench.name] = str(err)
    return resolved, left_out


def _run_version(version: str, pending, cfg: EvalConfig, uri, report: ScheduleReport) -> None:
    try:
        ckpt = model_refs.load(model_refs.model_version_uri(version), uri=uri)
    except MorphMLPError as err:  # e.g. its artifact was deleted: reported, retried next time
        report.reported.append(f"v{version}: {err}")
        return
    except Exception as err:
        log.exception("v%s: loading the checkpoint failed", version)
        report.failed.append(f"v{version}: {type(err).__name__}: {err}")
        return
    for bench in pending:
        pair = f"v{version} on {bench.name}"
        try:
            plan = plan_pair(ckpt, bench, cfg)
        except (ProtocolError, LabelSpaceError) as err:
            record_skip(ckpt, bench, str(err), uri=uri)
            report.skipped.append(f"{pair}: {err}")
            continue
        try:
            outcome = evaluate_pair(plan, cfg, uri=uri)
        except Exception as err:  # one pair's failure must not stop the others
            log.exception("%s failed", pair)
            report.failed.append(f"{pair}: {type(err).__name__}: {err}")
            continue
        m = outcome.metrics
        report.evaluated.append(
            f"{pair}: top-1 {100 * m.top1:.1f}%, top-5 {100 * m.top5:.1f}% "
            f"({m.num_videos} videos, {plan.label_map.overlap} label overlap; run {outcome.run_id})"
        )


def _log_leaderboard(board: Leaderboard, uri: str | None) -> None:

    client = tracking.client(uri)
    run_id = tracking.start_run(
        results.EVAL_EXPERIMENT,
        "leaderboard",
        tags={
            results.TAG_JOB: results.JOB_LEADERBOARD,
            results.TAG_LEADERBOARD_HASH: board.content_hash(),
            "git_commit": tracking.git_commit(),
        },
        uri=uri,
    )
    client.log_text(run_id, board.to_markdown(), LEADERBOARD_FILES[0])
    client.log_text(run_id, board.to_html(), LEADERBOARD_FILES[1])
    client.set_terminated(run_id, "FINISHED")
