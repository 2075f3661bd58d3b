"""jobs/predict.py on real parts: an xs model exported as training exports it (untrained: the
tests need real weights, not good ones), a SQLite MLflow store with it registered and aliased,
PyAV-encoded videos, and the session's Ray for many videos."""

from __future__ import annotations

import os

import mlflow
import pyarrow as pa
import pytest
from support import XS_CLASSES, error_lines, load_job, read_predictions, save_xs_model

from morphmlp import tracking
from morphmlp.data.decode import probe_video
from morphmlp.data.index import VideoIndex, write_index


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return save_xs_model(str(tmp_path_factory.mktemp("model") / "model.pt"))


@pytest.fixture(scope="module")
def clips(tmp_path_factory, make_video) -> dict[str, str]:
    root = tmp_path_factory.mktemp("clips")
    return {
        "index": make_video(str(root / "grey.mp4"), num_frames=60),
        "noise": make_video(str(root / "noise.mp4"), num_frames=40, content="noise", seed=3),
        "vp9": make_video(str(root / "vp9.webm"), codec="vp9", fps=30, num_frames=45),
    }


@pytest.fixture
def store(tmp_path, monkeypatch, model_file) -> str:
    """A fresh MLflow store with the model registered as v1 of morphmlp, alias `best` on it."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    run_id = tracking.start_run("morphmlp-train", "xs", tags={}, uri=uri)
    client.log_artifact(run_id, model_file, "checkpoints/best")
    client.set_terminated(run_id, "FINISHED")
    version = tracking.register_model_version(run_id, "checkpoints/best", tags={}, uri=uri)
    client.set_registered_model_alias(tracking.REGISTERED_MODEL, "best", version)
    return uri


def test_one_video_from_a_model_file_a_version_and_an_alias(
    store, model_file, clips, tmp_path, capsys
):
    predict = load_job("predict")
    rows = {}
    refs = (model_file, "models:/morphmlp/1", "models:/morphmlp@best", "models:/morphmlp/latest")
    for ref in refs:
        out = str(tmp_path / f"{len(rows)}.csv")
        assert predict.main([clips["index"], "--model", ref, "--top-k", "3", "--output", out]) == 0
        printed = capsys.readouterr().out
        (row,) = read_predictions(out)
        assert row["ok"] and row["num_views"] == 1 and row["video"] == clips["index"]
        probs = [row[f"prob_{i}"] for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert row["class_1"] in XS_CLASSES
        assert f"1. {row['class_1']}" in printed  # the ranked classes, best first
        rows[ref] = row
    first = rows[model_file]
    for row in rows.values():  # one set of weights, whichever way it is referenced
        assert row["class_1"] == first["class_1"]
        assert row["prob_1"] == pytest.approx(first["prob_1"], abs=1e-6)
    # Multi-view: 2 clips x 3 crops, the checkpoint's protocol otherwise.
    out = str(tmp_path / "views.parquet")
    argv = [clips["vp9"], "--model", model_file, "--clips", "2", "--crops", "3", "--output", out]
    assert predict.main(argv) == 0
    (row,) = read_predictions(out)
    assert row["num_views"] == 6 and row["ok"]
    assert "2x3 views" in capsys.readouterr().out


def test_bad_input_is_one_line_and_nothing_written(store, model_file, clips, tmp_path, capsys):
    predict = load_job("predict")
    out = str(tmp_path / "never.csv")
    video = clips["index"]
    cases = [
        (
            ["--model", "models:/morphmlp@champion"],
            "alias 'champion' of morphmlp is not set; aliases: best (v1)",
        ),
        (["--model", "models:/morphmlp/7"], "v7 is not registered; registered versions: 1"),
        (
            ["--model", "models:/morphmlp@latest"],
            "aliases: best (v1); the newest version is models:/morphmlp/latest",
        ),
        (["--model", "models:/other/1"], "is not a checkpoint reference this job knows"),
        (["--model", str(tmp_path / "absent.pt")], "absent.pt: no such file"),
        (["--model", str(tmp_path / "absent.onnx")], "absent.onnx: no such file"),
        (["--model", model_file, "--clips", "0"], "--clips 0: must be an integer >= 1"),
        (["--model", model_file, "--crops", "0"], "--crops 0: choose 1 (center) or 3"),
        (["--model", model_file, "--top-k", "0"], "--top-k 0: must be an integer >= 1"),
        (["--model", model_file, "--output", str(tmp_path / "p.txt")], "name a .csv or .parquet"),
    ]
    for extra, message in cases:
        argv = [video, *extra] if "--output" in extra else [video, *extra, "--output", out]
        assert predict.main(argv) == 2, extra
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and message in errors[0], (extra, errors)
    missing = str(tmp_path / "gone.mp4")
    assert predict.main([missing, "--model", model_file, "--output", out]) == 2
    errors = error_lines(capsys.readouterr().err)
    assert errors == [f"error: VIDEO {missing}: no such file or folder"]
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    assert predict.main([str(empty), "--model", model_file, "--output", out]) == 2
    assert "a folder with no videos" in error_lines(capsys.readouterr().err)[0]
    assert not os.path.exists(out)


def test_a_video_that_decodes_to_nothing_fails_with_exit_1(model_file, bad_videos, capsys):
    predict = load_job("predict")
    for reason in ("not_video", "unreadable_stream", "empty"):
        video = bad_videos[reason]
        assert predict.main([video, "--model", model_file]) == 1, reason
        captured = capsys.readouterr()
        failed = [line for line in captured.err.splitlines() if line.startswith("failed:")]
        assert failed == [line for line in failed if video in line] and len(failed) == 1
        assert f"{reason}:" in failed[0]
        assert (captured.out + captured.err).count(video) == 1


@pytest.mark.slow
def test_many_videos_on_ray_with_unreadable_ones(
    model_file, clips, bad_videos, ray_session, tmp_path, capsys
):
    predict = load_job("predict")
    # An index with a readable video and one deleted since the index was made: index rows are
    # not probed again, so that one fails in the decode actors, the not-a-video file in probing.
    info = probe_video(clips["noise"])
    row = {
        "label": 0,
        "split": "val",
        **{
            k: getattr(info, k)
            for k in ("duration_sec", "fps", "num_frames", "width", "height", "codec")
        },
    }
    deleted = str(tmp_path / "deleted.mp4")
    index = str(tmp_path / "index.parquet")
    table = pa.Table.from_pylist([{"uri": clips["noise"], **row}, {"uri": deleted, **row}])
    write_index(VideoIndex(table, ["x"]), None, index)
    bad = bad_videos["not_video"]
    out = str(tmp_path / "predictions.parquet")
    argv = [clips["index"], bad, index, clips["vp9"], "--model", model_file, "--top-k", "2"]
    assert predict.main([*argv, "--output", out]) == 1
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    for name in (bad, deleted):  # one line each, naming it
        assert printed.count(name) == 1, (name, printed)
    assert f"failed: {bad}: not_video" in captured.err
    assert f"failed: {deleted}: missing" in captured.err
    assert "2 of 5 videos could not be read" in captured.err
    rows = read_predictions(out)
    assert [r["video"] for r in rows] == [
        clips["index"],
        bad,
        clips["noise"],
        deleted,
        clips["vp9"],
    ]
    assert [r["ok"] for r in rows] == [True, False, True, False, True]
    for video in (clips["index"], clips["noise"], clips["vp9"]):
        assert video in captured.out  # a row of the table
    # The Ray path decodes the frames the one-video path decodes: same probabilities.
    alone = str(tmp_path / "alone.csv")
    assert (
        predict.main([clips["vp9"], "--model", model_file, "--top-k", "2", "--output", alone]) == 0
    )
    (single,) = read_predictions(alone)
    many = rows[-1]
    assert many["class_1"] == single["class_1"]
    assert many["prob_1"] == pytest.approx(single["prob_1"], abs=1e-5)
    assert many["prob_2"] == pytest.approx(single["prob_2"], abs=1e-5)
