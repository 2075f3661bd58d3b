"""The leaderboard: one row per registered model version, one column per benchmark (top-1 %).

Cells hold the result for the benchmark's *current* content and protocol hashes only, so a
changed benchmark shows as pending until it is re-run. Rows are sorted by the mean top-1 over the
benchmarks a version has results on (best first), versions without results last, newest first.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from morphmlp.evaluate.catalog import ResolvedBenchmark
from morphmlp.evaluate.model_refs import RegisteredVersion
from morphmlp.evaluate.results import (
    OUTCOME_EVALUATED,
    OUTCOME_SKIPPED,
    TAG_BENCHMARK_CLASSES,
    TAG_LABEL_OVERLAP,
    TAG_SHARED_CLASSES,
    PairKey,
    PairResult,
)

PENDING = "pending"
SKIPPED = "n/a"


@dataclass
class Row:
    version: str
    model: str  # variant, frames x size, training run
    cells: dict[str, str]  # benchmark name -> cell text
    mean_top1: float | None  # percent


@dataclass
class Leaderboard:
    benchmarks: list[tuple[str, str]]  # (name, description) per column
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        names = [name for name, _ in self.benchmarks]
        lines = [
            "# MorphMLP leaderboard",
            "",
            "Top-1 accuracy (%) per registered model version of `morphmlp` and benchmark.",
            "",
            "| version | model | " + " | ".join(names) + " | mean |",
            "|---|---|" + "---:|" * len(names) + "---:|",
        ]
        for row in self.rows:
            cells = [row.cells[name] for name in names]
            lines.append(
                f"| v{row.version} | {row.model} | " + " | ".join(cells) + f" | {_mean(row)} |"
            )
        lines += ["", "Benchmarks:", ""]
        lines += [f"- **{name}**: {text}" for name, text in self.benchmarks]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        names = [name for name, _ in self.benchmarks]
        head = "".join(f"<th>{html.escape(n)}</th>" for n in ["version", "model", *names, "mean"])
        body = []
        for row in self.rows:
            cells = [f"v{row.version}", row.model, *(row.cells[n] for n in names), _mean(row)]
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
        bench = "".join(
            f"<li><b>{html.escape(n)}</b>: {html.escape(t)}</li>" for n, t in self.benchmarks
        )
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        return (
            "<!doctype html>\n<html><head><meta charset='utf-8'><title>MorphMLP leaderboard</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 10px}td{text-align:right}"
            "td:nth-child(-n+2){text-align:left}th{background:#f3f3f3}</style></head><body>\n"
            "<h1>MorphMLP leaderboard</h1>\n<p>Top-1 accuracy (%) per registered model version "
            "of <code>morphmlp</code> and benchmark.</p>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody>"
            f"</table>\n<h2>Benchmarks</h2><ul>{bench}</ul>\n"
            + (f"<h2>Notes</h2><ul>{notes}</ul>\n" if notes else "")
            + "</body></html>\n"
        )

    def content_hash(self) -> str:
        return hashlib.sha256(self.to_markdown().encode()).hexdigest()[:16]


def build_leaderboard(
    versions: Sequence[RegisteredVersion],
    benchmarks: Sequence[ResolvedBenchmark],
    results: Mapping[PairKey, PairResult],
    *,
    left_out: Mapping[str, str] | None = None,
) -> Leaderboard:
    """The table for these versions and benchmarks; `left_out`: benchmark name -> why it has no
    column (e.g. its index no longer matches the catalog's hash)."""
    rows, notes = [], []
    for version in versions:
        cells, top1s = {}, []
        for bench in benchmarks:
            key = PairKey(version.version, bench.name, bench.content_hash, bench.protocol_hash)
            result = results.get(key)
            if result is None:
                cells[bench.name] = PENDING
            elif result.outcome == OUTCOME_SKIPPED:
                cells[bench.name] = SKIPPED
                notes.append(f"v{version.version} on {bench.name}: {result.skip_reason}")
            elif result.outcome == OUTCOME_EVALUATED:
                top1 = 100 * result.metrics.get("top1", float("nan"))
                top1s.append(top1)
                cells[bench.name] = f"{top1:.1f}" + _overlap(result)
        mean = sum(top1s) / len(top1s) if top1s else None
        rows.append(Row(version.version, _model(version), cells, mean))
    rows.sort(key=lambda r: (r.mean_top1 is None, -(r.mean_top1 or 0.0), -int(r.version)))
    columns = [(b.name, _describe(b)) for b in benchmarks]
    if any("†" in cell for row in rows for cell in row.cells.values()):
        notes.insert(0, "† scored on the classes shared with the model only (shared/total)")
    for name, reason in (left_out or {}).items():
        notes.append(f"benchmark {name} left out: {reason}")
    return Leaderboard(columns, rows, notes)


def _overlap(result: PairResult) -> str:
    tags = result.tags
    if tags.get(TAG_LABEL_OVERLAP) != "partial":
        return ""
    return f"† ({tags.get(TAG_SHARED_CLASSES)}/{tags.get(TAG_BENCHMARK_CLASSES)})"


def _model(version: RegisteredVersion) -> str:
    tags = version.tags
    parts = [tags.get("variant", "?")]
    if "frames" in tags and "img_size" in tags:
        parts.append(f"{tags['frames']}x{tags['img_size']}²")
    if "run" in tags:
        parts.append(f"{tags['run']}/{tags.get('kind', '')}".rstrip("/"))
    return " ".join(parts)


def _describe(bench: ResolvedBenchmark) -> str:
    protocol = bench.spec.protocol
    return (
        f"{protocol.describe()} views (clips x crops), {len(bench.index)} videos, "
        f"{len(bench.class_names)} classes, content {bench.content_hash[:12]}, "
        f"protocol {bench.protocol_hash}"
    )


def _mean(row: Row) -> str:
    return "" if row.mean_top1 is None else f"{row.mean_top1:.1f}"
