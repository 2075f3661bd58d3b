"""Evaluation and scheduled re-evaluation on real parts: the session's Ray, a SQLite MLflow store
in a temporary folder, demo videos, and xs checkpoints exported and registered the way training
does it (different seeds, untrained: evaluation doesn't need good weights, only real ones)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from support import error_lines, load_job

from morphmlp import tracking
from morphmlp.config import to_dict
from morphmlp.data.demo import CLASS_NAMES
from morphmlp.data.index import VideoIndex, read_index, write_index
from morphmlp.errors import ConfigError
from morphmlp.evaluate import model_refs
from morphmlp.evaluate.catalog import (
    Benchmark,
    BenchmarkHashError,
    CatalogError,
    Protocol,
    ResolvedBenchmark,
    load_catalog,
    resolve_benchmark,
)
from morphmlp.evaluate.labels import LabelSpaceError, match_labels
from morphmlp.evaluate.leaderboard import build_leaderboard
from morphmlp.evaluate.metrics import average_views, compute_metrics
from morphmlp.evaluate.model_refs import RegisteredVersion
from morphmlp.evaluate.results import EVAL_EXPERIMENT, PairKey, PairResult
from morphmlp.models import create_model
from morphmlp.models.weights import CheckpointError
from morphmlp.train.checkpoint import export_model
from morphmlp.train.config import resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo classes under another vocabulary: move_up/down renamed, so 4 of 6 names are shared.
RENAMED = ["move_left", "move_right", "rise", "fall", "grow", "shrink"]
UNRELATED = ["ant", "bee", "cat", "dog", "eel", "fox"]


def _demo_data():
    return resolve_config({}).data  # the demo recipe's data settings


def _read(path) -> str:
    with open(path) as f:
        return f.read()


def _write_catalog(path, benchmarks: list[dict]) -> str:
    with open(path, "w") as f:
        yaml.safe_dump({"version": 1, "benchmarks": benchmarks}, f)
    return str(path)


def _subset(index_uri: str, rows: list[int], out: str) -> str:
    index = read_index(index_uri)
    write_index(VideoIndex(index.table.take(rows), index.class_names), None, out)
    return out


@pytest.fixture(scope="module")
def bench_index(demo_index, tmp_path_factory) -> str:
    """A small benchmark: the first demo val video of each class (6 videos)."""
    val = read_index(demo_index).split("val")
    labels = val.table["label"].to_pylist()
    rows = [labels.index(c) for c in range(len(CLASS_NAMES))]
    out = str(tmp_path_factory.mktemp("bench") / "index.parquet")
    write_index(VideoIndex(val.table.take(rows), val.class_names), None, out)
    return out


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store (artifacts under tmp_path) with xs models v1 (seed 0), v2 (seed 1)
    registered as training registers its best checkpoints."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = mlflow.MlflowClient(uri)
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = create_model("xs", num_classes=len(CLASS_NAMES))
        path = str(tmp_path / f"seed{seed}" / "model.pt")
        export_model(
            path,
            model=model,
            model_config=to_dict(model.cfg),
            class_names=CLASS_NAMES,
            data_config=to_dict(_demo_data()),
            metrics={},
        )
        run_id = tracking.start_run("morphmlp-train", f"xs-seed{seed}", tags={}, uri=uri)
        client.log_artifact(run_id, path, "checkpoints/best")
        client.set_terminated(run_id, "FINISHED")
        tags = {"variant": "xs", "frames": "8", "img_size": "112", "run": f"seed{seed}"}
        tracking.register_model_version(run_id, "checkpoints/best", tags=tags, uri=uri)
    return uri


def _eval_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EVAL_EXPERIMENT)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], "tags.job = 'evaluate'", max_results=1000)


def _pairs(runs, outcome: str = "evaluated") -> list[tuple[str, str]]:
    return sorted(
        (r.data.tags["model_version"], r.data.tags["benchmark"])
        for r in runs
        if r.info.status == "FINISHED" and r.data.tags.get("outcome") == outcome
    )


# ---------------------------------------------------------------------------------------------
# Catalog, label spaces, metrics, leaderboard (no cluster)


def test_catalog_entries_resolve_and_hash(bench_index, tmp_path):
    path = _write_catalog(
        os.path.join(os.path.dirname(bench_index), "catalog.yaml"),
        [
            {"name": "k400-style", "index": "index.parquet", "protocol": {"clips": 4, "crops": 3}},
            {
                "name": "ssv2-style",
                "index": bench_index,
                "protocol": {"crops": 3, "sampling": "segment"},
            },
        ],
    )
    catalog = load_catalog(path)
    assert catalog.names == ["k400-style", "ssv2-style"]
    first = resolve_benchmark(catalog.get("k400-style"))  # relative to the catalog's folder
    assert first.index.uri == bench_index and len(first.index) == len(CLASS_NAMES)
    assert first.content_hash == read_index(bench_index).content_hash()
    assert first.spec.protocol.num_views == 12
    # The protocol hash follows every protocol field, and only them.
    second = resolve_benchmark(catalog.get("ssv2-style"))
    assert second.content_hash == first.content_hash
    assert second.protocol_hash != first.protocol_hash
    assert Protocol(clips=4, crops=3).content_hash() == first.protocol_hash
    assert Protocol(clips=4, crops=3, ensemble="logits").content_hash() != first.protocol_hash
    # Class names given in the catalog are part of the content hash.
    renamed = resolve_benchmark(Benchmark("renamed", bench_index, class_names=tuple(RENAMED)))
    assert renamed.class_names == RENAMED and renamed.content_hash != first.content_hash


def test_catalog_errors_name_the_problem(bench_index, tmp_path):
    def load(entries, version=1):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"version": version, "benchmarks": entries}))
        return load_catalog(str(path))

    with pytest.raises(CatalogError, match="version 2 is not supported"):
        load([], version=2)
    with pytest.raises(CatalogError, match="'x' appears twice"):
        load([{"name": "x", "index": bench_index}, {"name": "x", "index": bench_index}])
    with pytest.raises(CatalogError, match=r"benchmarks\[0\] \(x\).*protocol.views.*clips"):
        load([{"name": "x", "index": bench_index, "protocol": {"views": 3}}])
    with pytest.raises(CatalogError, match=r"crops.*2.*choose one of 1, 3"):
        load([{"name": "x", "index": bench_index, "protocol": {"crops": 2}}])
    with pytest.raises(CatalogError, match="benchmark name 'a b'"):
        load([{"name": "a b", "index": bench_index}])
    with pytest.raises(CatalogError, match=r"2 class names given but the index .* has 6 classes"):
        resolve_benchmark(Benchmark("x", bench_index, class_names=("a", "b")))
    actual = read_index(bench_index).content_hash()
    with pytest.raises(BenchmarkHashError) as err:
        resolve_benchmark(Benchmark("pinned", bench_index, content_hash="0" * 64))
    assert actual in str(err.value) and "0" * 64 in str(err.value)


def test_label_spaces_match_by_class_name():
    full = match_labels(CLASS_NAMES, 6, [n.upper().replace("_", " ") for n in CLASS_NAMES])
    assert full.overlap == "full" and full.model_outputs == tuple(range(6))
    # The benchmark orders its classes differently and lacks up/down: outputs follow names.
    bench = ["shrink", "grow", "rise", "move_left"]
    partial = match_labels(CLASS_NAMES, 6, bench)
    assert partial.overlap == "partial"
    assert partial.benchmark_labels == (0, 1, 3)
    assert partial.model_outputs == (5, 4, 0)
    with pytest.raises(LabelSpaceError, match="no class name in common"):
        match_labels(CLASS_NAMES, 6, UNRELATED)
    # A release checkpoint has no names: its outputs are the benchmark's labels, if counts agree.
    assert match_labels(None, 6, UNRELATED).overlap == "full"
    with pytest.raises(LabelSpaceError, match="no class names and 400 outputs"):
        match_labels(None, 400, UNRELATED)


def test_metrics_agree_with_the_release_topk_formula():
    rng = np.random.default_rng(0)
    scores = rng.random((200, 7))
    labels = rng.integers(0, 7, 200)
    labels[labels == 3] = 4  # a class without videos: excluded from the mean class accuracy
    m = compute_metrics(scores, labels)
    # slowfast/utils/metrics.py topks_correct, as the release computes it
    _, top = torch.topk(torch.from_numpy(scores), 5, dim=1, largest=True, sorted=True)
    hits = top.t().eq(torch.from_numpy(labels).view(1, -1).expand_as(top.t()))
    assert m.top1 == pytest.approx(hits[:1].float().sum().item() / 200)
    assert m.top5 == pytest.approx(hits[:5].float().sum().item() / 200)
    predicted = scores.argmax(1)
    for c in range(7):
        mine = labels == c
        if mine.any():
            assert m.per_class_accuracy[c] == pytest.approx((predicted[mine] == c).mean())
        else:
            assert np.isnan(m.per_class_accuracy[c])
        assert m.confusion[c].sum() == mine.sum()
    present = [c for c in range(7) if (labels == c).any()]
    assert m.mean_class_accuracy == pytest.approx(np.mean(m.per_class_accuracy[present]))
    assert m.confusion.trace() == (predicted == labels).sum()


def test_views_are_averaged_per_video():
    rng = np.random.default_rng(1)
    views = rng.random((3, 4, 5))  # 3 videos x 4 views x 5 classes
    video = np.repeat([7, 2, 9], 4)
    order = rng.permutation(12)  # views arrive in any order
    result = average_views(
        video[order], np.repeat([1, 0, 4], 4)[order], views.reshape(12, 5)[order], expected_views=4
    )
    assert result.video.tolist() == [2, 7, 9]
    assert result.label.tolist() == [0, 1, 4]
    np.testing.assert_allclose(result.scores, views[[1, 0, 2]].mean(axis=1))
    assert result.num_views.tolist() == [4, 4, 4]


def test_leaderboard_rows_sorted_by_mean_top1(bench_index):
    index = read_index(bench_index)
    benches = [ResolvedBenchmark(Benchmark(n, bench_index), index, f"hash-{n}", "p") for n in "ab"]
    versions = [RegisteredVersion(v, None, "", {"variant": "xs"}) for v in ("1", "2", "3")]
    results = {}
    for version, bench, outcome, top1 in [
        ("1", "a", "evaluated", 0.5),
        ("1", "b", "evaluated", 0.3),
        ("2", "a", "evaluated", 0.9),
        ("2", "b", "skipped", None),
    ]:
        key = PairKey(version, bench, f"hash-{bench}", "p")
        tags = {"skip_reason": "no class name in common"} if outcome == "skipped" else {}
        results[key] = PairResult(key, "run", outcome, {"top1": top1} if top1 else {}, tags)
    stale = PairKey("3", "a", "old-hash", "p")  # a result for content that changed since
    results[stale] = PairResult(stale, "run", "evaluated", {"top1": 1.0})
    board = build_leaderboard(versions, benches, results, left_out={"c": "hash mismatch"})
    assert [r.version for r in board.rows] == ["2", "1", "3"]
    assert board.rows[0].cells == {"a": "90.0", "b": "n/a"}
    assert board.rows[1].cells == {"a": "50.0", "b": "30.0"} and board.rows[1].mean_top1 == 40.0
    assert board.rows[2].cells == {"a": "pending", "b": "pending"}
    text = board.to_markdown()
    assert "| v2 | xs | 90.0 | n/a | 90.0 |" in text
    assert "v2 on b: no class name in common" in text and "c left out: hash mismatch" in text
    assert "<td>90.0</td>" in board.to_html()


# ---------------------------------------------------------------------------------------------
# Checkpoint references and the evaluation job's bad input (MLflow store, no cluster)


def test_checkpoint_references(store, tmp_path):
    v1 = model_refs.load("models:/morphmlp/1")
    assert v1.model_version == "1" and v1.class_names == CLASS_NAMES
    assert v1.model_config.num_frames == 8 and v1.version_tags["run"] == "seed0"
    best = model_refs.load(f"runs:/{v1.run_id}")  # the run's best model
    assert all(torch.equal(best.state_dict[k], v) for k, v in v1.state_dict.items())
    assert [v.version for v in model_refs.registered_versions()] == ["1", "2"]
    latest = model_refs.load("models:/morphmlp/latest")  # MLflow's name for the newest version
    assert latest.model_version == "2" and latest.version_tags["run"] == "seed1"
    # A release-style file: PySlowFast's model_state, no architecture, no class names.
    release = str(tmp_path / "release.pyth")
    torch.save({"model_state": v1.state_dict, "epoch": 30}, release)
    with pytest.raises(ConfigError, match="give --variant"):
        model_refs.load(release)
    loaded = model_refs.load(release, variant="xs", frames=8)
    assert loaded.class_names is None and loaded.num_classes == 6
    with pytest.raises(CheckpointError, match="mis-shaped"):
        model_refs.load(release, variant="xs", frames=16)


def test_evaluate_job_rejects_bad_input(store, bench_index, tmp_path, capsys):
    evaluate = load_job("evaluate")
    catalog = _write_catalog(
        tmp_path / "catalog.yaml",
        [
            {"name": "pinned", "index": bench_index, "content_hash": "f" * 64},
            {"name": "16-frames", "index": bench_index, "protocol": {"frames": 16}},
            {"name": "other-classes", "index": bench_index, "class_names": UNRELATED},
        ],
    )
    actual = read_index(bench_index).content_hash()
    cases = [
        (
            ["--model-version", "9", "--index", bench_index],
            "v9 is not registered; registered versions: 1, 2",
        ),
        (["runs:/0123abcd", "--index", bench_index], "no MLflow run 0123abcd"),
        (
            ["models:/morphmlp/1", "--benchmark", "pinned"],
            f"hashes to {actual}, the catalog expects {'f' * 64}",
        ),
        (
            ["models:/morphmlp/1", "--benchmark", "16-frames"],
            "asks for 16 frames but morphmlp v1 is built for 8",
        ),
        (["models:/morphmlp/1", "--benchmark", "other-classes"], "no class name in common"),
        (["models:/morphmlp/1", "--index", bench_index, "--crops", "2"], "crops: 2 is not allowed"),
        (
            ["models:/morphmlp/1", "--benchmark", "pinned", "--clips", "4"],
            "--clips apply to --index",
        ),
    ]
    for argv, message in cases:
        assert evaluate.main([*argv, "--catalog", catalog]) == 2, argv
        err = capsys.readouterr().err
        errors = error_lines(err)
        assert len(errors) == 1 and message in errors[0], (argv, err)
    assert _eval_runs(store) == []  # nothing started


# ---------------------------------------------------------------------------------------------
# Evaluation and re-evaluation on the session's Ray


@pytest.mark.slow
def test_multiview_scores_equal_softmax_averaged_by_hand(store, bench_index, ray_session, tmp_path):
    from morphmlp.data.pipeline import build_eval_dataset
    from morphmlp.data.transforms import normalize

    tiny = _subset(bench_index, [0, 3], str(tmp_path / "tiny.parquet"))
    out = str(tmp_path / "report")
    argv = [
        "--model-version",
        "1",
        "--index",
        tiny,
        "--clips",
        "2",
        "--crops",
        "3",
        "--output",
        out,
    ]
    assert load_job("evaluate").main(argv) == 0
    predictions = pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist()

    # By hand: the same 2 clips x 3 crops of each video, v1's network, softmax per view, mean.
    ckpt = model_refs.load("models:/morphmlp/1")
    model = create_model("xs", num_classes=6)
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    cfg = dataclasses.replace(_demo_data(), test_num_clips=2, test_num_crops=3)
    index = read_index(tiny)
    rows = build_eval_dataset(index, cfg, num_clips=2, num_crops=3).take_all()
    assert len(rows) == 2 * 6
    by_video: dict[int, list[np.ndarray]] = {}
    with torch.no_grad():
        for row in rows:
            clip = torch.tensor(row["clip"])[None]
            probs = model(normalize(clip, cfg.mean, cfg.std)).softmax(dim=1)[0].numpy()
            by_video.setdefault(int(row["video"]), []).append(probs)
    uris = index.table["uri"].to_pylist()
    assert len(predictions) == 2
    for video, views in by_video.items():
        mean = np.mean(views, axis=0)
        row = next(p for p in predictions if p["video"] == uris[video])
        assert row["num_views"] == 6
        assert row["predicted"] == int(mean.argmax())
        assert row["top5"] == np.argsort(-mean, kind="stable")[:5].tolist()
        assert row["score"] == pytest.approx(float(mean.max()), abs=1e-5)
        assert row["label"] == index.table["label"][video].as_py()
    for name in ("confusion_matrix.png", "per_class_accuracy.csv", "metrics.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    (run,) = _eval_runs(store)
    assert run.info.status == "FINISHED" and run.data.tags["model_version"] == "1"
    assert run.data.tags["benchmark_hash"] == index.content_hash()
    assert run.data.tags["protocol_hash"] == Protocol(clips=2, crops=3).content_hash()
    assert run.data.metrics["views_per_video"] == 6


@pytest.mark.slow
def test_unreadable_videos_fail_the_pair_and_exit_code(
    store, bench_index, ray_session, tmp_path, capsys
):
    # One of three videos is gone since the index was made: 33% > max_bad_fraction (1%).
    table = read_index(bench_index).table.take([0, 1, 2])
    uris = table["uri"].to_pylist()
    uris[2] = str(tmp_path / "deleted.mp4")
    table = table.set_column(table.column_names.index("uri"), "uri", pa.array(uris))
    broken = str(tmp_path / "broken.parquet")
    write_index(VideoIndex(table, CLASS_NAMES), None, broken)
    catalog = _write_catalog(tmp_path / "catalog.yaml", [{"name": "broken", "index": broken}])
    argv = ["--catalog", catalog, "--output", str(tmp_path / "board"), "--versions", "1"]
    assert load_job("reevaluate").main(argv) == 1  # the other pairs would still have run
    printed = capsys.readouterr().out
    assert "FAILED: v1 on broken: BadDataError: 1 of 3 videos" in printed
    (run,) = _eval_runs(store)
    assert run.info.status == "FAILED"
    local = mlflow.MlflowClient(store).download_artifacts(
        run.info.run_id, "bad_data.csv", str(tmp_path)
    )
    report = _read(local)
    assert "deleted.mp4" in report and "missing" in report
    # A failed run is no result: the leaderboard still shows the pair as pending.
    assert "| v1 | xs 8x112² seed0 | pending |" in _read(tmp_path / "board" / "leaderboard.md")


@pytest.mark.slow
def test_reevaluation_scores_only_missing_pairs(store, bench_index, ray_session, tmp_path, capsys):
    reevaluate = load_job("reevaluate")
    out = str(tmp_path / "board")
    a = {"name": "a", "index": bench_index}
    b = {"name": "b", "index": bench_index, "protocol": {"crops": 3, "sampling": "segment"}}
    catalog = _write_catalog(tmp_path / "catalog.yaml", [a, b])
    argv = ["--catalog", catalog, "--output", out]

    # Two checkpoints x two benchmarks.
    assert reevaluate.main(argv) == 0
    runs = _eval_runs(store)
    assert _pairs(runs) == [("1", "a"), ("1", "b"), ("2", "a"), ("2", "b")]
    assert all(0 <= r.data.metrics["top1"] <= r.data.metrics["top5"] <= 1 for r in runs)
    board = _read(os.path.join(out, "leaderboard.md"))
    assert "| version | model | a | b | mean |" in board
    assert "| v1 | xs 8x112² seed0 |" in board and "| v2 | xs 8x112² seed1 |" in board
    assert "<table>" in _read(os.path.join(out, "leaderboard.html"))

    # Nothing new: nothing runs, and the leaderboard in MLflow is not logged again.
    capsys.readouterr()
    assert reevaluate.main(argv) == 0
    assert "nothing to do: 4 pairs already have results" in capsys.readouterr().out
    assert len(_eval_runs(store)) == 4

    # An unknown version or benchmark stops the job before any work, naming what exists.
    assert reevaluate.main([*argv, "--versions", "abc"]) == 2
    assert "'abc' is not a registered version of morphmlp (registered: 1, 2)" in (
        capsys.readouterr().err
    )
    assert reevaluate.main([*argv, "--promote", "nope"]) == 2
    assert "'nope' is not a benchmark of the catalog (a, b)" in capsys.readouterr().err
    assert len(_eval_runs(store)) == 4
    # --promote moves `champion` to the best version on that benchmark.
    top1 = {
        r.data.tags["model_version"]: r.data.metrics["top1"]
        for r in runs
        if r.data.tags["benchmark"] == "b"
    }
    best = max(top1, key=lambda v: (top1[v], int(v)))
    assert reevaluate.main([*argv, "--promote", "b"]) == 0
    assert f"champion: morphmlp@champion -> v{best}" in capsys.readouterr().out
    champion = mlflow.MlflowClient(store).get_model_version_by_alias("morphmlp", "champion")
    assert str(champion.version) == best

    # A third benchmark with a partial label overlap runs only its pairs; benchmarks that can't
    # be scored are reported one line each: no shared class and frames the network isn't built
    # for are recorded as skipped; an index that changed under its pinned hash is not recorded.
    c = {"name": "c", "index": bench_index, "class_names": RENAMED}
    d = {"name": "d", "index": bench_index, "class_names": UNRELATED}
    e = {"name": "e", "index": bench_index, "content_hash": "0" * 64}
    f = {"name": "f", "index": bench_index, "protocol": {"frames": 16}}
    _write_catalog(tmp_path / "catalog.yaml", [a, b, c, d, e, f])
    assert reevaluate.main(argv) == 0
    printed = capsys.readouterr().out
    runs = _eval_runs(store)
    assert _pairs(runs) == [("1", "a"), ("1", "b"), ("1", "c"), ("2", "a"), ("2", "b"), ("2", "c")]
    assert _pairs(runs, "skipped") == [("1", "d"), ("1", "f"), ("2", "d"), ("2", "f")]
    assert not [r for r in runs if r.data.tags["benchmark"] == "e"]
    assert printed.count("skipped (recorded): ") == 4 and "no class name in common" in printed
    assert "asks for 16 frames" in printed
    assert "not evaluated: benchmark e: " in printed and "0" * 64 in printed
    partial = [r for r in runs if r.data.tags["benchmark"] == "c"]
    for run in partial:
        assert run.data.tags["label_overlap"] == "partial"
        assert run.data.tags["shared_classes"] == "4"
        assert run.data.metrics["num_videos"] == 4  # the two rotation videos are left out
        assert run.data.metrics["videos_outside_shared_classes"] == 2
    local = mlflow.MlflowClient(store).download_artifacts(
        partial[0].info.run_id, "predictions.parquet", str(tmp_path)
    )
    predictions = pq.read_table(local).to_pylist()
    shared = {"move_left", "move_right", "grow", "shrink"}
    assert {p["label_name"] for p in predictions} == shared
    assert all(set(p["top5_names"]) == shared for p in predictions)  # argmax over shared only
    board = _read(os.path.join(out, "leaderboard.md"))
    assert "| a | b | c | d | f | mean |" in board and "benchmark e left out" in board
    assert "† (4/6)" in board and "n/a" in board

    # Skips are results too: a fourth run does nothing.
    assert reevaluate.main(argv) == 0
    assert "nothing to do: 10 pairs already have results" in capsys.readouterr().out


@pytest.mark.slow
def test_killed_reevaluation_rerun_completes_what_is_missing(
    store, bench_index, ray_session, tmp_path, capsys
):
    reevaluate = load_job("reevaluate")
    index = _subset(bench_index, [0, 1, 2, 3], str(tmp_path / "bench.parquet"))
    catalog = _write_catalog(tmp_path / "catalog.yaml", [{"name": "a", "index": index}])
    argv = ["--catalog", catalog, "--output", str(tmp_path / "board")]
    # The job joins the session's cluster and is killed once its first pair has finished.
    command = [sys.executable, os.path.join(ROOT, "jobs", "reevaluate.py"), *argv]
    command += ["--address", ray_session.get_runtime_context().gcs_address]
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while job.poll() is None and time.monotonic() < deadline:
            if _pairs(_eval_runs(store)):
                job.send_signal(signal.SIGKILL)
                break
            time.sleep(0.3)
    assert job.wait(timeout=30) == -signal.SIGKILL, _read(tmp_path / "killed.log")
    (done,) = _pairs(_eval_runs(store))

    assert reevaluate.main(argv) == 0
    runs = _eval_runs(store)
    assert _pairs(runs) == [("1", "a"), ("2", "a")]
    assert (
        sum(r.data.tags["model_version"] == done[0] for r in runs if r.info.status == "FINISHED")
        == 1
    )
    assert f"evaluated: v{3 - int(done[0])} on a" in capsys.readouterr().out

    # The benchmark's videos change: its new hash has no results, so it is evaluated again.
    old_hash = runs[0].data.tags["benchmark_hash"]
    _subset(bench_index, [0, 1, 2], index)
    assert reevaluate.main([*argv, "--versions", "1"]) == 0
    fresh = [r for r in _eval_runs(store) if r.data.tags["benchmark_hash"] != old_hash]
    assert _pairs(fresh) == [("1", "a")] and fresh[0].data.metrics["num_videos"] == 3
    board = _read(tmp_path / "board" / "leaderboard.md")
    assert "| v2 | xs 8x112² seed1 | pending |" in board
