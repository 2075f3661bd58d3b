"""jobs/transcode.py and morphmlp.data.transcode: real videos encoded with PyAV, re-encoded on a
real Ray into a local folder and into moto's S3 server, and probed back."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import av
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from support import load_job

from morphmlp import storage
from morphmlp.data.decode import probe_video
from morphmlp.data.index import VideoIndex, read_index, write_index
from morphmlp.data.transcode import TranscodeConfig, output_uris, target_size
from morphmlp.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = ["ants", "bees", "wasps"]


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    """jobs/transcode.py's main in this process (so it joins the test session's Ray)."""
    capsys.readouterr()
    try:
        code = load_job("transcode").main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def _keyframes(uri: str) -> tuple[list[int], int]:
    """Frame numbers (presentation order) of the keyframe packets, and the number of frames."""
    with storage.open_input_file(uri) as handle, av.open(handle) as container:
        stream = container.streams.video[0]
        packets = sorted((p for p in container.demux(stream) if p.size), key=lambda p: p.pts)
    return [i for i, p in enumerate(packets) if p.is_keyframe], len(packets)


def _frame_numbers(uri: str, read_frame_index) -> list[int]:
    with storage.open_input_file(uri) as handle, av.open(handle) as container:
        return [read_frame_index(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]


def _source_index(folder: str, local: str, make_video, bad_videos) -> str:
    """Three readable videos (landscape H.264, portrait VP9, a tiny odd-sized VP9 smaller than
    the short side) with keyframes every 10 frames, a trimmed second row of the first, and two
    bad files (not a video; cut short after a readable header), made in the local folder
    `local` and uploaded to `folder` when that is an s3:// URI."""
    os.makedirs(os.path.join(local, "videos", "ants"), exist_ok=True)
    os.makedirs(os.path.join(local, "videos", "bees"), exist_ok=True)
    made = {
        "videos/ants/land.mp4": make_video(
            os.path.join(local, "videos/ants/land.mp4"), width=192, height=128, num_frames=50
        ),
        "videos/bees/portrait.webm": make_video(
            os.path.join(local, "videos/bees/portrait.webm"),
            codec="vp9",
            width=96,
            height=160,
            fps=30,
            num_frames=45,
        ),
        "videos/bees/tiny.webm": make_video(
            os.path.join(local, "videos/bees/tiny.webm"),
            codec="vp9",
            width=47,
            height=35,
            num_frames=30,
        ),
        "videos/ants/notes.mp4": bad_videos["not_video"],
        "videos/bees/cut.mp4": bad_videos["truncated"],
    }
    uris = {}
    for name, path in made.items():
        if path != os.path.join(local, name):
            shutil.copy(path, os.path.join(local, name))
        uris[name] = storage.join(folder, *name.split("/"))
        if storage.is_uri(folder):
            with open(path, "rb") as f:
                storage.write_bytes_atomic(uris[name], f.read())
    rows = []
    for name, label, split, window in [
        ("videos/ants/land.mp4", 0, "train", (None, None)),
        ("videos/ants/land.mp4", 0, "val", (0.4, 1.6)),  # a clip window inside the video
        ("videos/bees/portrait.webm", 1, "train", (None, None)),
        ("videos/ants/notes.mp4", 0, "train", (None, None)),
        ("videos/bees/tiny.webm", 2, "val", (None, None)),
        ("videos/bees/cut.mp4", 1, "train", (None, None)),
    ]:
        if name in ("videos/ants/notes.mp4", "videos/bees/cut.mp4"):
            # What the index said when the file was still whole.
            info = {"duration_sec": 2.4, "fps": 25.0, "num_frames": 60, "width": 96}
            info |= {"height": 64, "codec": "h264"}
        else:
            info = dataclasses.asdict(probe_video(uris[name]))
        rows.append(
            {"uri": uris[name], "label": label, "split": split}
            | {"start_sec": window[0], "end_sec": window[1]}
            | info
        )
    index_uri = storage.join(folder, "index.parquet")
    write_index(VideoIndex(pa.Table.from_pylist(rows), CLASS_NAMES), None, index_uri)
    return index_uri


