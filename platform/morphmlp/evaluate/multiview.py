"""Multi-view scoring as Ray Data batch inference.

Decode actors (CPU, `build_eval_dataset`) turn every video of the benchmark into clips x crops
uint8 views; a pool of model actors (a GPU each when the cluster has GPUs) normalises them and
runs the network; the driver gathers (video, view, scores) and averages each video's views. The
model's outputs are reordered into the benchmark's shared classes before the softmax, so scores
and the argmax live in the label space being evaluated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from morphmlp.config import ConfigError, from_dict
from morphmlp.data.config import DataConfig
from morphmlp.data.probe import format_duration
from morphmlp.evaluate.catalog import Protocol, ProtocolError
from morphmlp.evaluate.labels import LabelMap
from morphmlp.evaluate.metrics import VideoScores, average_views
from morphmlp.evaluate.model_refs import Checkpoint
from morphmlp.models import MorphMLPConfig

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 10.0


@dataclass
class EvalConfig:
    """Resources of an evaluation; what is computed is the protocol's business, not this."""

    batch_size: int = 8  # views per forward pass
    model_actors: tuple[int, int] = (1, 1)  # ActorPoolStrategy min/max size
    # Half a CPU: with a GPU the forward pass barely needs one, and on a 2-core machine a whole
    # one plus a decode actor leaves no CPU for Ray Data's read task, which then never starts.
    # CPU-only clusters: raise it (the actor's torch threads follow) and add model actors.
    cpus_per_model_actor: float = 0.5
    gpus_per_model_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    decode_actors: tuple[int, int] | None = None  # None: the checkpoint's training data settings
    cpus_per_decode_actor: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"eval batch_size: {self.batch_size}; must be >= 1")
        for name in ("model_actors", "decode_actors"):
            value = getattr(self, name)
            if value is not None and not 1 <= value[0] <= value[1]:
                raise ConfigError(f"eval {name}: {list(value)}; need 1 <= min <= max")
        for name in ("cpus_per_model_actor", "gpus_per_model_actor", "cpus_per_decode_actor"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"eval {name}: {value}; must be >= 0")


def eval_data_config(protocol: Protocol, ckpt: Checkpoint, cfg: EvalConfig) -> DataConfig:
    """The checkpoint's training data settings (normalisation, fps, scales) under the protocol.

    The network is built for one frame count and one crop size (its temporal FCs and chunk
    lengths are sized to them), so a protocol asking for others can't be followed.
    """
    model = ckpt.model_config
    where = ckpt.describe()
    if model.is_image:
        raise ProtocolError(f"{where} is an image model (num_frames 1); benchmarks are videos")
    if protocol.frames is not None and protocol.frames != model.num_frames:
        raise ProtocolError(
            f"protocol asks for {protocol.frames} frames but {where} is built for "
            f"{model.num_frames} frames"
        )
    if protocol.crop_size is not None and protocol.crop_size != model.img_size:
        raise ProtocolError(
            f"protocol asks for {protocol.crop_size}² crops but {where} is built for "
            f"{model.img_size}² input"
        )
    settings = dict(ckpt.data_config or {})
    settings.update(
        num_frames=model.num_frames,
        sampling=protocol.sampling,
        test_crop_size=model.img_size,
        test_num_clips=protocol.clips,
        test_num_crops=protocol.crops,
    )
    if protocol.sampling_rate is not None:
        settings["sampling_rate"] = protocol.sampling_rate
    if cfg.decode_actors is not None:
        settings["decode_actors"] = cfg.decode_actors
    if cfg.cpus_per_decode_actor is not None:
        settings["cpus_per_decode_actor"] = cfg.cpus_per_decode_actor
    try:
        return from_dict(DataConfig, settings, where="data")
    except ConfigError as err:
        raise ProtocolError(f"{where}: the protocol doesn't fit its data settings: {err}") from err


