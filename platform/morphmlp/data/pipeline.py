"""Ray Data pipelines: sample positions -> decode/augment in a CPU actor pool -> uint8 clips.

Training is a *sample schedule* over global positions p in [start_position, num_epochs *
samples_per_epoch): position p is slot j = p % samples_per_epoch of epoch e = p // samples_per_epoch
and reads row perm_e[j], perm_e being a permutation of the split's rows seeded by (seed, e).
Every random choice for that sample (temporal start, crop, flip, RandAugment) comes from an RNG
seeded by (seed, e, row). So a sample is the same whichever actor decodes it, and a run resumes
exactly mid-epoch by passing the position it had reached. This is the design's "read_parquet ->
seeded per-epoch shuffle" in a form that also resumes exactly: the index travels to the actors once
(ray.put) and the permutation is computed there, so no per-epoch shuffle of the data is needed.
The output keeps input order (preserve_order), so positions arrive in order.

A video that can't be read never fails an actor and never changes the number of samples: it is
recorded in the BadDataLedger and replaced by the next readable row of the same epoch's
permutation (PySlowFast also retries another index). Evaluation skips bad videos instead (and
records them), emitting num_clips x num_crops views of every readable one. Only bad data
(decode.BAD_DATA_ERRORS) is handled so: any other exception is a bug and fails the dataset.

Repeated augmentation (data.num_samples = N, the release's AUG.NUM_SAMPLE): a training position
is decoded once and yields N consecutive rows, the same video's frames with N crop / flip /
RandAugment draws (and N erasing draws on the worker), the same label and the same position.
Positions count VIDEOS, not clips: samples_per_epoch, the resume position, steps per epoch and
the LR scaling stay per video, and a training step sees batch_size x N clips, as PySlowFast's
multiple_samples_collate makes it (the worker iterates batches of batch_size x N rows; every
block holds whole videos, decode_batch_size x N rows, so a batch holds whole videos).

Output rows: clip uint8 (T, H, W, 3), label int64, and position int64 (train) or video int64 (row
in the split) + view int64 (clip_idx * num_crops + crop_idx) (eval). With data.augment_on
"worker", training clips leave the actors cropped and flipped but not RandAugmented: the worker
finishes them (transforms.prepare_clips).
"""

from __future__ import annotations

import functools
import logging
import math
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata

from morphmlp import storage
from morphmlp.data import schedule
from morphmlp.data.augment import train_augment, uniform_crops
from morphmlp.data.bad_data import BadDataLedger
from morphmlp.data.config import DataConfig
from morphmlp.data.decode import BAD_DATA_ERRORS, decode_clip, decode_frames
from morphmlp.data.errors import BadDataError
from morphmlp.data.index import VideoIndex
from morphmlp.data.probe import failure_record
from morphmlp.data.sampling import clip_indices
from morphmlp.errors import ConfigError

log = logging.getLogger(__name__)

_ACTOR_COLUMNS = ("uri", "label", "start_sec", "end_sec", "fps", "num_frames")


def build_train_dataset(
    index: VideoIndex,
    cfg: DataConfig,
    *,
    seed: int,
    num_epochs: int,
    samples_per_epoch: int,
    start_position: int = 0,
    global_batch: int | None = None,
    ledger: BadDataLedger | None = None,
) -> ray.data.Dataset:
    """Training clips for positions [start_position, num_epochs * samples_per_epoch), in order.

    With `global_batch`, each epoch stops where whole global batches do (data/schedule.py):
    training passes the split's size as samples_per_epoch and its global batch."""
    if not 1 <= samples_per_epoch <= len(index):
        raise ConfigError(
            f"samples_per_epoch {samples_per_epoch} must be in 1..{len(index)} (the split's rows)"
        )
    total = num_epochs * samples_per_epoch
    if not 0 <= start_position < total:
        raise ConfigError(f"start_position {start_position} must be in 0..{total - 1}")
    spans = (
        schedule.ranges(start_position, num_epochs, samples_per_epoch, global_batch)
        if global_batch
        else [(start_position, total)]
    )
    ds = _positions(spans, cfg.decode_batch_size).map_batches(
        TrainClips,
        fn_constructor_kwargs={
            "table": [_put_table(index)],
            "cfg": cfg,
            "seed": seed,
            "samples_per_epoch": samples_per_epoch,
            "ledger": ledger,
        },
        **_decode_options(cfg),
    )
    # Positions must come out in order so that "how many samples were consumed" is a position.
    ds.context.execution_options.preserve_order = True
    return ds


