"""Video-level scores from per-view scores, and the metrics and reports computed from them.

Everything here works on plain arrays in the evaluated label space (the benchmark's classes the
model shares, in benchmark order), so it is the same for any model and any cluster.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

TOP_K = 5


@dataclass
class VideoScores:
    """One row per video: its id (row of the benchmark index), label and mean score over views."""

    video: np.ndarray  # (V,) int64, ascending
    label: np.ndarray  # (V,) int64, position in the evaluated label space
    scores: np.ndarray  # (V, K) float64
    num_views: np.ndarray  # (V,) int64


def average_views(
    video: np.ndarray, label: np.ndarray, scores: np.ndarray, *, expected_views: int
) -> VideoScores:
    """Mean of each video's view scores (the release's TestMeter sums; the ranking is the same).

    A video with fewer views than the protocol's is still scored on the views it has, with a
    warning, as TestMeter does.
    """
    video = np.asarray(video, dtype=np.int64)
    label = np.asarray(label, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    ids, inverse, counts = np.unique(video, return_inverse=True, return_counts=True)
    sums = np.zeros((len(ids), scores.shape[1]))
    np.add.at(sums, inverse, scores)
    labels = np.full(len(ids), -1, dtype=np.int64)
    labels[inverse] = label
    if np.any(labels[inverse] != label):
        bad = ids[inverse[labels[inverse] != label][0]]
        raise ValueError(f"video {bad}: its views carry different labels")
    short = ids[counts != expected_views]
    if len(short):
        log.warning(
            "%d videos have a view count other than %d (e.g. video %d: %d views)",
            len(short),
            expected_views,
            short[0],
            counts[counts != expected_views][0],
        )
    return VideoScores(ids, labels, sums / counts[:, None], counts.astype(np.int64))


@dataclass
class Metrics:
    top1: float
    top5: float  # top-min(5, K) when fewer than 5 classes are evaluated
    mean_class_accuracy: float  # mean over the classes that have videos
    per_class_accuracy: np.ndarray  # (K,) top-1 per class; NaN for a class without videos
    class_counts: np.ndarray  # (K,) videos per class
    confusion: np.ndarray  # (K, K) counts, rows = true class, columns = predicted
    num_videos: int

    def summary(self) -> dict[str, float]:
        return {
            "top1": self.top1,
            "top5": self.top5,
            "mean_class_accuracy": self.mean_class_accuracy,
            "num_videos": float(self.num_videos),
        }


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores per row, best first (ties: the lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def compute_metrics(scores: np.ndarray, labels: np.ndarray) -> Metrics:
    """Top-1/top-5 (fractions in [0, 1]), mean class accuracy, per-class accuracy, confusion."""
    if len(labels) == 0:
        raise ValueError("no videos were scored")
    num_classes = scores.shape[1]
    best = topk(scores, min(TOP_K, num_classes))
    correct = best == labels[:, None]
    predicted = best[:, 0]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    counts = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.diag(confusion) / counts
    return Metrics(
        top1=float(correct[:, 0].mean()),
        top5=float(correct.any(axis=1).mean()),
        mean_class_accuracy=float(np.nanmean(per_class)),
        per_class_accuracy=per_class,
        class_counts=counts,
        confusion=confusion,
        num_videos=len(labels),
    )


def per_class_table(metrics: Metrics, class_names: Sequence[str]):
    """pyarrow table: class, videos, top-1 accuracy (null without videos)."""
    import pyarrow as pa

    accuracy = [None if np.isnan(a) else float(a) for a in metrics.per_class_accuracy]
    return pa.table(
        {
            "class": pa.array(list(class_names), pa.string()),
            "videos": pa.array(metrics.class_counts.tolist(), pa.int64()),
            "accuracy": pa.array(accuracy, pa.float64()),
        }
    )


def predictions_table(result: VideoScores, video_uris: Sequence[str], class_names: Sequence[str]):
    """Per-video predictions: uri, label, predicted, top-5 and the predicted class's score.

    Labels are class names plus their index in `class_names` (the evaluated label space)."""
    import pyarrow as pa

    best = topk(result.scores, min(TOP_K, result.scores.shape[1]))
    predicted = best[:, 0]
    names = np.asarray(class_names, dtype=object)
    return pa.table(
        {
            "video": pa.array(list(video_uris), pa.string()),
            "label": pa.array(result.label, pa.int64()),
            "label_name": pa.array(names[result.label].tolist(), pa.string()),
            "predicted": pa.array(predicted, pa.int64()),
            "predicted_name": pa.array(names[predicted].tolist(), pa.string()),
            "correct": pa.array(predicted == result.label, pa.bool_()),
            "top5": pa.array(best.tolist(), pa.list_(pa.int64())),
            "top5_names": pa.array(names[best].tolist(), pa.list_(pa.string())),
            "score": pa.array(result.scores[np.arange(len(predicted)), predicted], pa.float64()),
            "num_views": pa.array(result.num_views, pa.int64()),
        }
    )


def confusion_png(confusion: np.ndarray, class_names: Sequence[str], title: str) -> bytes:
    """The confusion matrix, rows normalised to the true class, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.nan_to_num(confusion / confusion.sum(axis=1, keepdims=True))
    side = min(max(4.0, 0.35 * k + 2.0), 40.0)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if k <= 60:  # beyond that the names are unreadable anyway
        ax.set_xticks(range(k), labels=list(class_names), rotation=90, fontsize=8)
        ax.set_yticks(range(k), labels=list(class_names), fontsize=8)
    if k <= 20:
        for (i, j), count in np.ndenumerate(confusion):
            if count:
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
