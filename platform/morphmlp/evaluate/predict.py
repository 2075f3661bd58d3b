"""Predict the classes of videos with a checkpoint or an exported file, multi-view.

The protocol is the checkpoint's own (frames and crop size its network is built for; sampling,
rate, short side and views from the training run's data settings, `eval_data_config`) unless a
flag says otherwise. Each video's clips x crops views are scored, softmaxed and averaged, as
evaluation does; the top-k classes come out with their probabilities.

Many videos run on Ray through the evaluation data path: videos not from an index are probed
(`probe_videos`: the clip plan needs frame count and rate), the eval decode actors
(`build_eval_dataset`) make the views and a model actor scores them. One video runs in this
process with the eval decode actor's own per-video code (`EvalClips.views`), so it gets the same
frames as on Ray. An unreadable video is a failed row (one line naming it); the others go on.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from morphmlp import storage
from morphmlp.data.builders import VIDEO_EXTENSIONS
from morphmlp.data.config import DataConfig
from morphmlp.data.index import PROBED_COLUMNS, VideoIndex, read_index
from morphmlp.data.pipeline import EvalClips
from morphmlp.errors import ConfigError, MorphMLPError
from morphmlp.evaluate.catalog import Protocol
from morphmlp.evaluate.export import ExportedModel
from morphmlp.evaluate.model_refs import Checkpoint
from morphmlp.evaluate.multiview import EvalConfig, eval_data_config

log = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".csv", ".parquet")


class VideoNotFoundError(MorphMLPError):
    """A VIDEO argument that names nothing: no such file, or a folder without videos."""


@dataclass
class PredictConfig:
    """Protocol overrides (None: the checkpoint's own) and resources of a prediction."""

    clips: int | None = None  # temporal clips per video
    crops: int | None = None  # spatial crops per clip: 1 or 3
    sampling_rate: int | None = None  # dense sampling: frame stride at target_fps
    short_side: int | None = None  # short side frames are scaled to before the crops
    top_k: int = 5
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        for name in ("clips", "sampling_rate", "short_side", "top_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} {value}: must be an integer >= 1")
        if self.crops is not None and self.crops not in (1, 3):
            raise ConfigError(
                f"--crops {self.crops}: choose 1 (center) or 3 (three crops along the long side)"
            )


# ---------------------------------------------------------------------------------------------
# The model: a checkpoint or an exported file, behind one runner


@dataclass
class PredictModel:
    checkpoint: Checkpoint  # weightless for an exported file (its spec as a checkpoint)
    exported: ExportedModel | None = None

    def describe(self) -> str:
        if self.exported is not None:
            return f"{self.checkpoint.reference} ({self.exported.spec.format})"
        return self.checkpoint.describe()

    @property
    def class_names(self) -> list[str]:
        names = self.checkpoint.class_names
        return list(names) if names is not None else [f"class_{i}" for i in range(self.num_classes)]

    @property
    def num_classes(self) -> int:
        return self.checkpoint.num_classes

    def runner(self, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """float32 normalised (B, 3, T, H, W) -> logits (B, K)."""
        if self.exported is not None:
            return self.exported.runner(threads)
        import torch

        from morphmlp.models import create_model

        if threads is not None:
            torch.set_num_threads(threads)
        model = create_model(self.checkpoint.model_config)
        model.load_state_dict(self.checkpoint.state_dict)
        model.eval()

        def run(clips: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(clips)).float().numpy()

        return run


def load_model(
    reference: str,
    *,
    variant: str | None = None,
    frames: int | None = None,
    img_size: int | None = None,
    uri: str | None = None,
) -> PredictModel:
    """A checkpoint reference (model_refs; variant/frames/img_size: release files only) or an
    exported .pt2 / .onnx with its sidecar."""
    from morphmlp.evaluate import model_refs
    from morphmlp.evaluate.export import load_exported

    if model_refs.is_exported(reference):
        given = {"--variant": variant, "--frames": frames, "--img-size": img_size}
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise ConfigError(
                f"{', '.join(extra)} only apply to release checkpoints; "
                f"{storage.redact(reference)} is an exported file with its own spec"
            )
        exported = load_exported(reference)
        return PredictModel(exported.checkpoint(), exported)
    ckpt = model_refs.load(reference, variant=variant, frames=frames, img_size=img_size, uri=uri)
    return PredictModel(ckpt)


def data_config(model: PredictModel, cfg: PredictConfig) -> DataConfig:
    """The checkpoint's test-time data settings with the overrides applied."""
    trained = model.checkpoint.data_config or {}
    protocol = Protocol(
        clips=cfg.clips or int(trained.get("test_num_clips", 1)),
        crops=cfg.crops or int(trained.get("test_num_crops", 1)),
        sampling=trained.get("sampling", "dense"),
        sampling_rate=cfg.sampling_rate,
    )
    settings = eval_data_config(protocol, model.checkpoint, cfg.eval)
    if cfg.short_side is not None:
        try:
            settings = dataclasses.replace(settings, test_scale=cfg.short_side)
        except ConfigError as err:
            raise ConfigError(f"--short-side {cfg.short_side}: {err}") from err
    return settings


# ---------------------------------------------------------------------------------------------
# The videos


@dataclass
class Video:
    uri: str
    start_sec: float | None = None
    end_sec: float | None = None
    probed: dict | None = None  # fps, num_frames, ... when it comes from an index

    @property
    def name(self) -> str:
        return storage.redact(self.uri)


def collect_videos(inputs: Sequence[str]) -> list[Video]:
    """VIDEO arguments -> videos: files (paths or URIs), folders (their videos, recursively, by
    name) and Parquet indexes (every row). Anything that names nothing fails here."""
    if not inputs:
        raise ConfigError("give at least one VIDEO (a file, a folder or a Parquet index)")
    videos: list[Video] = []
    for given in inputs:
        kind = _kind(given)
        if kind == "missing":
            raise VideoNotFoundError(f"VIDEO {storage.redact(given)}: no such file or folder")
        if kind == "folder":
            found = _videos_in(given)
            if not found:
                raise VideoNotFoundError(
                    f"VIDEO {storage.redact(given)}: a folder with no videos "
                    f"({', '.join(VIDEO_EXTENSIONS)})"
                )
            videos += [Video(uri) for uri in found]
        elif given.lower().endswith(".parquet"):
            videos += _index_videos(read_index(given))
        else:
            videos.append(Video(given))
    return videos


def _kind(uri: str) -> str:
    fs, path = storage.resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise VideoNotFoundError(f"VIDEO {storage.redact(uri)}: can't reach it ({err})") from err
    return {pafs.FileType.NotFound: "missing", pafs.FileType.Directory: "folder"}.get(
        info.type, "file"
    )


def _videos_in(folder: str) -> list[str]:
    fs, path = storage.resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        storage.join(folder, info.path[len(path) :].lstrip("/"))
        for info in infos
        if info.type == pafs.FileType.File and info.path.lower().endswith(VIDEO_EXTENSIONS)
    )


def _index_videos(index: VideoIndex) -> list[Video]:
    rows = index.table.to_pylist()
    probed = ("duration_sec", "fps", "num_frames", "width", "height", "codec")
    return [Video(r["uri"], r["start_sec"], r["end_sec"], {k: r[k] for k in probed}) for r in rows]


def check_output(uri: str | None, *, writable: bool = False) -> None:
    """--output names a .csv or .parquet file (and, with writable, its folder can be written)."""
    if uri is None:
        return
    if not uri.lower().endswith(OUTPUT_SUFFIXES):
        raise ConfigError(f"--output {storage.redact(uri)}: name a .csv or .parquet file")
    if writable:
        storage.check_writable(storage.parent(uri))


# ---------------------------------------------------------------------------------------------
# Prediction


@dataclass
class Prediction:
    video: str
    classes: list[str] = field(default_factory=list)  # top-k, best first
    probs: list[float] = field(default_factory=list)
    num_views: int = 0
    error: str | None = None  # "reason: detail" of an unreadable video

    @property
    def ok(self) -> bool:
        return self.error is None


def predict(
    videos: list[Video], model: PredictModel, data_cfg: DataConfig, cfg: PredictConfig
) -> list[Prediction]:
    """Predictions in input order: one video in this process, several on the connected Ray."""
    if len(videos) == 1:
        return [_predict_here(videos[0], model, data_cfg, cfg)]
    return _predict_on_ray(videos, model, data_cfg, cfg)


def _top(video: str, mean: np.ndarray, names: list[str], k: int, views: int) -> Prediction:
    order = np.argsort(-mean, kind="stable")[: min(k, len(names))]
    return Prediction(video, [names[i] for i in order], [float(mean[i]) for i in order], views)


class _OneVideo(EvalClips):
    """The eval decode actor for a single video in this process. EvalClips takes its index
    columns from Ray's object store; here they are at hand, and all the rest (clip window, clip
    indices, the one decoding pass, the crops) is EvalClips' own code."""

    def __init__(self, video: Video, info: dict, cfg: DataConfig, num_clips: int, num_crops: int):
        nan = float("nan")
        self.cfg = cfg
        self.uris = [video.uri]
        self.labels = np.zeros(1, np.int64)
        self.fps = np.array([info["fps"]], np.float64)
        self.num_frames = np.array([info["num_frames"]], np.int64)
        self.start_sec = np.array([nan if video.start_sec is None else video.start_sec])
        self.end_sec = np.array([nan if video.end_sec is None else video.end_sec])
        self.ledger = None
        self.bad_rows = set()
        self.num_clips, self.num_crops = num_clips, num_crops


def _predict_here(
    video: Video, model: PredictModel, data_cfg: DataConfig, cfg: PredictConfig
) -> Prediction:
    import torch

    from morphmlp.data.decode import BAD_DATA_ERRORS, probe_video
    from morphmlp.data.probe import failure_record
    from morphmlp.data.transforms import normalize

    try:
        info = video.probed or dataclasses.asdict(probe_video(video.uri))
        clips = data_cfg.test_num_clips
        crops = data_cfg.test_num_crops
        views = _OneVideo(video, info, data_cfg, clips, crops).views(0)
    except BAD_DATA_ERRORS as err:
        record = failure_record(err)
        return Prediction(video.name, error=f"{record['reason']}: {record['detail']}")
    run = model.runner()
    batch = cfg.eval.batch_size
    probs = []
    for start in range(0, len(views), batch):
        x = normalize(torch.from_numpy(np.stack(views[start : start + batch])), *_norm(data_cfg))
        probs.append(_softmax(run(x.numpy())))
    mean = np.concatenate(probs).astype(np.float64).mean(axis=0)
    return _top(video.name, mean, model.class_names, cfg.top_k, len(views))


def _norm(data_cfg: DataConfig):
    return data_cfg.mean, data_cfg.std


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ScoreExported:
    """Model actor for an exported file: uint8 views in, per-view softmax scores out (the
    contract of multiview.ScoreViews, which scores checkpoints)."""

    def __init__(self, model: list, mean, std, threads: int):
        import ray

        self.run = ray.get(model[0]).runner(threads)
        self.mean, self.std = mean, std

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from morphmlp.data.transforms import normalize

        clips = batch["clip"]
        if len(clips) == 0:  # every video of the decode batch was unreadable
            scores = np.zeros((0, 0), np.float32)
        else:
            # Ray hands batches over read-only (zero-copy); torch wants a writable array.
            clips = np.require(clips, requirements="W")
            x = normalize(torch.from_numpy(clips), self.mean, self.std).numpy()
            scores = _softmax(self.run(x)).astype(np.float32)
        return {k: batch[k] for k in ("video", "view", "label")} | {"scores": scores}


def _quiet_ledger():
    """A bad-data ledger that records without logging: the job prints each failure once."""
    from morphmlp.data.bad_data import BadDataLedger

    return BadDataLedger.create(f"morphmlp-predict-{uuid.uuid4().hex[:8]}", log_each=False)


def _predict_on_ray(
    videos: list[Video], model: PredictModel, data_cfg: DataConfig, cfg: PredictConfig
) -> list[Prediction]:
    import ray

    from morphmlp.data.probe import probe_videos

    results: dict[int, Prediction] = {}
    unprobed = [i for i, v in enumerate(videos) if v.probed is None]
    probed: dict[int, dict] = {i: v.probed for i, v in enumerate(videos) if v.probed is not None}
    if unprobed:
        # The clip plan needs each video's frame count and rate, which an index has; probe
        # the rest (in parallel, with progress) and count what fails to open as failed.
        candidates = pa.table({"uri": [videos[i].uri for i in unprobed], "position": unprobed})
        ok, rejects = probe_videos(candidates)
        for row in ok.to_pylist():
            probed[row["position"]] = row
        for reject in rejects.to_pylist():
            position = unprobed[reject["row"]]
            results[position] = Prediction(
                videos[position].name, error=f"{reject['reason']}: {reject['detail']}"
            )
    positions = sorted(probed)
    if positions:
        rows = [
            {
                "uri": videos[p].uri,
                "label": 0,
                "split": "predict",
                "start_sec": videos[p].start_sec,
                "end_sec": videos[p].end_sec,
                **{k: probed[p][k] for k in PROBED_COLUMNS},
            }
            for p in positions
        ]
        index = VideoIndex(pa.Table.from_pylist(rows), model.class_names)
        ledger = _quiet_ledger()
        scores = _score(index, data_cfg, model, cfg, ledger)
        names = model.class_names
        for row, mean, views in zip(scores.video, scores.scores, scores.num_views, strict=True):
            results[positions[row]] = _top(
                videos[positions[row]].name, mean, names, cfg.top_k, int(views)
            )
        for record in ledger.records():
            position = positions[record["row"]]
            results[position] = Prediction(
                videos[position].name, error=f"{record['reason']}: {record['detail']}"
            )
        ray.kill(ledger._actor)
    for position, video in enumerate(videos):  # decoded to no view at all, yet not recorded
        results.setdefault(position, Prediction(video.name, error="unreadable_stream: no views"))
    return [results[p] for p in range(len(videos))]


def _score(
    index: VideoIndex, data_cfg: DataConfig, model: PredictModel, cfg: PredictConfig, ledger
):
    """(video row, mean softmax over its views) through the eval decode actors + a model actor."""
    import ray

    from morphmlp.data.pipeline import build_eval_dataset
    from morphmlp.evaluate.metrics import average_views
    from morphmlp.evaluate.multiview import ScoreViews, run_model_actors

    res = cfg.eval
    clips, crops = data_cfg.test_num_clips, data_cfg.test_num_crops
    views = build_eval_dataset(index, data_cfg, num_clips=clips, num_crops=crops, ledger=ledger)
    threads = max(1, round(res.cpus_per_model_actor))
    if model.exported is None:
        actor, kwargs = (
            ScoreViews,
            {
                "model_config": model.checkpoint.model_config,
                "state_dict": [ray.put(model.checkpoint.state_dict)],
                "mean": data_cfg.mean,
                "std": data_cfg.std,
                "outputs": tuple(range(model.num_classes)),
                "ensemble": "softmax",
                "threads": threads,
            },
        )
    else:
        actor, kwargs = (
            ScoreExported,
            {
                "model": [ray.put(model.exported)],
                "mean": data_cfg.mean,
                "std": data_cfg.std,
                "threads": threads,
            },
        )
    # ONNX Runtime runs on CPU here (CPUExecutionProvider), and so does the exported program
    parts = run_model_actors(
        views,
        actor,
        kwargs,
        res,
        total=len(index) * clips * crops,
        num_scores=model.num_classes,
        cpu_only=model.exported is not None,
    )
    video = parts["video"]
    return average_views(video, np.zeros_like(video), parts["scores"], expected_views=clips * crops)


# ---------------------------------------------------------------------------------------------
# Reports


def format_predictions(predictions: list[Prediction], top_k: int) -> str:
    """One video: its ranked classes. Several: a table, a row per predicted video."""
    done = [p for p in predictions if p.ok]
    if not done:
        return ""
    if len(predictions) == 1:
        (p,) = done
        width = max(len(c) for c in p.classes)
        lines = [p.video]
        lines += [
            f"  {rank}. {name:<{width}}  {prob:6.1%}"
            for rank, (name, prob) in enumerate(zip(p.classes, p.probs, strict=True), 1)
        ]
        return "\n".join(lines)
    k = max(len(p.classes) for p in done)
    header = ["video"] + [f"top-{i + 1}" for i in range(k)]
    rows = [
        [p.video]
        + [f"{c} {prob:.1%}" for c, prob in zip(p.classes, p.probs, strict=True)]
        + [""] * (k - len(p.classes))
        for p in done
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def predictions_table(predictions: list[Prediction], top_k: int) -> pa.Table:
    k = max([len(p.classes) for p in predictions] + [0]) or top_k
    columns: dict[str, list] = {"video": [], "ok": [], "error": [], "num_views": []}
    for i in range(1, k + 1):
        columns[f"class_{i}"] = []
        columns[f"prob_{i}"] = []
    for p in predictions:
        columns["video"].append(p.video)
        columns["ok"].append(p.ok)
        columns["error"].append(p.error)
        columns["num_views"].append(p.num_views)
        for i in range(k):
            columns[f"class_{i + 1}"].append(p.classes[i] if i < len(p.classes) else None)
            columns[f"prob_{i + 1}"].append(p.probs[i] if i < len(p.probs) else None)
    types = {"video": pa.string(), "ok": pa.bool_(), "error": pa.string(), "num_views": pa.int64()}
    for i in range(1, k + 1):
        types[f"class_{i}"], types[f"prob_{i}"] = pa.string(), pa.float64()
    return pa.table({name: pa.array(values, types[name]) for name, values in columns.items()})


def write_predictions(predictions: list[Prediction], uri: str, top_k: int) -> None:
    """CSV or Parquet by the name's suffix, written atomically."""
    table = predictions_table(predictions, top_k)
    buffer = io.BytesIO()
    if uri.lower().endswith(".csv"):
        pacsv.write_csv(table, buffer)
    else:
        pq.write_table(table, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())
