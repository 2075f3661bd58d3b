"""The video index: one Parquet row per sample, class names in the file's key-value metadata.

Columns (README "Index schema"):
  uri           string   video URI, absolute or relative to the index file's folder
  label         int64    class index, 0 <= label < len(class_names)
  split         string   "train", "val", "test", ...
  start_sec     float64  optional, nullable: clip window inside a longer video (Kinetics raw)
  end_sec       float64  optional, nullable
  duration_sec  float64  probed: stream duration
  fps           float64  probed: average frame rate
  num_frames    int64    probed: frames in the stream (counted from packets when the header has none)
  width, height int32    probed: stored frame size
  codec         string   probed: FFmpeg decoder name (h264, vp9, ...)
Metadata: b"morphmlp.class_names" = JSON list of names (index = label), b"morphmlp.index_version".

Builders turn dataset annotations (Kinetics CSV, SSv2 JSON, class folders) into a candidate table
(uri, label, split, start_sec, end_sec) and class names; `probe_videos` probes every candidate on
Ray in parallel and splits them into probed rows and rejects; `prepare_index` does both and writes
the index and a rejects file.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import posixpath
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from morphmlp import storage
from morphmlp.data.errors import IndexSchemaError, VideoDecodeError

log = logging.getLogger(__name__)

INDEX_VERSION = "1"
CLASS_NAMES_KEY = b"morphmlp.class_names"
VERSION_KEY = b"morphmlp.index_version"
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")

# column -> (canonical type, kind accepted on read, nullable)
_COLUMNS: dict[str, tuple[pa.DataType, str, bool]] = {
    "uri": (pa.string(), "string", False),
    "label": (pa.int64(), "integer", False),
    "split": (pa.string(), "string", False),
    "start_sec": (pa.float64(), "number", True),
    "end_sec": (pa.float64(), "number", True),
    "duration_sec": (pa.float64(), "number", False),
    "fps": (pa.float64(), "number", False),
    "num_frames": (pa.int64(), "integer", False),
    "width": (pa.int32(), "integer", False),
    "height": (pa.int32(), "integer", False),
    "codec": (pa.string(), "string", False),
}
_OPTIONAL = ("start_sec", "end_sec")
CANDIDATE_COLUMNS = ("uri", "label", "split", "start_sec", "end_sec")
PROBED_COLUMNS = ("duration_sec", "fps", "num_frames", "width", "height", "codec")
# Rejects of probing and the training run's bad-data report share one layout.
REJECTS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("row", pa.int64()),
        ("reason", pa.string()),  # one of VideoDecodeError.REASONS
        ("error_type", pa.string()),
        ("detail", pa.string()),
    ]
)


@dataclass
class VideoIndex:
    """A validated index in memory: URIs resolved to absolute, columns in canonical types."""

    table: pa.Table
    class_names: list[str]
    uri: str = ""  # where it was read from ("" if built in memory)
    _base: str = field(default="", repr=False)  # folder relative URIs were resolved against

    def __post_init__(self) -> None:
        self.table = validate_table(self.table, self.class_names, where=self.uri or "index")

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> VideoIndex:
        """The rows of one split (same class names, same source)."""
        rows = self.table.filter(pc.equal(self.table["split"], name))
        if rows.num_rows == 0:
            available = sorted(set(self.table["split"].to_pylist()))
            raise IndexSchemaError(
                f"{self.uri or 'index'}: no rows in split {name!r}; splits present: {available}"
            )
        return VideoIndex(rows, list(self.class_names), self.uri, self._base)

    def content_hash(self) -> str:
        """sha256 of the class names and every row (URIs relative to the index's folder, so a
        dataset copied elsewhere keeps its hash)."""
        digest = hashlib.sha256(json.dumps(self.class_names).encode())
        for name in _COLUMNS:
            if name not in self.table.column_names:
                continue
            values = self.table[name].to_pylist()
            if name == "uri" and self._base:
                prefix = self._base.rstrip("/") + "/"
                values = [v[len(prefix) :] if v.startswith(prefix) else v for v in values]
            digest.update(name.encode())
            digest.update(json.dumps(values).encode())
        return digest.hexdigest()


def validate_table(table: pa.Table, class_names: Sequence[str], *, where: str) -> pa.Table:
    """Check columns, types, nulls and values; return the table in canonical column types."""
    if not class_names:
        raise IndexSchemaError(f"{where}: no class names")
    columns = {}
    for name, (dtype, kind, nullable) in _COLUMNS.items():
        if name not in table.column_names:
            if name in _OPTIONAL:
                columns[name] = pa.nulls(table.num_rows, dtype)
                continue
            raise IndexSchemaError(
                f"{where}: missing required column {name!r} ({kind}); columns present: "
                f"{', '.join(table.column_names)}"
            )
        column = table[name]
        if not _is_kind(column.type, kind):
            raise IndexSchemaError(
                f"{where}: column {name!r} has type {column.type}, expected {kind}"
            )
        if not nullable and column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            raise IndexSchemaError(f"{where}: column {name!r} has a null value at row {row}")
        columns[name] = column.cast(dtype)
    table = pa.table(columns)
    _check_range(table, "label", 0, len(class_names) - 1, where, f"{len(class_names)} classes")
    _check_range(table, "num_frames", 1, None, where, "a video needs frames")
    if pc.any(pc.less_equal(table["fps"], 0)).as_py():
        row = pc.index(pc.less_equal(table["fps"], 0), True).as_py()
        raise IndexSchemaError(
            f"{where}: column 'fps' row {row}: value {table['fps'][row].as_py()} must be > 0"
        )
    bad_window = pc.fill_null(pc.greater_equal(table["start_sec"], table["end_sec"]), False)
    if pc.any(bad_window).as_py():
        row = pc.index(bad_window, True).as_py()
        raise IndexSchemaError(
            f"{where}: row {row}: start_sec {table['start_sec'][row].as_py()} is not before "
            f"end_sec {table['end_sec'][row].as_py()}"
        )
    return table


def read_index(uri: str) -> VideoIndex:
    """Read and validate an index; relative video URIs resolve against the index's folder."""
    try:
        parquet = pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri)))
        table = parquet.read()
    except (pa.ArrowInvalid, OSError) as err:
        raise IndexSchemaError(
            f"{storage.redact(uri)}: not a readable Parquet file ({err})"
        ) from err
    metadata = parquet.schema_arrow.metadata or {}
    if CLASS_NAMES_KEY not in metadata:
        raise IndexSchemaError(
            f"{storage.redact(uri)}: no class names (Parquet key-value metadata "
            f"{CLASS_NAMES_KEY.decode()!r}); write the index with write_index / prepare_data.py"
        )
    class_names = json.loads(metadata[CLASS_NAMES_KEY])
    base = storage.parent(uri)
    if "uri" in table.column_names and _is_kind(table["uri"].type, "string"):
        resolved = [
            None if u is None else storage.resolve_relative(u, base)
            for u in table["uri"].to_pylist()
        ]
        table = table.set_column(
            table.column_names.index("uri"), "uri", pa.array(resolved, pa.string())
        )
    return VideoIndex(table, class_names, uri, base)