def _check_outputs(index_uri: str, out: str, read_frame_index) -> VideoIndex:
    source, new = read_index(index_uri), read_index(storage.join(out, "index.parquet"))
    assert new.class_names == source.class_names == CLASS_NAMES
    # The bad files' rows (3: not a video, 5: cut short) are gone; every other row is kept.
    kept = source.table.take([0, 1, 2, 4])
    for column in ("label", "split", "start_sec", "end_sec", "num_frames", "fps"):
        assert new.table[column].to_pylist() == kept[column].to_pylist(), column
    assert new.table["uri"].to_pylist() == [
        storage.join(out, "videos", "ants", "land.mp4"),
        storage.join(out, "videos", "ants", "land.mp4"),
        storage.join(out, "videos", "bees", "portrait.mp4"),
        storage.join(out, "videos", "bees", "tiny.mp4"),
    ]
    # Short side 64, aspect kept, even sizes; the tiny video is not upscaled (47x35 -> 46x34).
    sizes = list(zip(new.table["width"].to_pylist(), new.table["height"].to_pylist(), strict=True))
    assert sizes == [(96, 64), (96, 64), (64, 106), (46, 34)]
    for uri, frames in zip(
        new.table["uri"].to_pylist(), kept["num_frames"].to_pylist(), strict=True
    ):
        info = probe_video(uri)
        assert (info.codec, info.num_frames) == ("h264", frames)
        keyframes, count = _keyframes(uri)
        assert count == frames
        # Exactly every 8 frames, though the sources have keyframes every 10.
        assert keyframes == list(range(0, frames, 8)), (uri, keyframes)
        # Frame for frame: frame i of the output is frame i of the source (so windows hold).
        assert _frame_numbers(uri, read_frame_index) == list(range(frames))
    rejects = pacsv.read_csv(
        pa.BufferReader(storage.read_bytes(storage.join(out, "index.rejects.csv")))
    ).to_pylist()
    assert [(r["row"], r["reason"]) for r in rejects] == [(3, "not_video"), (5, "truncated")]
    assert rejects[0]["uri"].endswith("videos/ants/notes.mp4")
    return new


def test_target_size_never_upscales_and_keeps_sizes_even():
    assert target_size(1280, 720, 320) == (568, 320)
    assert target_size(720, 1280, 320) == (320, 568)
    assert target_size(640, 272, 320) == (640, 272)  # smaller than the short side: kept
    assert target_size(175, 143, 320) == (174, 142)  # kept, made even for yuv420p
    assert target_size(1920, 1080, 256) == (456, 256)


def test_output_names_follow_the_source_folders_and_never_collide():
    out = output_uris(
        ["/d/a/x.mp4", "/d/a/x.webm", "/d/b/y.mkv", "/elsewhere/z.avi"], "/d", "s3://b/out"
    )
    assert out["/d/b/y.mkv"] == "s3://b/out/b/y.mp4"
    assert out["/elsewhere/z.avi"] == "s3://b/out/z.mp4"
    assert out["/d/a/x.mp4"] != out["/d/a/x.webm"]
    assert {out["/d/a/x.mp4"][:-13], out["/d/a/x.webm"][:-13]} == {"s3://b/out/a/x"}


@pytest.mark.parametrize(
    "field, value",
    [("short_side", 33), ("short_side", 16), ("keyframe_interval", -1), ("crf", 60)],
)
def test_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ConfigError, match=rf"^transcode\.{field}={value} must be "):
        TranscodeConfig(**{field: value})