class ScoreViews:
    """Model actor: uint8 views in, per-view scores over the evaluated classes out."""

    def __init__(
        self,
        model_config: MorphMLPConfig,
        state_dict: list,  # [ObjectRef]: wrapped so Ray hands the ref over unresolved
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        outputs: tuple[int, ...],
        ensemble: str,
        threads: int,
    ):
        import ray
        import torch

        from morphmlp.models import create_model

        torch.set_num_threads(threads)  # the actor's CPU share: decode actors need the rest
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = create_model(model_config)
        model.load_state_dict(ray.get(state_dict[0]))
        self.model = model.eval().to(self.device)
        self.mean, self.std = mean, std
        self.outputs = torch.as_tensor(outputs, device=self.device)
        self.softmax = ensemble == "softmax"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from morphmlp.data.transforms import normalize

        clips = torch.from_numpy(batch["clip"]).to(self.device)
        if len(clips) == 0:  # every video of the decode batch was unreadable
            scores = np.zeros((0, len(self.outputs)), np.float32)
        else:
            with torch.inference_mode():
                out = self.model(normalize(clips, self.mean, self.std))[:, self.outputs]
                scores = (out.softmax(dim=1) if self.softmax else out).float().cpu().numpy()
        return {
            "video": batch["video"],
            "view": batch["view"],
            "label": batch["label"],
            "scores": scores,
        }


def score_views(
    index,
    data_cfg: DataConfig,
    ckpt: Checkpoint,
    label_map: LabelMap,
    protocol: Protocol,
    cfg: EvalConfig,
    *,
    bad_data=None,
) -> VideoScores:
    """Score every view of every readable video of `index` and average them per video.

    `index` holds only videos of shared classes; video ids in the result are its rows, labels
    are positions in `label_map.benchmark_labels`.
    """
    import ray

    from morphmlp.data.pipeline import build_eval_dataset

    views = build_eval_dataset(
        index, data_cfg, num_clips=protocol.clips, num_crops=protocol.crops, ledger=bad_data
    )
    kwargs = {
        "model_config": ckpt.model_config,
        "state_dict": [ray.put(ckpt.state_dict)],
        "mean": data_cfg.mean,
        "std": data_cfg.std,
        "outputs": tuple(label_map.model_outputs),
        "ensemble": protocol.ensemble,
        "threads": max(1, round(cfg.cpus_per_model_actor)),
    }
    parts = run_model_actors(
        views,
        ScoreViews,
        kwargs,
        cfg,
        total=len(index) * protocol.num_views,
        num_scores=label_map.num_shared,
    )
    # benchmark label -> position among the evaluated (shared) labels, which are ascending
    positions = np.searchsorted(np.asarray(label_map.benchmark_labels), parts["label"])
    return average_views(
        parts["video"], positions, parts["scores"], expected_views=protocol.num_views
    )


def run_model_actors(
    views,
    actor: type,
    kwargs: dict,
    cfg: EvalConfig,
    *,
    total: int,
    num_scores: int,
    cpu_only: bool = False,
) -> dict[str, np.ndarray]:
    """Views (build_eval_dataset) through a pool of model actors (`actor`: ScoreViews, or
    predict.ScoreExported for exported files, which run on CPU: `cpu_only`), gathered into
    video, label and scores (num_scores per view) columns, empty when no view could be made,
    with a progress line (and ETA) every 10 s."""
    import ray

    gpus = 0.0 if cpu_only else cfg.gpus_per_model_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    scored = views.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(
            min_size=cfg.model_actors[0], max_size=cfg.model_actors[1]
        ),
        num_cpus=cfg.cpus_per_model_actor,
        num_gpus=gpus,
    )
    parts: dict[str, list[np.ndarray]] = {"video": [], "label": [], "scores": []}
    done, started, last_log = 0, time.monotonic(), 0.0
    for batch in scored.iter_batches(batch_size=None, batch_format="numpy"):
        if len(batch["video"]) == 0:  # every video of the decode batch was unreadable
            continue
        for key in parts:
            parts[key].append(batch[key])
        done += len(batch["video"])
        now = time.monotonic()
        if now - last_log >= _PROGRESS_EVERY_S or done == total:
            rate = done / max(now - started, 1e-9)
            eta = format_duration((total - done) / rate)
            log.info("scored %d/%d views (%.1f views/s, ETA %s)", done, total, rate, eta)
            last_log = now
    if not parts["video"]:
        empty = np.zeros(0, np.int64)
        return {"video": empty, "label": empty, "scores": np.zeros((0, num_scores), np.float32)}
    return {key: np.concatenate(arrays) for key, arrays in parts.items()}
