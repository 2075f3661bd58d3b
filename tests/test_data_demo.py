"""The built-in demo dataset: valid index, varied real H.264 videos, deterministic by seed,
generated once (atomically) into the cache."""

import hashlib
import os

import numpy as np
import pytest

from morphmlp.data.decode import decode_frames
from morphmlp.data.demo import (
    CLASS_NAMES,
    DEMO_FLIP_LABEL_MAP,
    DEMO_VERSION,
    ensure_demo_dataset,
)
from morphmlp.data.index import read_index


def _digests(index):
    return {
        os.path.relpath(u, os.path.dirname(index.uri)): hashlib.sha256(
            open(u, "rb").read()
        ).hexdigest()
        for u in index.table["uri"].to_pylist()
    }


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return ensure_demo_dataset(
        str(tmp_path_factory.mktemp("a")), train_per_class=3, val_per_class=1
    )


def test_index_classes_splits_and_variety(small_demo):
    index = read_index(small_demo)
    assert index.class_names == CLASS_NAMES
    assert len(index.split("train")) == 18 and len(index.split("val")) == 6
    rows = index.table.to_pylist()
    assert {r["codec"] for r in rows} == {"h264"}
    assert all(112 <= min(r["width"], r["height"]) <= 160 for r in rows)
    assert all(1.4 <= r["duration_sec"] <= 4.1 for r in rows)
    assert len({r["fps"] for r in rows}) > 2 and len({(r["width"], r["height"]) for r in rows}) > 2
    assert sorted(set(index.split("val").table["label"].to_pylist())) == list(range(6))
    frames = decode_frames(rows[0]["uri"], [0, rows[0]["num_frames"] - 1])
    assert (frames[0] != frames[1]).any()  # it moves


def test_deterministic_by_seed_and_generated_once(small_demo, tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHMLP_CACHE", str(tmp_path))  # the default cache location
    again = ensure_demo_dataset(train_per_class=3, val_per_class=1)
    assert again == str(tmp_path / f"demo-{DEMO_VERSION}-seed0-3x1" / "index.parquet")
    assert _digests(read_index(again)) == _digests(read_index(small_demo))
    mtime = os.path.getmtime(again)
    assert ensure_demo_dataset(train_per_class=3, val_per_class=1) == again
    assert os.path.getmtime(again) == mtime  # cached, not regenerated
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p] == []  # built aside, then renamed
    other = ensure_demo_dataset(str(tmp_path), seed=1, train_per_class=3, val_per_class=1)
    assert _digests(read_index(other)) != _digests(read_index(again))


def test_demo_recipe_relabels_flips():
    from morphmlp.train.config import resolve_config

    cfg = resolve_config({}).data  # the embedded default: xs on the demo
    assert cfg.flip_label_map == DEMO_FLIP_LABEL_MAP and cfg.train_crop_size == 112
    names = {CLASS_NAMES[a]: CLASS_NAMES[b] for a, b in DEMO_FLIP_LABEL_MAP.items()}
    assert names == {
        "move_left": "move_right",
        "move_right": "move_left",
    }


def test_each_class_moves_as_named(small_demo):
    """The bright shape's centre moves the named way (left/right along x, up/down along y) and
    grow/shrink change its area: a swapped label or axis would fail."""
    moves = {"move_left": (-1, 0), "move_right": (1, 0), "move_up": (0, -1), "move_down": (0, 1)}
    for row in read_index(small_demo).split("train").table.to_pylist():
        name = CLASS_NAMES[row["label"]]
        frames = decode_frames(row["uri"], [0, row["num_frames"] - 1])
        shape = [np.nonzero(f.max(axis=2) > 150) for f in frames]  # the backgrounds are dim
        if name in moves:
            (y0, x0), (y1, x1) = ((ys.mean(), xs.mean()) for ys, xs in shape)
            shift = np.array([x1 - x0, y1 - y0]) / min(row["width"], row["height"])
            assert (np.sign(shift.round(1)) == moves[name]).all(), (row["uri"], name, shift)
        else:
            a0, a1 = (len(ys) for ys, _ in shape)
            assert (a1 > 1.5 * a0) == (name == "grow") and (a0 > 1.5 * a1) == (name == "shrink")