def build_eval_dataset(
    index: VideoIndex,
    cfg: DataConfig,
    *,
    num_clips: int,
    num_crops: int,
    ledger: BadDataLedger | None = None,
) -> ray.data.Dataset:
    """num_clips x num_crops test views of every readable video of `index` (no randomness)."""
    if num_clips < 1 or num_crops not in (1, 3):
        raise ConfigError(f"num_clips {num_clips} must be >= 1 and num_crops {num_crops} 1 or 3")
    return _positions([(0, len(index))], cfg.decode_batch_size).map_batches(
        EvalClips,
        fn_constructor_kwargs={
            "table": [_put_table(index)],
            "cfg": cfg,
            "num_clips": num_clips,
            "num_crops": num_crops,
            "ledger": ledger,
        },
        **_decode_options(cfg),
    )


class _Clips:
    """Shared by the decode actors: the index columns, window arithmetic, failure reporting."""

    def __init__(self, table: list[ray.ObjectRef], cfg: DataConfig, ledger: BadDataLedger | None):
        # The ref comes wrapped in a list so that Ray hands it over as is, not resolved.
        columns = ray.get(table[0])
        self.cfg = cfg
        self.uris = columns["uri"].to_pylist()
        self.labels = columns["label"].to_numpy()
        self.fps = columns["fps"].to_numpy()
        self.num_frames = columns["num_frames"].to_numpy()
        self.start_sec = columns["start_sec"].to_numpy(zero_copy_only=False)
        self.end_sec = columns["end_sec"].to_numpy(zero_copy_only=False)
        self.ledger = ledger
        self.bad_rows: set[int] = set()

    def window(self, row: int) -> tuple[int, int]:
        """(first frame, frame count) of the row's clip window (all of the video by default)."""
        fps, total = self.fps[row], int(self.num_frames[row])
        first = (
            0 if np.isnan(self.start_sec[row]) else min(round(self.start_sec[row] * fps), total - 1)
        )
        last = total if np.isnan(self.end_sec[row]) else min(round(self.end_sec[row] * fps), total)
        return first, max(last - first, 1)

    def report(self, seen: list[str], failures: list[dict]) -> None:
        if self.ledger is not None:
            self.ledger.add(seen, failures)  # the ledger logs each bad video once
            return
        for record in failures:
            log.warning(
                "skipping bad video %s: %s: %s", record["uri"], record["reason"], record["detail"]
            )

    def failure(self, row: int, err: Exception) -> dict:
        self.bad_rows.add(row)
        # Redacted like the seen list, so that the ledger counts a bad video once (and the report
        # that goes to MLflow carries no credentials).
        return {"uri": storage.redact(self.uris[row]), "row": row, **failure_record(err)}


