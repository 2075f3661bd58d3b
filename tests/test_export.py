"""jobs/export.py on a real xs model: torch.export and ONNX (dynamo) files that check themselves
against eager, run by jobs/predict.py with the model file's top-1; a sidecar that doesn't match
its file, and an export that fails its check, are refused with nothing left behind."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from support import XS_CLASSES, error_lines, load_job, read_predictions, save_xs_model

from morphmlp.evaluate import model_refs
from morphmlp.evaluate.export import ONNX_OPSET
from morphmlp.models import create_model


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    return save_xs_model(str(tmp_path_factory.mktemp("model") / "model.pt"), seed=1)


@pytest.fixture(scope="module")
def exported(model_file, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("export") / "out")
    assert load_job("export").main(["--model", model_file, "--format", "both", "--out", out]) == 0
    return out


@pytest.fixture(scope="module")
def video(tmp_path_factory, make_video) -> str:
    return make_video(str(tmp_path_factory.mktemp("video") / "clip.mp4"), num_frames=50)


def _sidecar(path: str) -> dict:
    with open(path + ".json") as f:
        return json.load(f)


def test_export_passes_its_numeric_check_and_records_the_input_spec(model_file, exported):
    assert sorted(os.listdir(exported)) == [
        "model.onnx",
        "model.onnx.json",
        "model.pt2",
        "model.pt2.json",
    ]
    assert not [n for n in os.listdir(os.path.dirname(exported)) if n.startswith(".export-")]
    for name, fmt, opset in (("model.pt2", "torch-export", None), ("model.onnx", "onnx", 18)):
        spec = _sidecar(os.path.join(exported, name))
        assert spec["format"] == fmt and spec["file"] == name and spec["opset"] == opset
        assert (spec["frames"], spec["img_size"], spec["in_chans"]) == (8, 112, 3)
        assert spec["mean"] == [0.45] * 3 and spec["std"] == [0.225] * 3
        assert spec["class_names"] == XS_CLASSES and spec["num_classes"] == 4
        assert spec["input_layout"] == "B,3,T,H,W" and spec["input_dtype"] == "float32"
        assert spec["model_config"]["widths"] == [28, 56, 112, 224]
        assert spec["data_config"]["train_jitter_scales"] == [128, 160]  # the short side
        assert set(spec["max_abs_diff"]) == {"1", "2"}
        assert max(spec["max_abs_diff"].values()) <= 1e-4
    assert ONNX_OPSET == 18
    # Independently of the export's own check: ONNX Runtime at a batch size the check didn't use
    # (the batch dimension is symbolic) against the eager network.
    ckpt = model_refs.load(model_file)
    model = create_model(ckpt.model_config).eval()
    model.load_state_dict(ckpt.state_dict)
    session = ort.InferenceSession(
        os.path.join(exported, "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (given,) = session.get_inputs()
    assert given.name == "clips" and isinstance(given.shape[0], str)
    assert given.shape[1:] == [3, 8, 112, 112]
    clips = torch.randn(3, 3, 8, 112, 112, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(clips).numpy()
    (got,) = session.run(None, {"clips": clips.numpy()})
    assert np.abs(got - expected).max() <= 1e-4
    program = torch.export.load(os.path.join(exported, "model.pt2")).module()
    with torch.no_grad():
        assert (program(clips) - model(clips)).abs().max().item() <= 1e-4


def test_predict_runs_both_exported_files_with_the_model_files_top1(
    model_file, exported, video, tmp_path
):
    predict = load_job("predict")
    rows = []
    for ref in (model_file, *(os.path.join(exported, n) for n in ("model.pt2", "model.onnx"))):
        out = str(tmp_path / f"{len(rows)}.csv")
        assert predict.main([video, "--model", ref, "--output", out]) == 0, ref
        (row,) = read_predictions(out)
        rows.append(row)
    assert rows[0]["ok"] and rows[0]["class_1"] in XS_CLASSES
    for row in rows[1:]:
        assert row["class_1"] == rows[0]["class_1"]
        for k in range(1, 5):
            assert row[f"class_{k}"] == rows[0][f"class_{k}"]
            assert row[f"prob_{k}"] == pytest.approx(rows[0][f"prob_{k}"], abs=1e-4)


def test_predict_refuses_an_export_whose_sidecar_does_not_match_it(
    exported, video, tmp_path, capsys
):
    predict = load_job("predict")
    out = str(tmp_path / "never.csv")
    cases = [
        (
            "model.onnx",
            "frames",
            16,
            "field 'frames' is 16 but the exported file takes (batch, 3, 8, 112, 112)",
        ),
        (
            "model.pt2",
            "frames",
            16,
            "field 'frames' is 16 but the exported file takes (batch, 3, 8, 112, 112)",
        ),
        ("model.onnx", "img_size", 224, "field 'img_size' is 224"),
        ("model.pt2", "num_classes", 5, "field 'num_classes' is 5 but the exported file outputs 4"),
        ("model.onnx", "class_names", ["a", "b"], "field 'class_names' has 2 names for 4 outputs"),
        ("model.pt2", "format", "onnx", "field 'format' is 'onnx' but the file is torch-export"),
        (
            "model.onnx",
            "mean",
            [0.5, 0.5, 0.5],
            "field 'mean' is [0.5, 0.5, 0.5] but field 'data_config.mean' is [0.45, 0.45, 0.45]",
        ),
        (
            "model.pt2",
            "model_config.num_frames",
            16,
            "field 'model_config.num_frames' is 16 but field 'frames' is 8",
        ),
    ]
    for i, (name, key, value, message) in enumerate(cases):
        folder = tmp_path / f"tampered{i}"
        folder.mkdir()
        path = str(folder / name)
        shutil.copy(os.path.join(exported, name), path)
        spec = _sidecar(os.path.join(exported, name))
        section, _, field = key.rpartition(".")
        (spec[section] if section else spec)[field] = value
        with open(path + ".json", "w") as f:
            json.dump(spec, f)
        assert predict.main([video, "--model", path, "--output", out]) == 2, key
        errors = error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and message in errors[0], (key, errors)
        assert f"{name}.json" in errors[0]  # names the sidecar
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(os.path.join(exported, "model.onnx"), lone / "model.onnx")
    assert predict.main([video, "--model", str(lone / "model.onnx"), "--output", out]) == 2
    assert "no sidecar model.onnx.json" in error_lines(capsys.readouterr().err)[0]
    assert not os.path.exists(out)


def test_an_export_that_fails_its_check_leaves_nothing(model_file, tmp_path, capsys):
    export = load_job("export")
    out = tmp_path / "out"
    # fp32 ONNX Runtime kernels differ from eager in the last bits (~1e-7), never by 1e-12.
    argv = ["--model", model_file, "--format", "onnx", "--out", str(out), "--tolerance", "1e-12"]
    assert export.main(argv) == 2
    errors = error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "onnx export of" in errors[0] and "max |Δ|" in errors[0]
    assert "> 1e-12" in errors[0] and "nothing was written" in errors[0]
    assert os.listdir(tmp_path) == []  # neither the folder nor a staging folder
    assert export.main(["--model", model_file, "--format", "tflite", "--out", str(out)]) == 2
    assert "choose torch-export, onnx, both" in error_lines(capsys.readouterr().err)[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_many_videos_on_ray_through_both_exported_files(
    model_file, exported, video, make_video, ray_session, tmp_path
):
    predict = load_job("predict")
    other = make_video(str(tmp_path / "other.webm"), codec="vp9", fps=30, num_frames=45)
    alone = {}
    for clip in (video, other):
        out = str(tmp_path / f"alone-{len(alone)}.csv")
        assert predict.main([clip, "--model", model_file, "--output", out]) == 0
        (alone[clip],) = read_predictions(out)
    for name in ("model.onnx", "model.pt2"):
        out = str(tmp_path / f"{name}.parquet")
        ref = os.path.join(exported, name)
        assert predict.main([video, other, "--model", ref, "--output", out]) == 0, name
        rows = read_predictions(out)
        assert [r["video"] for r in rows] == [video, other]
        for row in rows:
            expected = alone[row["video"]]
            assert row["ok"] and row["class_1"] == expected["class_1"]
            assert row["prob_1"] == pytest.approx(expected["prob_1"], abs=1e-4)
