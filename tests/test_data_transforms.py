"""Worker-side batch transforms: normalisation, random erasing (one box per clip, all frames),
Mixup/CutMix with label smoothing (the release's timm parameters)."""

import math

import pytest
import torch

from morphmlp.data.transforms import mixup_cutmix, normalize, random_erasing


def test_normalize_to_channels_first_float():
    clips = torch.full((2, 4, 8, 10, 3), 255, dtype=torch.uint8)
    clips[..., 1] = 0
    x = normalize(clips, (0.5, 0.5, 0.5), (0.25, 0.5, 0.25))
    assert x.shape == (2, 3, 4, 8, 10) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.tensor(2.0)) and torch.allclose(
        x[:, 1], torch.tensor(-1.0)
    )
    with pytest.raises(ValueError, match=r"uint8 clips of shape \(B, T, H, W, 3\)"):
        normalize(clips.float(), (0.5,) * 3, (0.5,) * 3)


def test_random_erasing_one_box_per_clip_shared_by_frames():
    x = torch.zeros(4, 3, 5, 32, 40)
    random_erasing(x, 1.0, torch.Generator().manual_seed(0))
    for clip in x:
        changed = clip.abs().sum(dim=0) > 0  # (T, H, W)
        assert all(torch.equal(changed[0], frame) for frame in changed[1:])
        rows, cols = changed[0].any(dim=1).nonzero(), changed[0].any(dim=0).nonzero()
        box = changed[0][rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()  # a filled rectangle
        area = box.numel() / (32 * 40)
        assert 0.02 * 0.9 <= area <= 1 / 3 * 1.1
        assert not torch.equal(clip[:, 0], clip[:, 1])  # per-pixel noise differs per frame
    untouched = torch.zeros(4, 3, 5, 32, 40)
    random_erasing(untouched, 0.0)
    assert not untouched.any()


def test_mixup_blends_with_the_reversed_batch():
    x = torch.arange(4.0).view(4, 1, 1, 1, 1).repeat(1, 3, 2, 4, 4)
    labels = torch.tensor([0, 1, 2, 3])
    gen = torch.Generator().manual_seed(0)
    mixed, target = mixup_cutmix(
        x.clone(), labels, 5, cutmix_alpha=0.0, label_smoothing=0.0, generator=gen
    )
    lam = float(target[0, 0])
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0))
    assert torch.allclose(target[0, 3], torch.tensor(1 - lam))
    assert torch.allclose(target.sum(1), torch.ones(4))


def test_cutmix_pastes_one_box_on_every_frame_and_corrects_lambda():
    x = torch.arange(4.0).view(4, 1, 1, 1, 1).repeat(1, 3, 2, 16, 16)
    labels = torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        mixed, target = mixup_cutmix(
            x.clone(), labels, 4, mixup_alpha=0.0, label_smoothing=0.0, generator=gen
        )
        pasted = mixed[0] != 0  # sample 0 receives sample 3's pixels inside the box
        assert torch.equal(pasted[:, 0], pasted[:, 1])
        lam = 1 - pasted[0, 0].float().mean().item()
        assert math.isclose(float(target[0, 0]), lam, abs_tol=1e-6)


def test_label_smoothing_without_mixing():
    x = torch.zeros(2, 3, 1, 4, 4)
    _, target = mixup_cutmix(x, torch.tensor([1, 0]), 10, prob=0.0, label_smoothing=0.1)
    assert torch.allclose(target[0, 1], torch.tensor(0.91)) and torch.allclose(
        target[0, 0], torch.tensor(0.01)
    )