def test_transcode_modules_do_not_import_torch():
    code = "import sys, morphmlp.data.transcode; assert 'torch' not in sys.modules, 'torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--short-side", "33"], "transcode.short_side=33 must be an even integer >= 32"),
        (["--short-side", "abc"], "argument --short-side: invalid int value: 'abc'"),
        (["--keyframe-interval", "-2"], "transcode.keyframe_interval=-2 must be an integer >= 1"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message, tmp_path, capsys):
    code, _, err = _run(
        ["--index", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "o"), *args], capsys
    )
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_unwritable_destination_is_refused_first(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # The index doesn't exist either: the destination is what the one line names.
    code, _, err = _run(
        ["--index", str(tmp_path / "none.parquet"), "--out", str(blocker / "out")], capsys
    )
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: destination {blocker / 'out'}/.write-probe-"), err
    assert "can't write" in err


def test_missing_index_and_output_over_the_source_are_refused(
    tmp_path, make_video, bad_videos, capsys
):
    code, _, err = _run(
        ["--index", str(tmp_path / "none.parquet"), "--out", str(tmp_path / "out")], capsys
    )
    assert code == 2 and err.count("\n") == 1 and "none.parquet" in err, err
    # Transcoding into the source folder would overwrite land.mp4 with itself.
    index_uri = _source_index(str(tmp_path / "src"), str(tmp_path / "src"), make_video, bad_videos)
    before = os.path.getmtime(tmp_path / "src" / "videos" / "ants" / "land.mp4")
    code, _, err = _run(["--index", index_uri, "--out", str(tmp_path / "src")], capsys)
    assert code == 2 and err.count("\n") == 1 and "would overwrite its source" in err, err
    assert os.path.getmtime(tmp_path / "src" / "videos" / "ants" / "land.mp4") == before


def test_unwritable_s3_destination_is_refused(s3_bucket, tmp_path, capsys):
    code, _, err = _run(
        ["--index", str(tmp_path / "none.parquet"), "--out", "s3://no-such-bucket-here/out"],
        capsys,
    )
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: destination s3://no-such-bucket-here/out/"), err


@pytest.mark.slow
def test_transcode_local_folder_resumes_and_reports_bad_files(
    ray_session, make_video, bad_videos, read_frame_index, tmp_path, capsys, caplog
):
    index_uri = _source_index(str(tmp_path / "src"), str(tmp_path / "src"), make_video, bad_videos)
    out = str(tmp_path / "out")
    args = ["--index", index_uri, "--out", out, "--short-side", "64", "--keyframe-interval", "8"]
    caplog.set_level("INFO", logger="morphmlp.data.transcode")
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    assert "(4 rows; 3 videos encoded, 0 already done, 2 rejected" in stdout, stdout
    _check_outputs(index_uri, out, read_frame_index)
    messages = [r.getMessage() for r in caplog.records]
    skipped = sorted(
        m.split("/videos/")[1].split(" (")[0]
        for m in messages
        if m.startswith("skipping unreadable video")
    )
    assert len(skipped) == 2, skipped
    assert skipped[0] == "ants/notes.mp4: not_video: not a video FFmpeg can read", skipped
    assert skipped[1].startswith("bees/cut.mp4: truncated: decoded "), skipped
    assert skipped[1].endswith(" frames where the index has 60"), skipped
    assert any(m.startswith("transcoded 5/5 videos") and "ETA" in m for m in messages), messages
    # Nothing but the finished files: no temporary names left behind.
    names = {str(p.relative_to(out)) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert names == {
        "index.parquet",
        "index.rejects.csv",
        "videos/ants/land.mp4",
        "videos/bees/portrait.mp4",
        "videos/bees/tiny.mp4",
    }

    # A re-run keeps every finished video (probed, not re-encoded) ...
    outputs = sorted((tmp_path / "out" / "videos").rglob("*.mp4"))
    stamps = [p.stat().st_mtime_ns for p in outputs]
    code, stdout, _ = _run(args, capsys)
    assert code == 0 and "0 videos encoded, 3 already done, 2 rejected" in stdout, stdout
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    # ... re-encodes one that is gone ...
    (tmp_path / "out" / "videos" / "bees" / "portrait.mp4").unlink()
    code, stdout, _ = _run(args, capsys)
    assert code == 0 and "1 videos encoded, 2 already done" in stdout, stdout
    _check_outputs(index_uri, out, read_frame_index)
    # ... and all of them when the settings change (recorded in each file).
    code, stdout, _ = _run([*args[:-1], "4"], capsys)
    assert code == 0 and "3 videos encoded, 0 already done" in stdout, stdout
    assert _keyframes(os.path.join(out, "videos", "ants", "land.mp4"))[0] == list(range(0, 50, 4))


@pytest.mark.slow
def test_transcode_on_s3_from_s3(
    ray_session, s3_bucket, make_video, bad_videos, read_frame_index, tmp_path, capsys
):
    source = storage.join(s3_bucket, "transcode-src")
    index_uri = _source_index(source, str(tmp_path / "src"), make_video, bad_videos)
    out = storage.join(s3_bucket, "transcode-out")
    args = ["--index", index_uri, "--out", out, "--short-side", "64", "--keyframe-interval", "8"]
    code, stdout, err = _run(args, capsys)
    assert code == 0, err
    assert "3 videos encoded, 0 already done, 2 rejected" in stdout, stdout
    new = _check_outputs(index_uri, out, read_frame_index)
    assert new.table["uri"][0].as_py() == f"{out}/videos/ants/land.mp4"
    code, stdout, _ = _run(args, capsys)
    assert code == 0 and "0 videos encoded, 3 already done" in stdout, stdout


@pytest.mark.slow
def test_a_source_whose_every_video_fails_gives_one_line_and_no_index(
    ray_session, bad_videos, tmp_path, capsys
):
    rows = [
        {"uri": bad_videos[reason], "label": 0, "split": "train", "duration_sec": 2.4}
        | {"fps": 25.0, "num_frames": 60, "width": 96, "height": 64, "codec": "h264"}
        for reason in ("not_video", "empty", "missing")
    ]
    index_uri = str(tmp_path / "bad.parquet")
    write_index(VideoIndex(pa.Table.from_pylist(rows), ["x"]), None, index_uri)
    out = tmp_path / "out"
    code, _, err = _run(["--index", index_uri, "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "none of its 3 videos could be transcoded" in err and "not_video" in err, err
    assert not (out / "index.parquet").exists()
    assert not [p for p in out.rglob("*") if p.suffix == ".mp4" or ".tmp-" in p.name]
    rejects = pacsv.read_csv(str(out / "index.rejects.csv")).to_pylist()
    assert sorted(r["reason"] for r in rejects) == ["empty", "missing", "not_video"]
    assert np.all([r["row"] == i for i, r in enumerate(rejects)])
