"""Probing on Ray: every candidate video is opened and its first frame decoded in parallel tasks;
those that probe fine become index rows (with the probed columns), the others rejects.

`prepare_index` probes, then writes the index and the rejects file next to it. `failure_record`
is the reason / error_type / detail of a rejects row, shared with the training run's bad-data
report. Only bad data (decode.BAD_DATA_ERRORS) becomes a reject: any other exception is a bug in
the code and fails the probe with its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Sequence

import av
import pyarrow as pa

from morphmlp import storage
from morphmlp.data.decode import BAD_DATA_ERRORS, probe_video
from morphmlp.data.errors import IndexSchemaError, VideoDecodeError
from morphmlp.data.index import (
    COLUMN_TYPES,
    PROBED_COLUMNS,
    REJECTS_SCHEMA,
    VideoIndex,
    write_index,
    write_rejects,
)

log = logging.getLogger(__name__)


def probe_videos(
    candidates: pa.Table, *, chunk_size: int = 16, num_cpus: float = 1.0
) -> tuple[pa.Table, pa.Table]:
    """Probe every candidate's video in parallel Ray tasks, logging progress with an ETA.

    Returns (the candidates that probed fine, with the probed columns added; rejects with uri,
    row (in `candidates`), reason and error).
    """
    import ray

    uris = candidates["uri"].to_pylist()
    probe = ray.remote(num_cpus=num_cpus)(_probe_chunk)
    pending = [
        probe.remote(
            list(range(start, min(start + chunk_size, len(uris)))), uris[start : start + chunk_size]
        )
        for start in range(0, len(uris), chunk_size)
    ]
    results: dict[int, dict] = {}
    rejects: list[dict] = []
    started = last_log = time.monotonic()
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=5.0)
        for chunk in ray.get(done):
            for row, outcome in chunk:
                if "reason" in outcome:
                    rejects.append({"uri": storage.redact(uris[row]), "row": row, **outcome})
                else:
                    results[row] = outcome
        finished = len(results) + len(rejects)
        now = time.monotonic()
        if now - last_log >= 5.0 or not pending:
            rate = finished / max(now - started, 1e-9)
            eta = (len(uris) - finished) / rate if rate else float("inf")
            log.info(
                "probed %d/%d videos (%d rejected), %.1f/s, ETA %s",
                finished,
                len(uris),
                len(rejects),
                rate,
                format_duration(eta),
            )
            last_log = now
    keep = sorted(results)
    probed = candidates.take(pa.array(keep, pa.int64()))
    for name in PROBED_COLUMNS:
        values = [results[r][name] for r in keep]
        probed = probed.append_column(name, pa.array(values, COLUMN_TYPES[name]))
    rejects.sort(key=lambda r: r["row"])
    return probed, pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA)


def prepare_index(
    candidates: pa.Table,
    class_names: Sequence[str],
    out_uri: str,
    *,
    rejects_uri: str | None = None,
    num_cpus: float = 1.0,
) -> VideoIndex:
    """Probe the candidates, write the index to out_uri and the rejects (CSV) next to it."""
    probed, rejects = probe_videos(candidates, num_cpus=num_cpus)
    if probed.num_rows == 0:
        raise IndexSchemaError(
            f"none of the {candidates.num_rows} videos could be read; first rejects: "
            f"{rejects.slice(0, 3).to_pylist()}"
        )
    index = VideoIndex(probed, list(class_names), out_uri, storage.parent(out_uri))
    write_index(index, None, out_uri)
    rejects_uri = rejects_uri or _sibling(out_uri, ".rejects.csv")
    write_rejects(rejects, rejects_uri)
    log.info(
        "wrote %s: %d videos in %s, %d classes; %d rejected -> %s",
        storage.redact(out_uri),
        probed.num_rows,
        dict(sorted(Counter(probed["split"].to_pylist()).items())),
        len(class_names),
        rejects.num_rows,
        storage.redact(rejects_uri),
    )
    return index


def _probe_chunk(rows: list[int], uris: list[str]) -> list[tuple[int, dict]]:
    out = []
    for row, uri in zip(rows, uris, strict=True):
        try:
            out.append((row, dataclasses.asdict(probe_video(uri))))
        except BAD_DATA_ERRORS as err:  # one bad file must not fail the whole probe (a bug must)
            out.append((row, failure_record(err)))
    return out


def failure_record(err: Exception) -> dict:
    """reason / error_type / detail columns of a rejects or bad-data row (err: BAD_DATA_ERRORS)."""
    if isinstance(err, VideoDecodeError):
        return {"reason": err.reason, "error_type": type(err).__name__, "detail": err.detail}
    # Not classified by decode.py: an FFmpeg error is the stream's, anything else the storage's.
    reason = "unreadable_stream" if isinstance(err, av.error.FFmpegError) else "io_error"
    return {"reason": reason, "error_type": type(err).__name__, "detail": storage.redact(str(err))}


# ---------------------------------------------------------------------------------------------
# helpers


def _sibling(uri: str, suffix: str) -> str:
    base = uri[: -len(".parquet")] if uri.endswith(".parquet") else uri
    return base + suffix


def format_duration(seconds: float) -> str:
    """An ETA for progress lines: 1h02m, 3m05s, ? (unknown)."""
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
