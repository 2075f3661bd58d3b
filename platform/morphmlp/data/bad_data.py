"""BadDataLedger: where decode actors record unreadable videos, once per URI, for the whole run.

The driver creates it (a small named Ray actor, no CPU); decode actors receive the handle and look
the actor up by name. It de-duplicates by URI, logs each bad video once, and gives the driver a
summary, a report file for MLflow and a threshold check (BadDataError past max_fraction).
"""

from __future__ import annotations

import logging
import uuid

import pyarrow as pa

from morphmlp import storage
from morphmlp.data.errors import BadDataError
from morphmlp.data.index import REJECTS_SCHEMA, write_rejects
from morphmlp.errors import MorphMLPError

log = logging.getLogger(__name__)


class _LedgerActor:
    def __init__(self) -> None:
        self.bad: dict[str, dict] = {}
        self.seen: set[str] = set()

    def add(self, seen: list[str], failures: list[dict]) -> None:
        self.seen.update(seen)
        for record in failures:
            if record["uri"] in self.bad:
                continue
            self.bad[record["uri"]] = record
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


class BadDataLedger:
    """A picklable handle on the ledger actor (decode actors get it through their constructor)."""

    def __init__(self, name: str, namespace: str | None = None):
        self.name = name
        self.namespace = namespace
        self._handle = None

    @classmethod
    def create(cls, name: str | None = None) -> BadDataLedger:
        """Start the ledger actor (or attach to a live one of that name)."""
        import ray

        name = name or f"morphmlp-bad-data-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(num_cpus=0)(_LedgerActor).options(name=name, get_if_exists=True)
        ledger = cls(name, ray.get_runtime_context().namespace)
        ledger._handle = actor.remote()
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
        """Record URIs attempted and failures (uri, row, reason, error_type, detail); no wait."""
        self._actor.add.remote([storage.redact(u) for u in seen], failures)

    def summary(self) -> dict:
        """{"bad": distinct bad videos, "seen": distinct videos attempted, "fraction": bad/seen}."""
        import ray

        return ray.get(self._actor.summary.remote())

    def records(self) -> list[dict]:
        """Every bad video once: uri, row, reason, error_type, detail (sorted by row)."""
        import ray

        return ray.get(self._actor.records.remote())

    def write_report(self, uri: str) -> None:
        """The records as CSV (uri ends in .csv) or Parquet, e.g. to attach to the MLflow run."""
        write_rejects(pa.Table.from_pylist(self.records(), schema=REJECTS_SCHEMA), uri)

    def check(self, max_fraction: float) -> None:
        """Raise BadDataError if more than max_fraction of the videos seen were unreadable."""
        summary = self.summary()
        if summary["fraction"] <= max_fraction:
            return
        examples = "; ".join(f"{r['uri']} ({r['reason']})" for r in self.records()[:3])
        raise BadDataError(
            f"{summary['bad']} of {summary['seen']} videos ({summary['fraction']:.2%}) could not "
            f"be read, more than data.max_bad_fraction={max_fraction:.2%}. First: {examples}. "
            "Fix or drop them (jobs/prepare_data.py writes a rejects file) or raise the threshold."
        )
