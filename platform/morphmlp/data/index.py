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

This module is the schema and its reading and writing. `builders` turns dataset annotations
(Kinetics CSV, SSv2 JSON, class folders) into a candidate table (CANDIDATE_COLUMNS) and class
names; `probe` probes the candidates on Ray and writes the index and a rejects file.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from morphmlp import storage
from morphmlp.data.errors import IndexSchemaError

INDEX_VERSION = "1"
CLASS_NAMES_KEY = b"morphmlp.class_names"
VERSION_KEY = b"morphmlp.index_version"

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
COLUMN_TYPES: dict[str, pa.DataType] = {name: spec[0] for name, spec in _COLUMNS.items()}
_OPTIONAL = ("start_sec", "end_sec")
CANDIDATE_COLUMNS = ("uri", "label", "split", "start_sec", "end_sec")
PROBED_COLUMNS = ("duration_sec", "fps", "num_frames", "width", "height", "codec")
# Rejects of probing and the training run's bad-data report share one layout.
REJECTS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),  # redacted (storage.redact): the file may end up in MLflow
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
    metadata = {
        CLASS_NAMES_KEY: json.dumps(list(class_names)).encode(),
        VERSION_KEY: INDEX_VERSION.encode(),
    }
    table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


def write_rejects(rejects: pa.Table, uri: str) -> None:
    """A rejects/bad-data table as CSV (uri ends in .csv) or Parquet."""
    buffer = io.BytesIO()
    if uri.endswith(".csv"):
        pacsv.write_csv(rejects, buffer)
    else:
        pq.write_table(rejects, buffer)
    storage.write_bytes_atomic(uri, buffer.getvalue())


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