def write_index(
    index_or_table: VideoIndex | pa.Table, class_names: Sequence[str] | None, uri: str
) -> None:
    """Validate and write an index; video URIs under the index's folder are stored relative."""
    if isinstance(index_or_table, VideoIndex):
        table = index_or_table.table
        class_names = class_names or index_or_table.class_names
    else:
        table = validate_table(index_or_table, class_names or [], where=storage.redact(uri))
    prefix = storage.parent(uri).rstrip("/") + "/"
    stored = [u[len(prefix) :] if u.startswith(prefix) else u for u in table["uri"].to_pylist()]
    table = table.set_column(table.column_names.index("uri"), "uri", pa.array(stored, pa.string()))
    metadata = {CLASS_NAMES_KEY: json.dumps(list(class_names)).encode(), VERSION_KEY: b"1"}
    table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


# ---------------------------------------------------------------------------------------------
# Builders: annotations -> candidate table (uri, label, split, start_sec, end_sec) + class names


def build_index_from_kinetics_csv(
    csv_uris: Sequence[str],
    video_root: str,
    *,
    class_names: Sequence[str] | None = None,
    split: str | None = None,
) -> tuple[pa.Table, list[str]]:
    """Kinetics CSVs in either form:

    - the release's `path,label` (no header; label an integer; split from `split` or the file
      name train/val/test.csv; class names from `class_names` or "0".."N-1");
    - the official `label,youtube_id,time_start,time_end,split` (header; label a class name;
      class names sorted, the usual Kinetics indexing, unless given). A trimmed clip
      `<youtube_id>_<start:06d>_<end:06d>.<ext>` anywhere under video_root is used whole; else a
      full video `<youtube_id>.<ext>` is used with the window [time_start, time_end].
    """
    video_root = _absolute(video_root)
    rows: list[dict] = []
    official: list[tuple[str, dict]] = []
    for csv_uri in csv_uris:
        text = storage.read_bytes(csv_uri).decode("utf-8")
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            raise IndexSchemaError(f"{storage.redact(csv_uri)}: empty CSV")
        if "youtube_id" in lines[0]:
            reader = csv.DictReader(lines)
            missing = {"label", "youtube_id", "time_start", "time_end"} - set(reader.fieldnames)
            if missing:
                raise IndexSchemaError(
                    f"{storage.redact(csv_uri)}: missing column(s) {sorted(missing)} in the "
                    "header; expected label,youtube_id,time_start,time_end,split"
                )
            official += [(f"{storage.redact(csv_uri)}:{n + 2}", r) for n, r in enumerate(reader)]
        else:
            rows += _release_csv_rows(csv_uri, lines, video_root, split)
    if official:
        names = list(class_names) if class_names else sorted({r["label"] for _, r in official})
        rows += _official_csv_rows(official, names, video_root, split)
    elif class_names:
        names = list(class_names)
    else:
        names = [str(i) for i in range(max(r["label"] for r in rows) + 1)]
    for row in rows:
        if not 0 <= row["label"] < len(names):
            raise IndexSchemaError(
                f"label {row['label']} of {row['uri']} is outside the {len(names)} classes"
            )
    return _candidates(rows), names


