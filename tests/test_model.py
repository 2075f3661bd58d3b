"""The MorphMLP network: every variant trains, the token mixing means what the paper says,
bad configurations fail at construction, and the training conveniences really work."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from morphmlp.errors import ConfigError
from morphmlp.models import (
    MorphMLPConfig,
    build_model,
    create_model,
    default_temporal_groups,
    list_models,
    load_variant_file,
    save_variant_file,
    stage_grids,
    valid_chunk_lengths,
    variant_config,
)
from morphmlp.models.morphmlp import MorphFCs, MorphFCt
from morphmlp.models.weights import load_checkpoint

# A small but complete architecture: four stages, every branch, planes 12², 6², 3², 2².
TINY = MorphMLPConfig(
    depths=(1, 1, 1, 1),
    widths=(12, 24, 24, 32),
    chunk_lengths=(6, 12, 3, 4),
    num_frames=4,
    img_size=48,
    num_classes=5,
    drop_path_rate=0.1,
)


def _clip(cfg: MorphMLPConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
    if not cfg.is_image:
        shape = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
    return torch.randn((batch, *shape), generator=generator)


# s and b keep their chunk lengths, which fit only 224² (7x7 last plane); 4 frames keep them
# cheap while the temporal branch still mixes 2 tokens.
SMALL = {"morphmlp_xs": {}, "morphmlp_s": {"num_frames": 4}, "morphmlp_b": {"num_frames": 4}}


@pytest.mark.parametrize("name", list_models())
def test_every_variant_trains(name):
    overrides = SMALL.get(name.removesuffix("_image"), {})
    size = {} if name.endswith("_image") else overrides
    # no drop path: it may drop a whole residual branch, and with it that branch's gradients
    model = create_model(name, num_classes=3, drop_path_rate=0.0, **size)
    # Randomise the temporal FC: both inits (see MorphMLPConfig.temporal_init) start it at zero,
    # where one of its two weights gets no gradient.
    for module in model.modules():
        if isinstance(module, MorphFCt):
            torch.nn.init.normal_(module.mlp_t.weight, std=0.02)
            torch.nn.init.normal_(module.proj.weight, std=0.02)
    x = _clip(model.cfg, batch=1 if "_b" in name else 2)
    logits = model(x)
    assert logits.shape == (x.shape[0], 3)
    torch.nn.functional.cross_entropy(logits, torch.zeros(x.shape[0], dtype=torch.long)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} got an all-zero gradient"


# --- the token mixing, checked against plain index arithmetic --------------------------------


def _chunk_fc_reference(x, fc, order, length):
    """Gather tokens in `order`, cut into chunks of `length`, apply fc per (chunk, channel
    group) to the concatenated (token, channel) features, scatter back."""
    b, t, h, w, c = x.shape
    per_group = c // length
    tokens = x.reshape(b, t, h * w, c)
    out = torch.empty_like(tokens)
    for start in range(0, h * w, length):
        idx = torch.tensor(order[start : start + length])
        for g in range(length):
            channels = slice(g * per_group, (g + 1) * per_group)
            features = tokens[:, :, idx, channels].reshape(b, t, length * per_group)
            out[:, :, idx, channels] = fc(features).reshape(b, t, length, per_group)
    return out.reshape(b, t, h, w, c)


def _morph_fc_s_reference(m: MorphFCs, x: torch.Tensor, length: int, last: bool) -> torch.Tensor:
    b, _, h, w, c = x.shape
    row_major = list(range(h * w))
    column_major = [r * w + col for col in range(w) for r in range(h)]
    if last:  # chunk j = tokens j, j + HW/L, j + 2HW/L, ...
        stride = h * w // length
        strided = [i * stride + j for j in range(stride) for i in range(length)]
        branches = [_chunk_fc_reference(x, m.mlp_h, strided, length), m.mlp_c(x)]
    else:
        branches = [
            _chunk_fc_reference(x, m.mlp_h, column_major, length),
            _chunk_fc_reference(x, m.mlp_w, row_major, length),
            m.mlp_c(x),
        ]
    pooled = sum(branches).mean(dim=(1, 2, 3))
    weights = m.reweight(pooled).reshape(b, c, len(branches)).softmax(-1)
    mixed = sum(br * weights[:, None, None, None, :, k] for k, br in enumerate(branches))
    return m.proj(mixed)


@pytest.mark.parametrize(
    ("plane", "length", "last"),
    [
        ((6, 6), 3, False),  # a chunk is part of a row and part of a column
        ((6, 6), 12, False),  # a chunk is two whole rows / columns
        ((6, 6), 4, False),  # chunks straddle rows and columns unevenly
        ((4, 6), 8, False),  # non-square plane
        ((3, 3), 9, True),  # last stage, chunk = whole plane
        ((4, 4), 4, True),  # last stage, strided chunks
    ],
)
def test_spatial_mixing_matches_index_reference(plane, length, last):
    torch.manual_seed(0)
    m = MorphFCs(72, plane, length, bias=True, last=last)
    x = torch.randn(2, 3, *plane, 72)
    expected = _morph_fc_s_reference(m, x, length, last)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("frames", "groups"), [(4, 4), (4, 3), (3, 6)])
def test_temporal_mixing_matches_index_reference(frames, groups):
    torch.manual_seed(0)
    m = MorphFCt(12, (frames, 2, 3), groups, bias=True)
    x = torch.randn(2, frames, 2, 3, 12)
    per_group = 12 // groups
    expected = torch.empty_like(x)
    for g in range(groups):  # all T frames of a group at one location form the features
        channels = slice(g * per_group, (g + 1) * per_group)
        features = x[..., channels].permute(0, 2, 3, 1, 4).reshape(2, 2, 3, frames * per_group)
        mixed = m.mlp_t(features).reshape(2, 2, 3, frames, per_group).permute(0, 3, 1, 2, 4)
        expected[..., channels] = mixed
    torch.testing.assert_close(m(x), m.proj(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["release", "zero_proj"])
def test_temporal_inits_make_blocks_start_spatial_only(init):
    model = build_model(dataclasses.replace(TINY, temporal_init=init)).eval()
    x = torch.randn(1, 4, 12, 12, 12)
    block = model.blocks1[0]
    assert torch.count_nonzero(block.t_fc(block.t_norm1(x))) == 0
    assert torch.all(block.t_fc.proj.weight == (1 if init == "release" else 0))


def test_the_temporal_init_changes_no_output_at_init():
    # Both inits draw every weight in the same order, then set MorphFC_t so that it outputs 0:
    # from one seed the two networks compute the same function, bit for bit, and so do two
    # networks inflated from one image checkpoint (whose outputs inflation keeps).
    x = _clip(TINY)
    image = build_model(dataclasses.replace(TINY, num_frames=1))
    torch.nn.init.normal_(image.blocks1[0].fc.proj.weight)  # not an init either model has
    logits = {}
    for init in ("release", "zero_proj"):
        cfg = dataclasses.replace(TINY, temporal_init=init)
        torch.manual_seed(0)
        scratch = build_model(cfg).eval()
        inflated = build_model(cfg).eval()
        load_checkpoint(inflated, image.state_dict(), inflate="center")
        with torch.no_grad():
            logits[init] = (scratch(x), inflated(x))
    assert torch.equal(logits["release"][0], logits["zero_proj"][0])
    assert torch.equal(logits["release"][1], logits["zero_proj"][1])
    assert not torch.equal(logits["zero_proj"][0], logits["zero_proj"][1])


def _temporal_gradients(init: str, steps: int = 2) -> list[dict[str, list[float]]]:
    """Per step of AdamW (the training optimizer), the largest |gradient| of mlp_t and of proj in
    every MorphFC_t of the network."""
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(TINY, temporal_init=init, drop_path_rate=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = _clip(TINY, batch=4, seed=1), torch.tensor([0, 1, 2, 3])
    branches = [m for m in model.modules() if isinstance(m, MorphFCt)]
    steps_seen = []
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        steps_seen.append(
            {
                name: [getattr(m, name).weight.grad.abs().max().item() for m in branches]
                for name in ("mlp_t", "proj")
            }
        )
        optimizer.step()
    return steps_seen


def test_only_zero_proj_gives_the_temporal_branch_a_gradient_at_init():
    # The release's init: a change of mlp_t moves all channels of proj's output alike (proj = 1),
    # which the spatial branch's LayerNorm removes, so mlp_t's gradient is float noise, and
    # proj's is zero (its input mlp_t(x) is 0). zero_proj: proj gets a real gradient at once,
    # mlp_t (exactly 0 while proj = 0) from the second step on. In every block.
    release, zero_proj = _temporal_gradients("release"), _temporal_gradients("zero_proj")
    noise = [max(step["mlp_t"]) for step in release]  # 1e-11 measured
    assert max(release[0]["proj"]) == 0
    assert max(zero_proj[0]["mlp_t"]) == 0
    assert min(zero_proj[0]["proj"]) > 1e3 * noise[0], (zero_proj, release)  # 4e-6 measured
    assert min(zero_proj[1]["mlp_t"]) > 1e3 * noise[1], (zero_proj, release)  # 3e-7 measured


def test_training_starts_from_the_init_that_learns():
    # Training from scratch or from inflated image weights builds the variant as registered;
    # a trained checkpoint (the release's, tests/test_model_release.py) replaces MorphFC_t.
    assert MorphMLPConfig().temporal_init == "zero_proj"
    for name in list_models():
        assert variant_config(name).temporal_init == "zero_proj", name


# --- configuration ----------------------------------------------------------------------------


def test_release_rules_for_temporal_groups_and_grids():
    assert stage_grids(224, 16) == [(8, 56, 56), (8, 28, 28), (8, 14, 14), (8, 7, 7)]
    assert stage_grids(112, 8) == [(4, 28, 28), (4, 14, 14), (4, 7, 7), (4, 4, 4)]
    assert variant_config("s", num_frames=16).resolved_temporal_groups == (8, 8, 8, 8)
    # 32 frames: 16 groups, except 392 channels (not divisible by 16): 14 groups, FC 448 wide
    assert variant_config("b", num_frames=32).resolved_temporal_groups == (16, 16, 14, 16)
    assert default_temporal_groups(16, 392) == 14
    model = create_model("s", num_frames=32)
    assert model.blocks3[0].t_fc.mlp_t.weight.shape == (448, 448)
    assert valid_chunk_lengths(49, 392) == [1, 7, 49]


def test_xs_fits_the_demo_budget():
    from morphmlp.models import count_gmacs, count_params

    cfg = variant_config("xs")
    assert (cfg.num_frames, cfg.img_size) == (8, 112)
    assert cfg.grids[0][0] == 4  # 8 frames -> 4 temporal tokens for MorphFC_t to mix
    assert count_params(cfg) < 2e6
    assert count_gmacs(cfg) < 0.25


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        (
            "s",
            {"img_size": 112},
            "stage 3: chunk length 28 must divide the 7×7=49-token plane (img_size 112) and "
            "width 392; valid chunk lengths here: 1, 7, 49",
        ),
        ("xs", {"chunk_lengths": (14, 28, 7, 3)}, "stage 4: chunk length 3 must divide"),
        ("xs", {"temporal_groups": (4, 4, 5, 4)}, "stage 3: temporal groups 5 must divide"),
        ("xs", {"widths": (28, 56, 112)}, "widths: 3 values for 4 stages"),
        ("xs", {"depths": (1, 0, 1, 1)}, "stage 2: depth 0 must be positive"),
        ("xs", {"num_frames": 0}, "num_frames: 0 must be at least 1"),
        ("xs", {"drop_path_rate": 1.5}, "drop_path_rate: 1.5 must be in [0, 1)"),
        ("xs", {"mlp_ratio": "wide"}, "mlp_ratio: expected a number, got 'wide'"),
        ("xs", {"colour": 3}, "unknown config key 'morphmlp_xs.colour'"),
        ("xs", {"temporal_init": "ones"}, "temporal_init: 'ones'; choose one of release, zero"),
    ],
)
def test_invalid_configurations_fail_at_construction(name, overrides, message):
    with pytest.raises(ConfigError) as err:
        create_model(name, **overrides)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown MorphMLP variant 'morphmlp_l'") as err:
        create_model("morphmlp_l")
    for name in list_models():
        assert name in str(err.value)


def test_input_of_the_wrong_shape_is_named():
    model = build_model(TINY)
    with pytest.raises(ValueError, match=r"expected \(B, C, T, H, W\) = \(B, 3, 4, 48, 48\)"):
        model(torch.randn(1, 3, 8, 48, 48))


def test_variant_file_round_trip(tmp_path):
    cfg = dataclasses.replace(TINY, temporal_groups=(2, 4, 3, 8))
    path = str(tmp_path / "variant.yaml")
    save_variant_file(cfg, path)
    assert load_variant_file(path) == cfg
    assert load_variant_file(f"file://{path}") == cfg

    (tmp_path / "based.yaml").write_text("variant: xs\nnum_classes: 6\n")
    assert load_variant_file(str(tmp_path / "based.yaml")) == variant_config("xs", num_classes=6)

    (tmp_path / "bad.yaml").write_text("variant: xs\nchunk_lengths: [14, 28, 28, 16]\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: .*stage 3: chunk length 28"):
        load_variant_file(str(tmp_path / "bad.yaml"))


# --- API ---------------------------------------------------------------------------------------


def test_create_model_api():
    assert {"morphmlp_xs", "morphmlp_s", "morphmlp_b", "morphmlp_s_image"} <= set(list_models())
    assert create_model("xs").cfg == create_model("morphmlp_xs").cfg
    model = create_model("xs", num_classes=7, num_frames=16, drop_path_rate=0.2, mlp_ratio=2.0)
    assert (model.cfg.num_classes, model.cfg.num_frames, model.cfg.mlp_ratio) == (7, 16, 2.0)
    assert model.blocks4[0].drop_path.p == pytest.approx(0.2)  # linear up to the last block
    assert create_model("s_image").cfg.num_classes == 1000

    model = build_model(TINY).eval()
    x = _clip(TINY)
    features = model.forward_features(x)
    assert features.shape == (2, 2, 2, 2, 32)
    pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(model(x), model.head(pooled))

    model.reset_classifier(11)
    assert model(x).shape == (2, 11) and model.cfg.num_classes == 11
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)

    no_decay = model.no_weight_decay()
    assert "blocks1.0.norm1.weight" in no_decay and "blocks1.0.fc.mlp_h.bias" in no_decay
    assert "blocks1.0.fc.mlp_h.weight" not in no_decay


def test_image_variant_takes_images():
    cfg = variant_config("xs_image", num_classes=4)
    model = build_model(cfg)
    assert model.patch_embed1.proj1.weight.ndim == 4
    assert not any("t_fc" in name for name, _ in model.named_parameters())
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 4)


# --- training conveniences ---------------------------------------------------------------------


def _gradients(model, x, checkpointing):
    model.set_grad_checkpointing(checkpointing)
    model.zero_grad()
    torch.manual_seed(1)  # same drop-path masks in both runs
    model(x).logsumexp(-1).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_grad_checkpointing_gives_the_same_gradients():
    model = build_model(TINY).train()
    x = _clip(TINY)
    plain = _gradients(model, x, checkpointing=False)
    checkpointed = _gradients(model, x, checkpointing=True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


_PEAK_MEMORY = textwrap.dedent(
    """
    import json, pathlib, sys, torch
    from morphmlp.models import create_model

    def status_kib(field):
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
        return int(line.split()[1])

    torch.set_num_threads(1)
    # deep enough that stored block activations, not the stem, dominate
    model = create_model("xs", num_classes=6, depths=(4, 4, 4, 2))
    model.set_grad_checkpointing(sys.argv[1] == "on")
    x = torch.randn(8, 3, 8, 112, 112)
    model(x[:1]).sum().backward()  # one-time buffers (kernel caches, thread pools) first
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak-resident mark
    before = status_kib("VmRSS")
    model(x).sum().backward()
    print(json.dumps({"peak_growth_kib": status_kib("VmHWM") - before}))
    """
)


def _peak_growth_kib(checkpointing: str) -> int:
    # A fixed mmap threshold makes glibc return freed activations to the system at once, so the
    # process's peak resident size follows the live tensors rather than heap fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_MEMORY, checkpointing],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_kib"]


def test_grad_checkpointing_lowers_peak_memory():
    # Growth of a fresh process's peak resident memory over one training step of 8 clips.
    plain, checkpointed = _peak_growth_kib("off"), _peak_growth_kib("on")
    assert checkpointed < 0.5 * plain, (plain, checkpointed)


def test_compiles_as_one_graph():
    model = build_model(TINY).train()
    x = _clip(TINY)
    torch.manual_seed(0)
    expected = model(x)
    # fullgraph=True raises on any graph break; aot_eager also traces the backward graph.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(0)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters())


def test_bf16_autocast():
    model = create_model("xs", num_classes=6).eval()
    x = _clip(model.cfg)
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low).all()
    similarity = torch.nn.functional.cosine_similarity(low.float(), reference, dim=-1)
    assert similarity.min() > 0.98
