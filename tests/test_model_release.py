"""Faithfulness to the reference release (github MTLab/MorphMLP): outputs, names, shapes, costs.

tests/fixtures/model/ holds data produced by running the release's own code (see its README):
logits for a fixed input under deterministic weights, and the release's state-dict listing.
The weights below are a pure function of each tensor's name, so any implementation with the
release's parameter names gets the same values whatever order it creates them in.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from morphmlp.config import from_dict
from morphmlp.models import (
    MorphMLPConfig,
    build_model,
    count_gmacs,
    count_params,
    create_model,
    load_checkpoint,
    variant_config,
)

FIXTURES = Path(__file__).parent / "fixtures" / "model"


def deterministic_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Values for state-dict entry `name`: seeded by the name, scaled by the kind of tensor."""
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand(shape, generator=generator)
    if name.endswith("running_var"):
        return 0.5 + uniform
    noise = (2 * uniform - 1) * math.sqrt(3)  # zero mean, unit variance
    if name.endswith("running_mean"):
        return 0.1 * noise
    if name.endswith("bias"):
        return 0.02 * noise
    if len(shape) == 1:  # norm weights
        return 1 + 0.1 * noise
    return noise / math.sqrt(math.prod(shape[1:]))  # keeps activations at unit scale


def deterministic_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: deterministic_tensor(name, tuple(t.shape))
        for name, t in model.state_dict().items()
        if not name.endswith("num_batches_tracked")
    }


def deterministic_input(num_frames: int, img_size: int = 224, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    uniform = torch.rand((1, 3, num_frames, img_size, img_size), generator=generator)
    return (2 * uniform - 1) * math.sqrt(3)


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


@pytest.mark.parametrize(
    "key",
    # 224²: S and B at 16 and 32 frames; then a small 16-frame model whose chunks straddle rows
    # unevenly (8 of a 28-wide plane) and whose last stage takes every 8th token (2 of 16).
    ["s16", "b16", "s32", "b32", "small16_unaligned_strided"],
)
def test_outputs_equal_the_release(key):
    fixture = _fixture("release_logits.json")
    case = fixture["cases"][key]
    cfg = from_dict(MorphMLPConfig, case["config"])
    model = build_model(cfg).eval()
    load_checkpoint(model, deterministic_state(model), strict=True)
    x = deterministic_input(cfg.num_frames, cfg.img_size, fixture["input_seed"])
    with torch.no_grad():
        logits = model(x)[0]
    reference = torch.tensor(case["logits"])
    assert reference.std() > 0.1  # the fixture carries signal, not near-zero logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("key", ["s16", "b32"])
def test_names_and_shapes_equal_the_release(key):
    release = _fixture("release_state_shapes.json")["shapes"][key]
    variant, frames = key[0], int(key[1:])
    with torch.device("meta"):
        model = create_model(variant, num_frames=frames)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    assert sorted(ours) == sorted(release)
    assert ours == release


@pytest.mark.parametrize(
    ("variant", "params_m", "gmacs"),
    [("s", 47.04, 66.0), ("b", 67.78, 97.4)],  # measured on the release's code, 16x224², 400 cls
)
def test_params_and_gmacs_match_the_release(variant, params_m, gmacs):
    cfg = variant_config(variant, num_frames=16, img_size=224, num_classes=400)
    assert count_params(cfg) / 1e6 == pytest.approx(params_m, rel=0.005)
    assert count_gmacs(cfg) == pytest.approx(gmacs, rel=0.005)
