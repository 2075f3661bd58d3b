"""The Parquet index: schema checks naming the column, round trip with class names and relative
URIs, content hash, every builder on small fixtures, probing on Ray, and prepare_data.py end to
end against moto's S3 server."""

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from support import error_lines

from morphmlp import storage
from morphmlp.data import probe
from morphmlp.data.builders import (
    build_index_from_folder,
    build_index_from_kinetics_csv,
    build_index_from_ssv2,
)
from morphmlp.data.errors import IndexSchemaError
from morphmlp.data.index import VideoIndex, read_index, write_index
from morphmlp.data.probe import probe_videos

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(uri="a.mp4", label=0, split="train", **extra):
    row = {
        "uri": uri,
        "label": label,
        "split": split,
        "duration_sec": 2.0,
        "fps": 25.0,
        "num_frames": 50,
        "width": 96,
        "height": 64,
        "codec": "h264",
    }
    row.update(extra)
    return row


def test_round_trip_keeps_class_names_and_stores_relative_uris(tmp_path):
    folder = tmp_path / "data"
    rows = [_row(str(folder / "v" / "a.mp4")), _row("s3://bucket/b.mp4", 1, "val")]
    index_uri = str(folder / "index.parquet")
    write_index(pa.Table.from_pylist(rows), ["cat", "dog"], index_uri)
    stored = pq.read_table(index_uri)
    assert stored["uri"].to_pylist() == ["v/a.mp4", "s3://bucket/b.mp4"]
    assert json.loads(stored.schema.metadata[b"morphmlp.class_names"]) == ["cat", "dog"]
    index = read_index(index_uri)
    assert index.class_names == ["cat", "dog"] and index.num_classes == 2
    assert index.table["uri"].to_pylist() == [rows[0]["uri"], "s3://bucket/b.mp4"]
    assert index.table["start_sec"].null_count == 2  # optional columns filled in
    assert len(index.split("val")) == 1
    with pytest.raises(IndexSchemaError, match=r"no rows in split 'test'.*\['train', 'val'\]"):
        index.split("test")


def test_content_hash_follows_the_rows_not_the_location(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    write_index(
        pa.Table.from_pylist([_row(str(here / "a.mp4"))]), ["x", "y"], str(here / "i.parquet")
    )
    shutil.copytree(here, there)
    digest = read_index(str(here / "i.parquet")).content_hash()
    assert read_index(str(there / "i.parquet")).content_hash() == digest
    write_index(
        pa.Table.from_pylist([_row(str(there / "a.mp4"), 1)]), ["x", "y"], str(there / "i.parquet")
    )
    assert read_index(str(there / "i.parquet")).content_hash() != digest


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.drop_columns(["label"]), r"missing required column 'label'"),
        (lambda t: t.drop_columns(["num_frames"]), r"missing required column 'num_frames'"),
        (
            lambda t: t.set_column(1, "label", pa.array(["0", "1"])),
            r"column 'label' has type string, expected integer",
        ),
        (
            lambda t: t.set_column(0, "uri", pa.array([1, 2])),
            r"column 'uri' has type int64, expected string",
        ),
        (
            lambda t: t.set_column(2, "split", pa.array(["train", None])),
            r"column 'split' has a null value at row 1",
        ),
        (
            lambda t: t.set_column(1, "label", pa.array([0, 7])),
            r"column 'label' row 1: value 7 is outside 0..1 \(2 classes\)",
        ),
        (
            lambda t: t.set_column(t.column_names.index("fps"), "fps", pa.array([25.0, 0.0])),
            r"column 'fps' row 1: value 0.0 must be > 0",
        ),
    ],
)
def test_schema_errors_name_the_column(tmp_path, change, message):
    table = change(pa.Table.from_pylist([_row("a.mp4"), _row("b.mp4", 1)]))
    pq.write_table(
        table.replace_schema_metadata({b"morphmlp.class_names": b'["x", "y"]'}),
        tmp_path / "index.parquet",
    )
    with pytest.raises(IndexSchemaError, match=message):
        read_index(str(tmp_path / "index.parquet"))


def test_index_without_class_names_or_not_parquet_fails_clearly(tmp_path):
    pq.write_table(pa.Table.from_pylist([_row()]), tmp_path / "bare.parquet")
    with pytest.raises(IndexSchemaError, match="no class names"):
        read_index(str(tmp_path / "bare.parquet"))
    (tmp_path / "text.parquet").write_text("uri,label\n")
    with pytest.raises(IndexSchemaError, match="not a readable Parquet file"):
        read_index(str(tmp_path / "text.parquet"))


def test_window_must_be_ordered():
    with pytest.raises(IndexSchemaError, match=r"row 0: start_sec 5.0 is not before end_sec 2.0"):
        VideoIndex(pa.Table.from_pylist([_row(start_sec=5.0, end_sec=2.0)]), ["x"])