def build_index_from_ssv2(
    annotation_uris: Sequence[str],
    labels_uri: str,
    video_root: str,
    *,
    split: str | None = None,
    extension: str = ".webm",
) -> tuple[pa.Table, list[str]]:
    """Something-Something V2: annotation JSON lists ({"id", "template", ...}) and the labels JSON
    ({template: "index"}); videos are <video_root>/<id>.webm. The template's [brackets] are
    dropped to find its label, as the release does. Split from `split` or the file name
    (something-something-v2-train / -validation / -test.json)."""
    video_root = _absolute(video_root)
    labels = _load_json(labels_uri)
    if not isinstance(labels, dict):
        raise IndexSchemaError(
            f"{storage.redact(labels_uri)}: expected a JSON object template->index"
        )
    names = [name for name, _ in sorted(labels.items(), key=lambda kv: int(kv[1]))]
    rows = []
    for annotation_uri in annotation_uris:
        entries = _load_json(annotation_uri)
        where = storage.redact(annotation_uri)
        if not isinstance(entries, list):
            raise IndexSchemaError(f"{where}: expected a JSON list of annotations")
        entry_split = split or _split_from_name(annotation_uri)
        for n, entry in enumerate(entries):
            if "id" not in entry or "template" not in entry:
                raise IndexSchemaError(
                    f"{where}: entry {n} lacks 'id' or 'template' (test annotations have no "
                    "labels and can't be indexed for training or evaluation)"
                )
            template = entry["template"].replace("[", "").replace("]", "")
            if template not in labels:
                raise IndexSchemaError(
                    f"{where}: entry {n} (id {entry['id']}): template {template!r} is not in "
                    f"{storage.redact(labels_uri)}"
                )
            rows.append(
                {
                    "uri": storage.join(video_root, f"{entry['id']}{extension}"),
                    "label": int(labels[template]),
                    "split": entry_split,
                }
            )
    return _candidates(rows), names


