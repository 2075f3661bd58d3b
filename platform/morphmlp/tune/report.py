"""The search's result: every trial ranked by Pareto front of (GMACs ↓, val top-1 ↑).

Front 0 holds the trials no other trial beats on both counts (as cheap or cheaper *and* as
accurate or more, better on one); front 1 is the front of the rest, and so on. Within a front
trials are listed cheapest first. Trials that never validated (failed early) come last.
Written as CSV, Markdown and a PNG plot (matplotlib, Agg backend).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CSV_FILE, MARKDOWN_FILE, PLOT_FILE = "pareto.csv", "pareto.md", "pareto.png"


@dataclass
class TrialResult:
    name: str
    status: str  # "completed", "stopped early" (by ASHA) or "failed"
    gmacs: float
    params: int
    top1: float | None  # best validation top-1 of the trial; None if it never validated
    epochs: int  # epochs trained
    values: dict[str, Any] = field(default_factory=dict)  # the searched values
    run_id: str | None = None  # the trial's MLflow run
    error: str | None = None


def pareto_fronts(points: Sequence[tuple[float, float]]) -> list[int]:
    """Front number of each (gmacs, top1) point by non-dominated sorting (0 = Pareto front)."""

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and a != b

    fronts = [-1] * len(points)
    remaining = set(range(len(points)))
    front = 0
    while remaining:
        current = {
            i for i in remaining if not any(dominates(points[j], points[i]) for j in remaining)
        }
        for i in current:
            fronts[i] = front
        remaining -= current
        front += 1
    return fronts


def ranked(results: Sequence[TrialResult]) -> list[tuple[int | None, TrialResult]]:
    """(front, result) pairs: by front, then cheapest first; unvalidated trials last."""
    scored = [r for r in results if r.top1 is not None]
    fronts = pareto_fronts([(r.gmacs, r.top1) for r in scored])
    order = sorted(zip(fronts, scored, strict=True), key=lambda p: (p[0], p[1].gmacs, -p[1].top1))
    unscored = [(None, r) for r in results if r.top1 is None]
    return [*order, *sorted(unscored, key=lambda p: p[1].name)]


def best(results: Sequence[TrialResult]) -> TrialResult | None:
    """Highest top-1; among equals, the cheapest."""
    scored = [r for r in results if r.top1 is not None]
    return min(scored, key=lambda r: (-r.top1, r.gmacs), default=None)


def write_report(
    results: Sequence[TrialResult], folder: str, *, gmacs_budget: float | None = None
) -> list[str]:
    """Write pareto.csv, pareto.md and pareto.png into the local `folder`; their paths."""
    rows = ranked(results)
    keys = list(dict.fromkeys(k for r in results for k in r.values))
    paths = [os.path.join(folder, name) for name in (CSV_FILE, MARKDOWN_FILE, PLOT_FILE)]
    with open(paths[0], "w", newline="") as f:
        columns = ["front", "trial", "val_top1", "gmacs", "params", "epochs", "status"]
        writer = csv.DictWriter(f, [*columns, *keys, "mlflow_run_id", "error"])
        writer.writeheader()
        for front, r in rows:
            writer.writerow(
                {
                    "front": front,
                    "trial": r.name,
                    "val_top1": r.top1,
                    "gmacs": r.gmacs,
                    "params": r.params,
                    "epochs": r.epochs,
                    "status": r.status,
                    **{k: json.dumps(v) for k, v in r.values.items()},
                    "mlflow_run_id": r.run_id,
                    "error": r.error,
                }
            )
    with open(paths[1], "w") as f:
        f.write(markdown_table(rows, keys, gmacs_budget))
    _plot(rows, paths[2], gmacs_budget)
    return paths


def markdown_table(
    rows: Sequence[tuple[int | None, TrialResult]], keys: Sequence[str], gmacs_budget: float | None
) -> str:
    budget = f", budget {gmacs_budget:g} GMACs" if gmacs_budget is not None else ""
    lines = [
        f"Trials by Pareto front of (GMACs ↓, val top-1 ↑){budget}; front 0 is the Pareto front.",
        "",
        "| front | trial | val top-1 | GMACs | params | epochs | status | "
        + " | ".join(keys)
        + " |",
        "|" + "---|" * (7 + len(keys)),
    ]
    for front, r in rows:
        top1 = "-" if r.top1 is None else f"{100 * r.top1:.2f}%"
        status = r.status if r.error is None else f"{r.status}: {r.error}"
        values = [_short(r.values.get(k, "")) for k in keys]
        cells = [
            "-" if front is None else str(front),
            r.name,
            top1,
            f"{r.gmacs:.3f}",
            f"{r.params / 1e6:.2f}M",
            str(r.epochs),
            status,
            *values,
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "-".join(map(str, value))
    return str(value)


def _plot(
    rows: Sequence[tuple[int | None, TrialResult]], path: str, gmacs_budget: float | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    scored = [(front, r) for front, r in rows if front is not None]
    for front, r in scored:
        color = "tab:red" if front == 0 else "tab:gray"
        face = "none" if r.status == "stopped early" else color
        ax.scatter(r.gmacs, 100 * r.top1, s=40, edgecolors=color, facecolors=face, zorder=3)
        ax.annotate(
            r.name, (r.gmacs, 100 * r.top1), fontsize=7, xytext=(4, 4), textcoords="offset points"
        )
    front = sorted((r.gmacs, 100 * r.top1) for f, r in scored if f == 0)
    if front:
        ax.step(*zip(*front, strict=True), where="post", color="tab:red", label="Pareto front")
    if gmacs_budget is not None:
        ax.axvline(gmacs_budget, color="tab:blue", linestyle="--", label="GMACs budget")
    ax.margins(0.15)
    ax.set_xlabel("GMACs per clip")
    ax.set_ylabel("best val top-1 (%)")
    unscored = len(rows) - len(scored)
    missing = f"; {unscored} never validated" if unscored else ""
    ax.set_title(f"{len(rows)} trials (hollow: stopped early by ASHA{missing})")
    if front or gmacs_budget is not None:
        ax.legend(loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