def test_release_kinetics_csv(tmp_path):
    (tmp_path / "train.csv").write_text("abseiling/a.mp4,0\nzumba/b.mp4,2\n")
    table, names = build_index_from_kinetics_csv([str(tmp_path / "train.csv")], str(tmp_path / "v"))
    assert names == ["0", "1", "2"]
    assert table["uri"].to_pylist() == [
        str(tmp_path / "v/abseiling/a.mp4"),
        str(tmp_path / "v/zumba/b.mp4"),
    ]
    assert table["label"].to_pylist() == [0, 2] and table["split"].to_pylist() == ["train"] * 2
    (tmp_path / "clips.csv").write_text("a.mp4 1\n")  # space separated, split given
    table, names = build_index_from_kinetics_csv(
        [str(tmp_path / "clips.csv")], str(tmp_path), class_names=["p", "q"], split="val"
    )
    assert (table["split"][0].as_py(), names) == ("val", ["p", "q"])
    (tmp_path / "bad.csv").write_text("a.mp4,zero\n")
    with pytest.raises(
        IndexSchemaError, match=r"bad.csv: line 1: 'a.mp4,zero' is not 'path,label'"
    ):
        build_index_from_kinetics_csv([str(tmp_path / "bad.csv")], str(tmp_path), split="train")


def test_official_kinetics_csv_finds_trimmed_clips_and_windows_full_videos(tmp_path):
    videos = tmp_path / "videos"
    (videos / "train" / "zumba").mkdir(parents=True)
    (videos / "raw").mkdir()
    (videos / "train" / "zumba" / "yid1_000010_000020.mp4").write_bytes(b"x")
    (videos / "raw" / "yid2.mkv").write_bytes(b"x")
    (tmp_path / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "zumba,yid1,10,20,train\n"
        "abseiling,yid2,30,40,validate\n"
        "zumba,yid3,0,10,train\n"
    )
    table, names = build_index_from_kinetics_csv([str(tmp_path / "train.csv")], str(videos))
    assert names == ["abseiling", "zumba"]
    rows = table.to_pylist()
    assert rows[0] == {
        "uri": str(videos / "train/zumba/yid1_000010_000020.mp4"),
        "label": 1,
        "split": "train",
        "start_sec": None,
        "end_sec": None,
    }
    assert rows[1] == {
        "uri": str(videos / "raw/yid2.mkv"),
        "label": 0,
        "split": "val",
        "start_sec": 30.0,
        "end_sec": 40.0,
    }
    assert rows[2]["uri"] == str(videos / "yid3_000000_000010.mp4")  # absent: probing rejects it


def test_ssv2_annotations_and_labels(tmp_path):
    labels = {"Pushing something from left to right": "1", "Holding something": "0"}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    entries = [
        {"id": "7", "template": "Pushing [something] from left to right", "label": "pushing pen"},
        {"id": "9", "template": "Holding [something]", "label": "holding cup"},
    ]
    (tmp_path / "something-something-v2-validation.json").write_text(json.dumps(entries))
    table, names = build_index_from_ssv2(
        [str(tmp_path / "something-something-v2-validation.json")],
        str(tmp_path / "labels.json"),
        "s3://bucket/ssv2",
    )
    assert names == ["Holding something", "Pushing something from left to right"]
    assert table["uri"].to_pylist() == ["s3://bucket/ssv2/7.webm", "s3://bucket/ssv2/9.webm"]
    assert table["label"].to_pylist() == [1, 0] and set(table["split"].to_pylist()) == {"val"}
    (tmp_path / "something-something-v2-test.json").write_text(json.dumps([{"id": "3"}]))
    with pytest.raises(IndexSchemaError, match="entry 0 lacks 'id' or 'template'"):
        build_index_from_ssv2(
            [str(tmp_path / "something-something-v2-test.json")], str(tmp_path / "labels.json"), "x"
        )


