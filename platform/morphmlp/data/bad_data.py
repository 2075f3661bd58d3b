"""BadDataLedger: where decode actors record unreadable videos, once per URI, for the whole run.

The driver creates it (a small named Ray actor, no CPU), one per split, so that the bad fraction
is per split; decode actors receive the handle and look the actor up by name. It de-duplicates by
URI, logs each bad video once, and gives the driver a summary, a report file for MLflow and a
threshold check (BadDataError past max_fraction). `state()` / `create(restore=...)` carry what it
found across attempts of one run: training keeps it in the run's storage beside the checkpoints.
"""

from __future__ import annotations

import json
import logging
import uuid

import pyarrow as pa

from morphmlp import storage
from morphmlp.data.errors import BadDataError
from morphmlp.data.index import REJECTS_SCHEMA, write_rejects
from morphmlp.errors import MorphMLPError

log = logging.getLogger(__name__)


class _LedgerActor:
    def __init__(self, log_each: bool = True) -> None:
        self.bad: dict[str, dict] = {}
        self.seen: set[str] = set()
        self.log_each = log_each

    def add(self, seen: list[str], failures: list[dict]) -> None:
        self.seen.update(seen)
        for record in failures:
            if record["uri"] in self.bad:
                continue
            self.bad[record["uri"]] = record
            if not self.log_each:
                continue
            log.warning(
                "bad video %s (row %s): %s: %s",
                record["uri"],
                record["row"],
                record["reason"],
                record["detail"],
            )

    def summary(self) -> dict:
        seen = len(self.seen | self.bad.keys())
        return {"bad": len(self.bad), "seen": seen, "fraction": len(self.bad) / max(seen, 1)}

    def records(self) -> list[dict]:
        return sorted(self.bad.values(), key=lambda r: (r["row"], r["uri"]))

    def state(self) -> dict:
        return {"bad": self.records(), "seen": sorted(self.seen)}

    def restore(self, state: dict) -> None:
        self.seen.update(state.get("seen", []))
        for record in state.get("bad", []):
            self.bad.setdefault(record["uri"], record)


class BadDataLedger:
    """A picklable handle on the ledger actor (decode actors get it through their constructor)."""

    def __init__(self, name: str, namespace: str | None = None):
        self.name = name
        self.namespace = namespace
        self._handle = None

    @classmethod
    def create(
        cls, name: str | None = None, *, restore: dict | None = None, log_each: bool = True
    ) -> BadDataLedger:
        """Start the ledger actor (or attach to a live one of that name), holding what an earlier
        attempt found (`restore`: a `state()`). `log_each=False`: the caller reports the bad
        videos itself (jobs/predict.py prints each one once)."""
        import ray

        name = name or f"morphmlp-bad-data-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(num_cpus=0)(_LedgerActor).options(name=name, get_if_exists=True)
        ledger = cls(name, ray.get_runtime_context().namespace)
        ledger._handle = actor.remote(log_each)
        if restore:
            ray.get(ledger._handle.restore.remote(restore))
        return ledger

    @classmethod
    def lookup(cls, name: str) -> BadDataLedger:
        """Attach to the running ledger of that name (in this job's namespace)."""
        import ray

        ledger = cls(name, ray.get_runtime_context().namespace)
        try:
            ledger._handle = ray.get_actor(name)
        except ValueError as err:
            raise MorphMLPError(
                f"no bad-data ledger named {name!r} is running; create it with "
                "BadDataLedger.create() in the driver first"
            ) from err
        return ledger

    def __getstate__(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "_handle": None}

    @property
    def _actor(self):
        if self._handle is None:
            import ray

            self._handle = ray.get_actor(self.name, namespace=self.namespace)
        return self._handle

    def add(self, seen: list[str], failures: list[dict]) -> None:
        """Record URIs attempted and failures (uri, row, reason, error_type, detail); no wait.

        Both are redacted here, alike: the records reach logs and the MLflow report, and a bad
        video must match its own entry in the seen list to be counted once."""
        failures = [{**r, "uri": storage.redact(r["uri"])} for r in failures]
        self._actor.add.remote([storage.redact(u) for u in seen], failures)

    def summary(self) -> dict:
        """{"bad": distinct bad videos, "seen": distinct videos attempted, "fraction": bad/seen}."""
        import ray

        return ray.get(self._actor.summary.remote())

    def records(self) -> list[dict]:
        """Every bad video once: uri, row, reason, error_type, detail (sorted by row)."""
        import ray

        return ray.get(self._actor.records.remote())

    def state(self) -> dict:
        """What it found so far (bad records and the videos attempted), JSON-able."""
        import ray

        return ray.get(self._actor.state.remote())

    def write_report(self, uri: str) -> None:
        """The records as CSV (uri ends in .csv) or Parquet, e.g. to attach to the MLflow run."""
        write_rejects(pa.Table.from_pylist(self.records(), schema=REJECTS_SCHEMA), uri)

    def check(
        self, max_fraction: float, *, what: str = "videos", report: str | None = None
    ) -> None:
        """Raise BadDataError if more than max_fraction of the videos seen were unreadable.

        The one threshold check (training per split, evaluation per pair): the message names the
        count, the threshold, the first offenders and where the full report is."""
        summary = self.summary()
        if summary["fraction"] <= max_fraction:
            return
        where = f" Full report: {storage.redact(report)}." if report else ""
        raise BadDataError(
            f"{summary['bad']} of {summary['seen']} {what} ({summary['fraction']:.2%}) could not "
            f"be read, more than data.max_bad_fraction={max_fraction:.2%}. First: "
            f"{describe_offenders(self.records())}.{where} Fix or drop them "
            "(jobs/prepare_data.py writes a rejects file) or raise the threshold."
        )


def save_states(uri: str, states: dict[str, dict]) -> None:
    """{split: ledger state} as one JSON file, atomically (a crash leaves the previous one)."""
    storage.write_bytes_atomic(uri, json.dumps(states).encode())


def load_states(uri: str) -> dict[str, dict]:
    """What `save_states` wrote; {} when nothing was written yet."""
    if not storage.exists(uri):
        return {}
    return json.loads(storage.read_bytes(uri))


def describe_offenders(records: list[dict], limit: int = 3) -> str:
    """The first bad videos, for a one-line error: "a.mp4 (missing), b.mp4 (truncated), ..."."""
    shown = ", ".join(f"{r['uri']} ({r['reason']})" for r in records[:limit])
    more = len(records) - limit
    return shown + (f" and {more} more" if more > 0 else "")