class TrainClips(_Clips):
    def __init__(self, table, cfg, seed, samples_per_epoch, ledger=None):
        super().__init__(table, cfg, ledger)
        self.seed = seed
        self.samples_per_epoch = samples_per_epoch
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.uris)
            )
            if len(self._perms) > 2:  # an actor only straddles one epoch boundary at a time
                self._perms.popitem(last=False)
        return self._perms[epoch]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        clips, labels, seen, failures = [], [], [], []
        positions = batch["position"]
        for position in positions:
            epoch, slot = divmod(int(position), self.samples_per_epoch)
            perm = self.permutation(epoch)
            for attempt in range(len(perm)):
                row = int(perm[(slot + attempt) % len(perm)])
                if row in self.bad_rows:
                    continue
                seen.append(self.uris[row])
                try:
                    samples = self.sample(row, epoch)
                    break
                except BAD_DATA_ERRORS as err:  # bad data never crashes the actor; a bug does
                    failures.append(self.failure(row, err))
            else:
                self.report(seen, failures)
                raise BadDataError(f"none of the {len(perm)} videos of the split can be read")
            for clip, label in samples:
                clips.append(clip)
                labels.append(label)
        self.report(seen, failures)
        return {
            "clip": np.stack(clips),
            "label": np.asarray(labels, dtype=np.int64),
            # Every clip of a video carries the video's position: positions count videos.
            "position": np.repeat(np.asarray(positions, dtype=np.int64), self.cfg.num_samples),
        }

    def sample(self, row: int, epoch: int) -> list[tuple[np.ndarray, int]]:
        """The data.num_samples training clips of `row` in `epoch`, from one decode: a pure
        function of (seed, epoch, row).

        The frames (temporal sampling) are drawn once; each clip then draws its own crop, flip
        and RandAugment. Clip 0 continues the sample's RNG, so num_samples 1 gives the same bytes
        as before repeated augmentation existed; clip k > 0 uses an RNG seeded (seed, epoch, row,
        k), so every clip is reproducible on its own, whichever actor makes it.
        """
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, epoch, row])
        first, count = self.window(row)
        indices = clip_indices(cfg, count, self.fps[row], clip_idx=-1, num_clips=1, rng=rng)
        # Kept as decoded: each sample's crop is cut from the stored picture (augment.py).
        frames = decode_clip(self.uris[row], indices + first, threads=cfg.decode_threads)
        label = int(self.labels[row])
        return [
            train_augment(
                frames,
                label,
                cfg,
                rng if k == 0 else np.random.default_rng([self.seed, epoch, row, k]),
            )
            for k in range(cfg.num_samples)
        ]


class EvalClips(_Clips):
    def __init__(self, table, cfg, num_clips, num_crops, ledger=None):
        super().__init__(table, cfg, ledger)
        self.num_clips = num_clips
        self.num_crops = num_crops

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.cfg
        out: dict[str, list] = {"clip": [], "label": [], "video": [], "view": []}
        seen, failures = [], []
        for row in batch["position"].tolist():
            seen.append(self.uris[row])
            try:
                views = self.views(row)
            except BAD_DATA_ERRORS as err:  # skipped and reported; the evaluator reads the ledger
                failures.append(self.failure(row, err))
                continue
            for view, clip in enumerate(views):
                out["clip"].append(clip)
                out["label"].append(int(self.labels[row]))
                out["video"].append(row)
                out["view"].append(view)
        self.report(seen, failures)
        size = cfg.test_crop_size
        empty = np.zeros((0, cfg.num_frames, size, size, 3), np.uint8)
        return {
            "clip": np.stack(out["clip"]) if out["clip"] else empty,
            "label": np.asarray(out["label"], dtype=np.int64),
            "video": np.asarray(out["video"], dtype=np.int64),
            "view": np.asarray(out["view"], dtype=np.int64),
        }

    def views(self, row: int) -> list[np.ndarray]:
        """All test views of a video from one decoding pass over the union of their frames."""
        cfg = self.cfg
        first, count = self.window(row)
        per_clip = [
            clip_indices(cfg, count, self.fps[row], clip_idx=k, num_clips=self.num_clips)
            for k in range(self.num_clips)
        ]
        frames = decode_frames(
            self.uris[row],
            np.concatenate(per_clip) + first,
            short_side=cfg.test_short_side(self.num_crops),
            threads=cfg.decode_threads,
        )
        views = []
        for clip in np.split(frames, self.num_clips):
            views.extend(uniform_crops(clip, cfg.test_crop_size, self.num_crops))
        return views


