"""Builders: dataset annotations -> a candidate table (index.CANDIDATE_COLUMNS: uri, label,
split, start_sec, end_sec) and class names, ready for probing (`probe.prepare_index`).

Kinetics CSVs (the release's `path,label` and the official `label,youtube_id,...`),
Something-Something V2 annotation JSON, and `<split>/<class>/<video>` folders.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.fs as pafs

from morphmlp import storage
from morphmlp.data.errors import IndexSchemaError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


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
# helpers


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
