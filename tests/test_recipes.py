"""configs/*.yaml are the release's recipes: every value the release's config files set, field by
field, against the numbers transcribed below from github MTLab/MorphMLP at commit 62ebe80
(configs/K400/*.yaml, configs/SSV2/*.yaml and, for the test views, its README). Nothing is fetched
here: the release's values are written in this file, each table under the file it comes from.

Release keys with no counterpart here, and why:
- MORPH.PATCH_SIZE, MORPH.T_STRIDE, MODEL.DROPOUT_RATE: read by the release's model and never
  used (its PatchEmbed is fixed 3x3 stride-2 convs, MorphFC_T ignores the stride, the head has no
  dropout); MORPH.TRANSITIONS [True]*4 is how every stage here starts (a Downsample).
- AUG.COLOR_JITTER: unused when AUG.AA_TYPE is set (the release's defaults.py says so).
- AUG.RE_MODE pixel, RE_COUNT 1, RE_SPLIT False: what data/transforms.py implements (no
  setting). AUG.INTERPOLATION bicubic: data/augment.py interpolates bilinearly, a deliberate
  difference its docstring lists (2.3x cheaper per frame), not a setting either.
- MODEL.NUM_CLASSES: taken from the dataset's index.
- TRAIN.EVAL_PERIOD, CHECKPOINT_PERIOD, DATA_LOADER.*, BN.*, TENSORBOARD.*: how the release's
  trainer runs, not what it trains.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
from support import error_lines

from morphmlp.config import ConfigError, load_yaml, merge
from morphmlp.models.factory import model_config
from morphmlp.train.config import resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by all eight files (each sets every one of these keys to these values).
COMMON = {
    "TRAIN.BATCH_SIZE": 64,
    "NUM_GPUS": 8,
    "DATA.TRAIN_JITTER_SCALES": [256, 320],
    "DATA.TRAIN_CROP_SIZE": 224,
    "DATA.TEST_CROP_SIZE": 224,
    "DATA.TRAIN_JITTER_SCALES_RELATIVE": [0.08, 1.0],
    "DATA.TRAIN_JITTER_ASPECT_RELATIVE": [0.75, 1.3333],
    "MORPH.SEGMENT_DIM": [14, 28, 28, 49],
    "MORPH.MLP_RATIOS": [3, 3, 3, 3],
    "MORPH.EMBED_DIMS": [112, 224, 392, 784],
    "AUG.NUM_SAMPLE": 2,
    "AUG.AA_TYPE": "rand-m7-n4-mstd0.5-inc1",
    "AUG.RE_PROB": 0.25,
    "MIXUP.ALPHA": 0.8,
    "MIXUP.CUTMIX_ALPHA": 1.0,
    "MIXUP.PROB": 1.0,
    "MIXUP.SWITCH_PROB": 0.5,
    "MIXUP.LABEL_SMOOTH_VALUE": 0.1,
    "SOLVER.COSINE_END_LR": 1e-6,
    "SOLVER.WARMUP_START_LR": 1e-6,
    "SOLVER.MOMENTUM": 0.9,
    "SOLVER.WEIGHT_DECAY": 0.05,
    "RNG_SEED": 0,
}
S_LAYERS, B_LAYERS = [3, 4, 9, 3], [4, 6, 15, 4]
# Kinetics-400 (TRAIN.DATASET kinetics: dense sampling, DATA.USE_OFFSET_SAMPLING True; RANDOM_FLIP
# and TARGET_FPS not set: the release's defaults.py, True and 30). Test views: the README's
# Kinetics command and Model Zoo (#Frame 16x1x4 = 1 crop x 4 clips): TEST.NUM_ENSEMBLE_VIEWS 4,
# TEST.NUM_SPATIAL_CROPS 1 (the S files set 1 x 1, the B files leave 10 x 1 from defaults.py).
K400 = {
    "TRAIN.DATASET": "kinetics",
    "DATA.RANDOM_FLIP": True,
    "DATA.TARGET_FPS": 30,
    "DATA.SAMPLING_RATE": 4,
    "SOLVER.BASE_LR": 2e-4,
    "SOLVER.MAX_EPOCH": 60,
    "TEST.NUM_ENSEMBLE_VIEWS": 4,
    "TEST.NUM_SPATIAL_CROPS": 1,
}
# Something-Something V2 (TRAIN.DATASET sth: segment sampling, which leaves SAMPLING_RATE unused).
# Test views: the README's Something-Something command and Model Zoo (#Frame 16x3x1 = 3 crops x
# 1 clip): TEST.NUM_ENSEMBLE_VIEWS 1, TEST.NUM_SPATIAL_CROPS 3.
SSV2 = {
    "TRAIN.DATASET": "sth",
    "DATA.RANDOM_FLIP": False,
    "DATA.SAMPLING_RATE": 8,
    "SOLVER.BASE_LR": 4e-4,
    "SOLVER.WARMUP_EPOCHS": 5.0,
    "TEST.NUM_ENSEMBLE_VIEWS": 1,
    "TEST.NUM_SPATIAL_CROPS": 3,
}

RELEASE = {
    # configs/K400/K400_MLP_S16x4.yaml
    "k400_s16": {
        **COMMON,
        **K400,
        "DATA.NUM_FRAMES": 16,
        "MORPH.LAYERS": S_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.1,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_s.pth",
        "SOLVER.WARMUP_EPOCHS": 10.0,
    },
    # configs/K400/K400_MLP_S32x4.yaml
    "k400_s32": {
        **COMMON,
        **K400,
        "DATA.NUM_FRAMES": 32,
        "MORPH.LAYERS": S_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.1,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_s.pth",
        "SOLVER.WARMUP_EPOCHS": 10.0,
    },
    # configs/K400/K400_MLP_B16x4.yaml
    "k400_b16": {
        **COMMON,
        **K400,
        "DATA.NUM_FRAMES": 16,
        "MORPH.LAYERS": B_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.3,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_b.pth",
        "SOLVER.WARMUP_EPOCHS": 10.0,
    },
    # configs/K400/K400_MLP_B32x4.yaml
    "k400_b32": {
        **COMMON,
        **K400,
        "DATA.NUM_FRAMES": 32,
        "MORPH.LAYERS": B_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.3,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_b.pth",
        "SOLVER.WARMUP_EPOCHS": 30.0,
    },
    # configs/SSV2/SSV2_MLP_S16.yaml
    "ssv2_s16": {
        **COMMON,
        **SSV2,
        "DATA.NUM_FRAMES": 16,
        "MORPH.LAYERS": S_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.3,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_s.pth",
        "SOLVER.MAX_EPOCH": 60,
    },
    # configs/SSV2/SSV2_MLP_S32.yaml
    "ssv2_s32": {
        **COMMON,
        **SSV2,
        "DATA.NUM_FRAMES": 32,
        "MORPH.LAYERS": S_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.3,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_s.pth",
        "SOLVER.MAX_EPOCH": 60,
    },
    # configs/SSV2/SSV2_MLP_B16.yaml
    "ssv2_b16": {
        **COMMON,
        **SSV2,
        "DATA.NUM_FRAMES": 16,
        "MORPH.LAYERS": B_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.6,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_b.pth",
        "SOLVER.MAX_EPOCH": 60,
    },
    # configs/SSV2/SSV2_MLP_B32.yaml. Its PRETRAIN_PATH names the S weights
    # (pretrained/video_morphmlp_s.pth), which don't fit B's 4-6-15-4 blocks: the release's
    # strict=False load would leave B's extra blocks at their init. Taken as a slip, the recipe
    # uses the B weights like SSV2_MLP_B16 (test_ssv2_b32_starts_from_the_b_weights).
    "ssv2_b32": {
        **COMMON,
        **SSV2,
        "DATA.NUM_FRAMES": 32,
        "MORPH.LAYERS": B_LAYERS,
        "MORPH.DROP_DEPTH_RATE": 0.6,
        "MORPH.PRETRAIN_PATH": "pretrained/video_morphmlp_b.pth",
        "SOLVER.MAX_EPOCH": 64,
    },
}

# Where each release key lands: the resolved training config's field (or the architecture's,
# "arch.*"), and how the release's value reads there.
FIELDS = {
    "TRAIN.DATASET": ("data.sampling", {"kinetics": "dense", "sth": "segment"}.get),
    "DATA.NUM_FRAMES": ("model.num_frames", None),
    "DATA.SAMPLING_RATE": ("data.sampling_rate", None),
    "DATA.TARGET_FPS": ("data.target_fps", None),
    "DATA.RANDOM_FLIP": ("data.random_flip", None),
    "DATA.TRAIN_JITTER_SCALES": ("data.train_jitter_scales", tuple),
    "DATA.TRAIN_CROP_SIZE": ("data.train_crop_size", None),
    "DATA.TEST_CROP_SIZE": ("data.test_crop_size", None),
    "DATA.TRAIN_JITTER_SCALES_RELATIVE": ("data.rrc_scale", tuple),
    "DATA.TRAIN_JITTER_ASPECT_RELATIVE": ("data.rrc_ratio", tuple),
    "MORPH.LAYERS": ("arch.depths", tuple),
    "MORPH.EMBED_DIMS": ("arch.widths", tuple),
    "MORPH.SEGMENT_DIM": ("arch.chunk_lengths", tuple),
    "MORPH.MLP_RATIOS": ("arch.mlp_ratio", lambda ratios: ratios[0]),
    "MORPH.DROP_DEPTH_RATE": ("model.drop_path_rate", None),
    "MORPH.PRETRAIN_PATH": ("model.pretrained", None),
    "AUG.NUM_SAMPLE": ("data.num_samples", None),
    "AUG.AA_TYPE": ("data.rand_augment", None),
    "AUG.RE_PROB": ("data.random_erasing", None),
    "MIXUP.ALPHA": ("optim.mixup_alpha", None),
    "MIXUP.CUTMIX_ALPHA": ("optim.cutmix_alpha", None),
    "MIXUP.PROB": ("optim.mixup_prob", None),
    "MIXUP.SWITCH_PROB": ("optim.mixup_switch_prob", None),
    "MIXUP.LABEL_SMOOTH_VALUE": ("optim.label_smoothing", None),
    "SOLVER.BASE_LR": ("scaled_lr", None),  # at the release's 8 workers (see _resolved)
    "SOLVER.COSINE_END_LR": ("optim.min_lr", None),
    "SOLVER.WARMUP_START_LR": ("optim.warmup_start_lr", None),
    "SOLVER.WARMUP_EPOCHS": ("optim.warmup_epochs", None),
    "SOLVER.MAX_EPOCH": ("optim.epochs", None),
    "SOLVER.MOMENTUM": ("optim.betas", lambda m: (m, 0.999)),  # adamw: beta1; beta2 torch's
    "SOLVER.WEIGHT_DECAY": ("optim.weight_decay", None),
    "TRAIN.BATCH_SIZE": ("global_batch", None),  # at the release's 8 workers
    "NUM_GPUS": ("scaling.workers", None),
    "TEST.NUM_ENSEMBLE_VIEWS": ("data.test_num_clips", None),
    "TEST.NUM_SPATIAL_CROPS": ("data.test_num_crops", None),
    "RNG_SEED": ("run.seed", None),
}


def _recipe(name: str) -> str:
    return os.path.join(ROOT, "configs", f"{name}.yaml")


def _resolved(name: str):
    # What `jobs/train.py --config configs/<name>.yaml --workers 8` trains (the release: 8 GPUs).
    return resolve_config(merge(load_yaml(_recipe(name)), {"scaling": {"workers": 8}}))


def _read(cfg, path: str):
    if path.startswith("arch."):
        model = cfg.model
        cfg = model_config(
            model.variant,
            num_frames=model.num_frames,
            img_size=model.img_size,
            drop_path_rate=model.drop_path_rate,
        )
        path = path.removeprefix("arch.")
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_the_recipes_are_the_releases_k400_and_ssv2_configs():
    shipped = sorted(
        os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "configs/*.yaml"))
    )
    assert shipped == sorted(RELEASE)


@pytest.mark.parametrize(
    ("name", "key"), [(name, key) for name, values in RELEASE.items() for key in values]
)
def test_recipe_field_equals_the_release(name, key):
    path, convert = FIELDS[key]
    release = RELEASE[name][key]
    expected = convert(release) if convert else release
    actual = _read(_resolved(name), path)
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-9), f"{name}: {path} for {key}={release}"
    else:
        assert actual == expected, f"{name}: {path} for {key}={release}"


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_recipe_names_the_pretrained_file_the_user_downloads(name):
    with open(_recipe(name), encoding="utf-8") as f:
        text = f.read()
    filename = os.path.basename(RELEASE[name]["MORPH.PRETRAIN_PATH"])
    assert f"pretrained: pretrained/{filename}" in text
    # the comment says which release file it is and where the user gets it
    assert "drive.google.com/drive/folders/105DRws977iNnjEv-Hjfix5Q3JtzqoDUm" in text
    assert "download" in text


def test_ssv2_b32_starts_from_the_b_weights():
    assert _resolved("ssv2_b32").model.pretrained == "pretrained/video_morphmlp_b.pth"
    assert _resolved("ssv2_b16").model.pretrained == _resolved("ssv2_b32").model.pretrained


@pytest.mark.parametrize("name", sorted(RELEASE))
def test_recipe_refuses_to_train_without_the_downloaded_weights(name, tmp_path, monkeypatch):
    from morphmlp.train.driver import check_architecture

    monkeypatch.chdir(tmp_path)  # the relative path resolves where the job runs: not here
    with pytest.raises(ConfigError, match=r"^model\.pretrained: pretrained/video_morphmlp_[sb]"):
        check_architecture(_resolved(name))


def test_train_job_names_the_missing_weights_in_one_line(tmp_path):
    job = os.path.join(ROOT, "jobs", "train.py")
    out = subprocess.run(
        [sys.executable, job, "--config", _recipe("k400_s16")],
        cwd=tmp_path,  # no pretrained/ folder here
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    errors = error_lines(out.stderr)
    assert errors == ["error: model.pretrained: pretrained/video_morphmlp_s.pth not found"]
    assert not os.listdir(tmp_path)  # nothing written before the check