def build_index_from_folder(root: str, *, split: str | None = None) -> tuple[pa.Table, list[str]]:
    """root/<class>/<video> (all rows in `split`, default "train") or
    root/<split>/<class>/<video> when every top-level folder is train/val/validation/test.
    Class names are the sorted class folder names."""
    root = _absolute(root)
    files = _list_videos(root)
    relative = [_relative_parts(uri, root) for uri in files]
    top = {parts[0] for parts in relative if len(parts) > 1}
    by_split = bool(top) and top <= {"train", "val", "validation", "test"}
    rows = []
    for uri, parts in zip(files, relative, strict=True):
        depth = 3 if by_split else 2
        if len(parts) != depth:
            continue  # files outside the class folders are not samples
        row_split = _normalise_split(parts[0]) if by_split else (split or "train")
        rows.append({"uri": uri, "class": parts[-2], "split": row_split})
    if not rows:
        layout = "<class>/<video> or <split>/<class>/<video>"
        raise IndexSchemaError(f"{storage.redact(root)}: no videos found in the layout {layout}")
    names = sorted({r["class"] for r in rows})
    lookup = {name: i for i, name in enumerate(names)}
    for row in rows:
        row["label"] = lookup[row.pop("class")]
    return _candidates(rows), names


def load_class_names(uri: str) -> list[str]:
    """Class names from a JSON list, a JSON {name: index} object, or a text file (one per line)."""
    text = storage.read_bytes(uri).decode("utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return data
    if isinstance(data, dict):
        return [name for name, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
    raise IndexSchemaError(
        f"{storage.redact(uri)}: expected a JSON list of names or a {{name: index}} object"
    )


# ---------------------------------------------------------------------------------------------
# Probing on Ray


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
                _duration(eta),
            )
            last_log = now
    keep = sorted(results)
    probed = candidates.take(pa.array(keep, pa.int64()))
    for name in PROBED_COLUMNS:
        dtype = _COLUMNS[name][0]
        probed = probed.append_column(name, pa.array([results[r][name] for r in keep], dtype))
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


def write_rejects(rejects: pa.Table, uri: str) -> None:
    """A rejects/bad-data table as CSV (uri ends in .csv) or Parquet."""
    buffer = io.BytesIO()
    if uri.endswith(".csv"):
        pacsv.write_csv(rejects, buffer)
    else:
        pq.write_table(rejects, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


def _probe_chunk(rows: list[int], uris: list[str]) -> list[tuple[int, dict]]:
    from morphmlp.data.decode import probe_video

    out = []
    for row, uri in zip(rows, uris, strict=True):
        try:
            out.append((row, dataclasses.asdict(probe_video(uri))))
        except Exception as err:  # one bad file must not fail the whole probe
            out.append((row, failure_record(err)))
    return out


def failure_record(err: Exception) -> dict:
    """reason / error_type / detail columns of a rejects or bad-data row."""
    if isinstance(err, VideoDecodeError):
        return {"reason": err.reason, "error_type": type(err).__name__, "detail": err.detail}
    # Not a classified decode failure (a PyAV or numpy error we didn't foresee): still bad data.
    return {"reason": "unreadable_stream", "error_type": type(err).__name__, "detail": str(err)}


# ---------------------------------------------------------------------------------------------
# helpers


def _is_kind(dtype: pa.DataType, kind: str) -> bool:
    if kind == "string":
        return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)
    if kind == "integer":
        return pa.types.is_integer(dtype)
    return pa.types.is_integer(dtype) or pa.types.is_floating(dtype) or pa.types.is_null(dtype)


def _check_range(table, name, low, high, where, why) -> None:
    column = table[name]
    bad = pc.less(column, low)
    if high is not None:
        bad = pc.or_(bad, pc.greater(column, high))
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise IndexSchemaError(
            f"{where}: column {name!r} row {row}: value {column[row].as_py()} is outside "
            f"{allowed} ({why})"
        )


def _candidates(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "uri": pa.array([r["uri"] for r in rows], pa.string()),
            "label": pa.array([r["label"] for r in rows], pa.int64()),
            "split": pa.array([r["split"] for r in rows], pa.string()),
            "start_sec": pa.array([r.get("start_sec") for r in rows], pa.float64()),
            "end_sec": pa.array([r.get("end_sec") for r in rows], pa.float64()),
        }
    )


