"""Checkpoint loading (the release's layouts, strictness, head reset, URIs) and the inflation of
an image model's weights into a video model."""

from __future__ import annotations

import io

import pytest
import torch
from support import free_port

from morphmlp.errors import ConfigError, StorageError
from morphmlp.models import (
    CheckpointError,
    build_model,
    create_model,
    inflate_image_checkpoint,
    load_checkpoint,
    variant_config,
)


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and batch-norm statistic random, so a load that misses one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            noise = torch.rand(t.shape, generator=generator)
            t.copy_(noise + 0.5 if name.endswith("running_var") else 0.1 * (noise - 0.5))
    return model


def _xs(**overrides) -> torch.nn.Module:
    return build_model(variant_config("xs", **overrides)).eval()


def _clip(batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 112, 112, generator=torch.Generator().manual_seed(3))


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: sd,
        lambda sd: {"model_state": sd, "epoch": 3, "cfg": "MODEL: ..."},  # PySlowFast (release)
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "optimizer": {}},
        lambda sd: {"model_state": {f"module.{k}": v for k, v in sd.items()}},  # saved from DDP
    ],
    ids=["plain", "model_state", "model", "state_dict", "module_prefix"],
)
def test_loads_the_release_file_layouts(tmp_path, layout):
    source = _randomised(_xs())
    path = _save(layout(source.state_dict()), tmp_path / "ckpt.pyth")
    target = _xs()
    report = load_checkpoint(target, path)
    assert not report.head_reset
    x = _clip()
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_create_model_loads_a_checkpoint_from_a_file_uri(tmp_path):
    source = _randomised(_xs(num_classes=6))
    path = _save(source.state_dict(), tmp_path / "ckpt.pt")
    model = create_model("xs", num_classes=6, checkpoint=f"file://{path}").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_clip()), source(_clip()))


def test_a_different_class_count_resets_only_the_head(tmp_path):
    source = _randomised(_xs(num_classes=400))
    path = _save({"model_state": source.state_dict()}, tmp_path / "k400.pyth")
    target = _xs(num_classes=6)
    fresh_head = target.head.weight.clone()
    report = load_checkpoint(target, path)
    assert report.head_reset
    assert torch.equal(target.head.weight, fresh_head)
    with torch.no_grad():
        x = _clip()
        torch.testing.assert_close(
            target.forward_head(target.forward_features(x), pre_logits=True),
            source.forward_head(source.forward_features(x), pre_logits=True),
        )


def test_a_checkpoint_that_does_not_fit_is_an_error_listing_the_keys(tmp_path):
    # 16 frames give 7 temporal groups where 8 frames give 4: the temporal FCs change width,
    # the kind of mismatch the release's strict=False loading hid (MTLab/MorphMLP issue 4).
    other = _xs(num_frames=16, depths=(1, 1, 3, 1))
    path = _save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(_xs(), path)
    message = str(err.value)
    assert "other.pt does not fit the model" in message
    assert "unexpected keys: blocks3.2.t_norm1.weight" in message
    assert "mis-shaped keys: blocks1.0.t_fc.mlp_t.weight (checkpoint [32, 32], model [28, 28])" in (
        message
    )

    partial = {k: v for k, v in _xs().state_dict().items() if not k.startswith("blocks4.")}
    with pytest.raises(CheckpointError, match=r"missing keys: blocks4\.0\.t_norm1\.weight"):
        load_checkpoint(_xs(), partial)


def test_non_strict_loading_takes_what_fits():
    source = _randomised(_xs(num_frames=16))
    target = _xs()
    kept = target.blocks1[0].t_fc.mlp_t.weight.clone()
    report = load_checkpoint(target, source.state_dict(), strict=False)
    assert len(report.mis_shaped) == 2 and not report.missing and not report.unexpected
    assert torch.equal(target.blocks1[0].fc.mlp_h.weight, source.blocks1[0].fc.mlp_h.weight)
    assert torch.equal(target.blocks1[0].t_fc.mlp_t.weight, kept)


class _Payload:
    """Stands for arbitrary pickled code, which weights-only loading must refuse."""


def test_files_that_are_not_weights_are_refused(tmp_path):
    buffer = io.BytesIO()
    torch.save({"model_state": _Payload()}, buffer)
    (tmp_path / "code.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="not a readable weights-only torch checkpoint"):
        load_checkpoint(_xs(), str(tmp_path / "code.pt"))

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable"):
        load_checkpoint(_xs(), str(tmp_path / "junk.pt"))

    path = _save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="no state dict found: epoch, lr are not tensors"):
        load_checkpoint(_xs(), path)


# --- inflation ----------------------------------------------------------------------------------


def test_center_inflation_reproduces_the_image_model_on_a_static_video():
    image = _randomised(build_model(variant_config("xs_image", num_classes=6))).eval()
    video = _xs(num_classes=6)
    report = load_checkpoint(video, image.state_dict(), inflate="center")
    assert not report.head_reset
    frame = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(5))
    static = frame[:, :, None].expand(-1, -1, 8, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            video.forward_head(video.forward_features(static), pre_logits=True),
            image.forward_head(image.forward_features(frame), pre_logits=True),
            rtol=1e-5,
            atol=1e-5,
        )
        torch.testing.assert_close(video(static), image(frame), rtol=1e-5, atol=1e-5)


def test_mean_inflation_spreads_the_kernel_over_time():
    image = _randomised(build_model(variant_config("xs_image")))
    video = _xs()
    state = inflate_image_checkpoint(image.state_dict(), video, mode="mean")
    kernel_2d = image.state_dict()["patch_embed1.proj1.weight"]
    kernel_3d = state["patch_embed1.proj1.weight"]
    assert kernel_3d.shape == (14, 3, 3, 3, 3)
    torch.testing.assert_close(kernel_3d.sum(dim=2), kernel_2d)
    torch.testing.assert_close(kernel_3d[:, :, 0], kernel_3d[:, :, 2])
    load_checkpoint(video, state)  # complete and strict: the temporal branch came from `video`


def test_image_weights_into_a_video_model_need_an_inflation_mode():
    image = build_model(variant_config("xs_image"))
    with pytest.raises(CheckpointError, match="inflate='center' or 'mean'"):
        load_checkpoint(_xs(), image.state_dict())
    with pytest.raises(ConfigError, match="choose 'center' or 'mean'"):
        inflate_image_checkpoint(image.state_dict(), _xs(), mode="middle")


# --- object storage -----------------------------------------------------------------------------


@pytest.mark.slow
def test_loads_from_s3(tmp_path, monkeypatch):
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(key, value)
        source = _randomised(_xs())
        buffer = io.BytesIO()
        torch.save({"model_state": source.state_dict()}, buffer)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket="models")
        s3.put_object(Bucket="models", Key="xs/best.pyth", Body=buffer.getvalue())

        model = create_model("xs", checkpoint="s3://models/xs/best.pyth").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(_clip()), source(_clip()), rtol=0, atol=0)
        with pytest.raises(StorageError, match=r"s3://models/xs/missing\.pyth: no such file"):
            create_model("xs", checkpoint="s3://models/xs/missing.pyth")
    finally:
        server.stop()