def test_class_folders_flat_and_by_split(tmp_path):
    for path in ("flat/dog/1.mp4", "flat/cat/2.webm", "flat/cat/notes.txt", "flat/readme.mp4"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    table, names = build_index_from_folder(str(tmp_path / "flat"))
    assert names == ["cat", "dog"]
    assert sorted(zip(table["uri"].to_pylist(), table["label"].to_pylist(), strict=True)) == [
        (str(tmp_path / "flat/cat/2.webm"), 0),
        (str(tmp_path / "flat/dog/1.mp4"), 1),
    ]
    for path in ("split/train/dog/1.mp4", "split/validation/dog/2.mp4", "split/train/cat/3.mp4"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
    table, names = build_index_from_folder(str(tmp_path / "split"))
    assert names == ["cat", "dog"]
    assert sorted(table["split"].to_pylist()) == ["train", "train", "val"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexSchemaError, match="no videos found"):
        build_index_from_folder(str(tmp_path / "empty"))
    with pytest.raises(IndexSchemaError, match="nothing: can't list the video folder"):
        build_index_from_folder(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_probe_videos_in_parallel_with_rejects(ray_session, videos, bad_videos):
    uris = [videos["h264"], bad_videos["missing"], videos["vp9"], bad_videos["not_video"]]
    candidates = pa.table({"uri": uris, "label": [0, 1, 1, 0], "split": ["train"] * 4})
    probed, rejects = probe_videos(candidates, chunk_size=2, num_cpus=0.5)
    assert probed["uri"].to_pylist() == [videos["h264"], videos["vp9"]]
    assert probed["num_frames"].to_pylist() == [60, 45] and probed["codec"].to_pylist() == [
        "h264",
        "vp9",
    ]
    assert rejects.to_pylist()[0]["reason"] == "missing" and rejects["row"].to_pylist() == [1, 3]
    assert rejects["reason"].to_pylist() == ["missing", "not_video"]


def test_probing_records_bad_videos_but_lets_a_bug_through(videos, bad_videos, monkeypatch):
    """Only decode and I/O errors are bad data: a bug in the code must not read as "every video
    is bad", so it fails the probe with its traceback."""
    uris = [videos["h264"], bad_videos["not_video"], bad_videos["unreadable_stream"]]
    outcomes = probe._probe_chunk([0, 1, 2], uris)
    assert [row for row, _ in outcomes] == [0, 1, 2] and outcomes[0][1]["num_frames"] == 60
    assert [o["reason"] for _, o in outcomes[1:]] == ["not_video", "unreadable_stream"]
    assert probe.failure_record(OSError("connection reset"))["reason"] == "io_error"

    def buggy_probe(uri):
        raise TypeError("probe_video() got an unexpected keyword argument")

    monkeypatch.setattr(probe, "probe_video", buggy_probe)
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        probe._probe_chunk([0, 1], [videos["h264"], bad_videos["not_video"]])


def _prepare_data_job():
    sys.path.insert(0, os.path.join(ROOT, "jobs"))
    try:
        import prepare_data
    finally:
        sys.path.pop(0)
    return prepare_data


def test_prepare_data_finds_an_unwritable_out_before_probing(videos, tmp_path, monkeypatch, capsys):
    (tmp_path / "videos" / "cats").mkdir(parents=True)
    shutil.copy(videos["h264"], tmp_path / "videos" / "cats" / "a.mp4")

    def no_probing(*args, **kwargs):
        raise AssertionError("videos were probed before --out was checked")

    monkeypatch.setattr(probe, "probe_videos", no_probing)
    argv = ["--from-folder", str(tmp_path / "videos"), "--out", "/proc/no-write/index.parquet"]
    assert _prepare_data_job().main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert (
        errors[0].startswith("error: --out /proc/no-write/index.parquet: ")
        and "can't write" in errors[0]
    )


def test_prepare_data_unreachable_address_fails_with_one_line(videos, tmp_path):
    (tmp_path / "videos" / "cats").mkdir(parents=True)
    shutil.copy(videos["h264"], tmp_path / "videos" / "cats" / "a.mp4")
    out = tmp_path / "index.parquet"
    command = [sys.executable, os.path.join(ROOT, "jobs", "prepare_data.py")]
    command += ["--from-folder", str(tmp_path / "videos"), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # ray.init would retry an unreachable address for minutes; the timeout only stops a hang.
    result = subprocess.run(
        [*command, "--address", "127.0.0.1:1"], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "can't connect to the Ray cluster at 127.0.0.1:1" in errors[0]
    assert not out.exists()


@pytest.mark.slow
def test_prepare_data_job_from_kinetics_csv_on_s3(ray_session, s3_bucket, videos, bad_videos):
    root = storage.join(s3_bucket, "k400")
    for name, path in [
        ("a/x.mp4", videos["h264"]),
        ("b/y.webm", videos["vp9"]),
        ("b/z.mp4", bad_videos["truncated_header"]),
    ]:
        with open(path, "rb") as f:
            storage.write_bytes_atomic(storage.join(root, "videos", name), f.read())
    storage.write_bytes_atomic(
        storage.join(root, "train.csv"), b"a/x.mp4,0\nb/y.webm,1\nb/z.mp4,1\n"
    )
    storage.write_bytes_atomic(storage.join(root, "names.json"), b'["ants", "bees"]')
    prepare_data = _prepare_data_job()
    out = storage.join(root, "index.parquet")
    code = prepare_data.main(
        [
            "--from-kinetics-csv",
            storage.join(root, "train.csv"),
            "--video-root",
            storage.join(root, "videos"),
            "--labels",
            storage.join(root, "names.json"),
            "--out",
            out,
        ]
    )
    assert code == 0
    index = read_index(out)
    assert index.class_names == ["ants", "bees"]
    assert index.table["uri"].to_pylist() == [
        storage.join(root, "videos/a/x.mp4"),
        storage.join(root, "videos/b/y.webm"),
    ]
    assert (
        pq.read_table(pa.BufferReader(storage.read_bytes(out)))["uri"][0].as_py()
        == "videos/a/x.mp4"
    )
    rejects = pacsv.read_csv(
        pa.BufferReader(storage.read_bytes(storage.join(root, "index.rejects.csv")))
    )
    assert rejects.to_pylist() == [
        {
            "uri": storage.join(root, "videos/b/z.mp4"),
            "row": 2,
            "reason": "truncated",
            "error_type": "VideoDecodeError",
            "detail": rejects["detail"][0].as_py(),
        }
    ]
    assert prepare_data.main(["--from-folder", "/nonexistent/videos", "--out", out]) == 2