def _release_csv_rows(csv_uri, lines, video_root, split) -> list[dict]:
    where = storage.redact(csv_uri)
    row_split = split or _split_from_name(csv_uri)
    rows = []
    for n, line in enumerate(lines, start=1):
        parts = line.rsplit(",", 1) if "," in line else line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].strip().lstrip("-").isdigit():
            raise IndexSchemaError(
                f"{where}: line {n}: {line!r} is not 'path,label' with an integer label "
                "(or an official Kinetics CSV with a label,youtube_id,... header)"
            )
        path, label = parts[0].strip(), int(parts[1])
        rows.append(
            {"uri": storage.resolve_relative(path, video_root), "label": label, "split": row_split}
        )
    return rows


def _official_csv_rows(official, names, video_root, split) -> list[dict]:
    lookup = {name: i for i, name in enumerate(names)}
    stems = {}
    for uri in _list_videos(video_root):
        stems.setdefault(os.path.splitext(posixpath.basename(uri))[0], uri)
    rows = []
    for where, record in official:
        label = record["label"]
        if label not in lookup:
            raise IndexSchemaError(f"{where}: label {label!r} is not one of the class names")
        try:
            start, end = int(float(record["time_start"])), int(float(record["time_end"]))
        except ValueError as err:
            raise IndexSchemaError(
                f"{where}: time_start/time_end {record['time_start']!r}/{record['time_end']!r} "
                "are not numbers"
            ) from err
        trimmed = f"{record['youtube_id']}_{start:06d}_{end:06d}"
        row = {
            "label": lookup[label],
            "split": split or _normalise_split(record.get("split") or "train"),
        }
        if trimmed in stems:
            row["uri"] = stems[trimmed]
        elif record["youtube_id"] in stems:
            row.update(uri=stems[record["youtube_id"]], start_sec=float(start), end_sec=float(end))
        else:
            row["uri"] = storage.join(video_root, f"{trimmed}.mp4")  # probing reports it missing
        rows.append(row)
    return rows


def _list_videos(root: str) -> list[str]:
    fs, path = storage.resolve(root)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except (FileNotFoundError, OSError) as err:
        raise IndexSchemaError(
            f"{storage.redact(root)}: can't list the video folder ({err})"
        ) from err
    return sorted(
        storage.join(root, info.path[len(path) :].lstrip("/"))
        for info in infos
        if info.type == pafs.FileType.File and info.path.lower().endswith(VIDEO_EXTENSIONS)
    )


def _absolute(root: str) -> str:
    return root if storage.is_uri(root) else os.path.abspath(os.path.expanduser(root))


def _relative_parts(uri: str, root: str) -> list[str]:
    return uri[len(root.rstrip("/")) :].strip("/").replace(os.sep, "/").split("/")


def _split_from_name(uri: str) -> str:
    stem = posixpath.basename(uri).lower()
    for key in ("train", "validation", "val", "test"):
        if key in stem:
            return _normalise_split(key)
    raise IndexSchemaError(
        f"{storage.redact(uri)}: can't tell the split from the file name; pass it explicitly "
        "(--split train|val|test)"
    )


def _normalise_split(name: str) -> str:
    return {"validate": "val", "validation": "val"}.get(name, name)


def _load_json(uri: str):
    try:
        return json.loads(storage.read_bytes(uri))
    except json.JSONDecodeError as err:
        raise IndexSchemaError(f"{storage.redact(uri)}: not valid JSON ({err})") from err


def _sibling(uri: str, suffix: str) -> str:
    base = uri[: -len(".parquet")] if uri.endswith(".parquet") else uri
    return base + suffix


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
