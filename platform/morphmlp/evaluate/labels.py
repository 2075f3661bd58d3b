"""Matching a checkpoint's classes to a benchmark's, by class name.

A model trained on one label space is scored on another through the classes both share: videos
of other classes are left out, the model's outputs are reordered into the benchmark's labels and
the prediction is the best shared class (the argmax never lands on a class the benchmark lacks).
Names match after lower-casing, `_` -> space and collapsing whitespace, so "air_drumming" and
"Air drumming" are one class.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from morphmlp.errors import MorphMLPError


class LabelSpaceError(MorphMLPError):
    """The checkpoint's classes and the benchmark's can't be matched (no shared class name)."""


@dataclass(frozen=True)
class LabelMap:
    """Benchmark labels evaluated (ascending) and the model output that scores each."""

    benchmark_labels: tuple[int, ...]
    model_outputs: tuple[int, ...]
    num_benchmark_classes: int
    num_model_classes: int

    @property
    def num_shared(self) -> int:
        return len(self.benchmark_labels)

    @property
    def overlap(self) -> str:
        """full: both label spaces are the same set; partial: only some classes are shared."""
        same = self.num_shared == self.num_benchmark_classes == self.num_model_classes
        return "full" if same else "partial"

    def describe(self) -> str:
        return (
            f"{self.overlap} label overlap: {self.num_shared} shared classes "
            f"(benchmark {self.num_benchmark_classes}, model {self.num_model_classes})"
        )


def normalize_name(name: str) -> str:
    return re.sub(r"\s+", " ", name.replace("_", " ")).strip().lower()


def match_labels(
    model_classes: Sequence[str] | None,
    num_model_outputs: int,
    benchmark_classes: Sequence[str],
    *,
    where: str = "",
) -> LabelMap:
    """Map benchmark labels to model outputs by class name.

    A checkpoint without class names (a release file) is taken to predict the benchmark's labels
    in order, which needs as many outputs as the benchmark has classes.
    """
    prefix = f"{where}: " if where else ""
    if model_classes is None:
        if num_model_outputs != len(benchmark_classes):
            raise LabelSpaceError(
                f"{prefix}the checkpoint has no class names and {num_model_outputs} outputs, the "
                f"benchmark {len(benchmark_classes)} classes; outputs can only be taken as the "
                "benchmark's labels in order when the counts agree"
            )
        labels = tuple(range(num_model_outputs))
        return LabelMap(labels, labels, num_model_outputs, num_model_outputs)
    if len(model_classes) != num_model_outputs:
        raise LabelSpaceError(
            f"{prefix}the checkpoint names {len(model_classes)} classes but its classifier has "
            f"{num_model_outputs} outputs"
        )
    outputs: dict[str, int] = {}
    for i, name in enumerate(model_classes):
        key = normalize_name(name)
        if key in outputs:
            raise LabelSpaceError(
                f"{prefix}the checkpoint's classes {model_classes[outputs[key]]!r} and {name!r} "
                "are the same name once normalised; class names must be distinct"
            )
        outputs[key] = i
    pairs = [
        (label, outputs[normalize_name(name)])
        for label, name in enumerate(benchmark_classes)
        if normalize_name(name) in outputs
    ]
    if not pairs:
        raise LabelSpaceError(
            f"{prefix}no class name in common (benchmark e.g. "
            f"{', '.join(map(repr, benchmark_classes[:3]))}; model e.g. "
            f"{', '.join(map(repr, model_classes[:3]))})"
        )
    labels, model_outputs = zip(*pairs, strict=True)
    return LabelMap(tuple(labels), tuple(model_outputs), len(benchmark_classes), len(model_classes))