# Read tasks only count: they take no CPU, so they never wait for one a trainer or a decode
# actor holds (with a CPU of their own they could deadlock a one-CPU cluster); one at a time,
# since Ray would otherwise start a worker process for each of the many zero-CPU tasks.
_POSITION_READ_CPUS = 0.0
_POSITION_READ_CONCURRENCY = 1
# Cap on read tasks (each one a small block): beyond it blocks grow instead. One block per task:
# Ray Data merges the blocks one read task returns (up to target_max_block_size), and a merged
# block goes to one actor whole. Blocks put by the driver instead (from_arrow, no read tasks)
# measured 3x slower here: Ray Data's iteration stats then walk every block each update.
_MAX_POSITION_BLOCKS = 50_000


def _positions(spans: list[tuple[int, int]], batch_size: int) -> ray.data.Dataset:
    """A dataset of the integers in the [low, high) spans, in column "position", in small blocks.

    An actor task takes whole input blocks, so small blocks are what spreads the work over the
    decode actors and keeps ordered output flowing. (ray.data.range makes a few large blocks,
    and its read tasks want a whole CPU, which a trainer may be holding.)
    """
    count = sum(high - low for low, high in spans)
    rows = batch_size * max(1, math.ceil(count / (batch_size * _MAX_POSITION_BLOCKS)))
    source = _PositionsDatasource(spans, rows)
    return ray.data.read_datasource(
        source,
        num_cpus=_POSITION_READ_CPUS,
        concurrency=_POSITION_READ_CONCURRENCY,
        override_num_blocks=len(source.blocks()),
    )


class _PositionsDatasource(ray.data.Datasource):
    def __init__(self, spans: list[tuple[int, int]], rows_per_block: int):
        super().__init__()
        self.spans, self.rows_per_block = spans, rows_per_block

    def blocks(self) -> list[tuple[int, int]]:
        return [
            (low, min(low + self.rows_per_block, high))
            for start, high in self.spans
            for low in range(start, high, self.rows_per_block)
        ]

    def estimate_inmemory_data_size(self) -> int:
        return 8 * sum(high - low for low, high in self.spans)

    def get_read_tasks(self, parallelism: int, **_) -> list[ray.data.ReadTask]:
        tasks = []
        for low, high in self.blocks():
            metadata = BlockMetadata(
                num_rows=high - low, size_bytes=8 * (high - low), input_files=None, exec_stats=None
            )
            tasks.append(ray.data.ReadTask(functools.partial(_block, low, high), metadata))
        return tasks


def _block(low: int, high: int) -> list[pa.Table]:
    return [pa.table({"position": np.arange(low, high, dtype=np.int64)})]


def _put_table(index: VideoIndex) -> ray.ObjectRef:
    """The columns the actors need, in the object store once (not copied into every task)."""
    return ray.put(index.table.select(list(_ACTOR_COLUMNS)))


def _decode_options(cfg: DataConfig) -> dict:
    low, high = cfg.decode_actors
    options = {
        "batch_size": cfg.decode_batch_size,
        "batch_format": "numpy",
        "compute": ray.data.ActorPoolStrategy(min_size=low, max_size=high),
        "num_cpus": cfg.cpus_per_decode_actor,
    }
    if cfg.decode_resource is not None:
        # One unit per decode CPU: the cluster configs give each node as many units as the cores
        # decoding may take there, so actors keep off the Train workers' cores.
        options["resources"] = {cfg.decode_resource: cfg.cpus_per_decode_actor}
        if cfg.decode_resource not in ray.cluster_resources():
            # Not an error: an autoscaler may still be bringing the decode nodes up.
            log.warning(
                "data.decode_resource %r: no node offers it yet; decode actors wait until one "
                "joins (cluster resources now: %s)",
                cfg.decode_resource,
                sorted(ray.cluster_resources()),
            )
    return options
