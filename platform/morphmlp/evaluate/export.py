"""Export a checkpoint as a torch.export program (.pt2) and as ONNX, each checked against eager.

Both take one input, `clips`: float32 (B, 3, T, H, W), frames already scaled to [0, 1] and
standardised with the checkpoint's mean/std (`morphmlp.data.transforms.normalize`), B dynamic;
both return `logits` (B, num_classes). Each file has a sidecar `<file>.json` (`ExportSpec`) with
what a caller needs to feed it: frames, size, mean/std, class names, the architecture and the
training run's data settings (sampling, rate, short side), so `jobs/predict.py` runs an exported
file with the same protocol as the checkpoint.

The export checks itself before anything is kept: the saved files are loaded back (torch.export.load,
ONNX Runtime on CPU) and compared with the eager network on random clips at batch 1 and 2; over
`tolerance` (max |Δ| of the logits, fp32) the export fails. Files are written to a temporary folder
beside the destination and moved into place only after every check passed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from morphmlp import storage
from morphmlp.config import from_dict, to_dict
from morphmlp.data.config import DataConfig
from morphmlp.errors import ConfigError, MorphMLPError
from morphmlp.evaluate.model_refs import Checkpoint
from morphmlp.models import MorphMLPConfig

log = logging.getLogger(__name__)

FORMATS = {"torch-export": "model.pt2", "onnx": "model.onnx"}
FORMAT_CHOICES = ("torch-export", "onnx", "both")
SPEC_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "clips", "logits"
INPUT_LAYOUT = "B,3,T,H,W"
# ONNX opset 18: the opset the dynamo exporter's torchlib translations are written in
# (torch.onnx's TORCHLIB_OPSET), so no version-converter pass rewrites the graph after
# translation (a source of exporter failures and silent op changes); it has LayerNormalization
# (17+) natively, which MorphMLP uses in every block; and ONNX Runtime (>= 1.14), TensorRT 8.6+
# and OpenVINO 2023+ all run it. A newer opset buys this network nothing.
ONNX_OPSET = 18
# Largest batch the exported programs promise to accept (torch.export needs a bound; ONNX
# keeps the symbol). Batch 1 stays valid: the example input has batch 2 so torch.export does
# not specialise the dimension to 1.
MAX_BATCH = 1024
_EXPORTER_LOG_LEVELS = {
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}


class ExportError(MorphMLPError):
    """An export that failed its numeric check, or an exported file whose sidecar doesn't fit it."""


@dataclass
class ExportConfig:
    formats: tuple[str, ...] = ("torch-export", "onnx")
    opset: int = ONNX_OPSET
    tolerance: float = 1e-4  # max |Δ| of fp32 logits, exported vs eager
    check_batches: tuple[int, ...] = (1, 2)
    seed: int = 0  # random check clips

    def __post_init__(self) -> None:
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise ConfigError(
                f"export format {unknown[0] if unknown else '(none)'!r}; choose "
                f"{', '.join(FORMAT_CHOICES)}"
            )
        if not self.tolerance > 0:
            raise ConfigError(f"export tolerance {self.tolerance}; must be > 0")
        if not self.check_batches or min(self.check_batches) < 1:
            raise ConfigError(f"export check_batches {list(self.check_batches)}; need sizes >= 1")


def formats_for(choice: str) -> tuple[str, ...]:
    """--format value -> formats to write."""
    if choice not in FORMAT_CHOICES:
        raise ConfigError(f"--format {choice!r}; choose {', '.join(FORMAT_CHOICES)}")
    return tuple(FORMATS) if choice == "both" else (choice,)


@dataclass
class ExportSpec:
    """The sidecar `<file>.json`: everything needed to feed the exported file and read its output."""

    format: str  # torch-export | onnx
    file: str  # the exported file's name, beside the sidecar
    frames: int
    img_size: int
    in_chans: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str] | None  # None: a release checkpoint (outputs = its benchmark's labels)
    num_classes: int
    model_config: dict[str, Any]
    data_config: dict[str, Any] | None
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    input_layout: str = INPUT_LAYOUT
    input_dtype: str = "float32"
    input_normalisation: str = "x / 255 then (x - mean) / std, per channel (RGB)"
    opset: int | None = None  # ONNX only
    source: str = ""  # the checkpoint reference it was exported from
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # batch -> measured |Δ|
    torch_version: str = ""
    spec_version: int = SPEC_VERSION


def sidecar_uri(uri: str) -> str:
    return uri + ".json"


def export(reference: str, out_dir: str, cfg: ExportConfig, *, uri: str | None = None) -> list[str]:
    """Export checkpoint `reference` into local folder `out_dir`; returns the files written."""
    from morphmlp.evaluate import model_refs

    if storage.is_uri(out_dir):
        raise ConfigError(f"--out {storage.redact(out_dir)}: give a local folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out {out_dir}: exists and is not a folder")
    ckpt = model_refs.load(reference, uri=uri)
    if ckpt.model_config.is_image:
        raise ConfigError(f"{ckpt.describe()} is an image model; this exports video models")
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    # Beside the destination: the final moves are renames on one file system.
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        written = [_export_one(ckpt, fmt, staging, cfg) for fmt in cfg.formats]
        os.makedirs(out_dir, exist_ok=True)
        final = []
        for name in written:
            for item in (name, name + ".json"):
                os.replace(os.path.join(staging, item), os.path.join(out_dir, item))
            final.append(os.path.join(out_dir, name))
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _export_one(ckpt: Checkpoint, fmt: str, folder: str, cfg: ExportConfig) -> str:
    import torch

    from morphmlp.models import create_model

    model = create_model(ckpt.model_config)
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    shape = _input_shape(ckpt.model_config)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(cfg.seed))
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    name = FORMATS[fmt]
    path = os.path.join(folder, name)
    log.info("exporting %s as %s", ckpt.describe(), fmt)
    # The ONNX graph optimiser logs each of its hundreds of rewrites at INFO, and the exporter
    # warns that torchvision (whose ops this network doesn't use) is absent: their loggers are
    # set to what matters here.
    for logger, level in _EXPORTER_LOG_LEVELS.items():
        logging.getLogger(logger).setLevel(level)
    with torch.no_grad(), _one_line(f"{fmt} export of {ckpt.describe()}"):
        if fmt == "torch-export":
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, path)
        else:
            onnx_program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=cfg.opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
            # One self-contained file (weights inside): the network is far below protobuf's 2 GB.
            onnx_program.save(path, external_data=False)
    spec = spec_for(ckpt, fmt, name, opset=cfg.opset if fmt == "onnx" else None)
    with open(path, "rb") as f:
        data = f.read()
    runner = _runner(fmt, data, spec)  # the saved file, loaded back as a user would load it
    diffs = {}
    rng = torch.Generator().manual_seed(cfg.seed + 1)
    for size in cfg.check_batches:
        clips = torch.randn(size, *shape, generator=rng)
        with torch.no_grad():
            expected = model(clips).numpy()
        got = runner(clips.numpy())
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= cfg.tolerance:  # NaN fails too
            raise ExportError(
                f"{fmt} export of {ckpt.describe()} differs from the eager model at batch {size}: "
                f"max |Δ| {diff:.3g} > {cfg.tolerance:g} (fp32 logits); nothing was written"
            )
        diffs[str(size)] = diff
    spec.max_abs_diff = diffs
    # What predict.py will check when it loads the pair: it must hold now, or the export is wrong.
    _check_spec(spec, *_file_signature(fmt, data, name), f"{name}.json")
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(to_dict(spec), f, indent=2)
    log.info(
        "%s: max |Δ| vs eager %s", name, ", ".join(f"batch {b}: {d:.2g}" for b, d in diffs.items())
    )
    return name


@contextlib.contextmanager
def _one_line(what: str):
    """An exporter failure (torch raises dozens of types, with pages of context) as one line."""
    try:
        yield
    except Exception as err:
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        raise ExportError(f"{what} failed: {type(err).__name__}: {first}") from err


def spec_for(ckpt: Checkpoint, fmt: str, name: str, *, opset: int | None) -> ExportSpec:
    import torch

    model = ckpt.model_config
    data = _data_config(ckpt.data_config, ckpt.describe())
    return ExportSpec(
        format=fmt,
        file=name,
        frames=model.num_frames,
        img_size=model.img_size,
        in_chans=model.in_chans,
        mean=tuple(data.mean),
        std=tuple(data.std),
        class_names=ckpt.class_names,
        num_classes=model.num_classes,
        model_config=to_dict(model),
        data_config=_test_settings(data),
        opset=opset,
        source=ckpt.reference,
        torch_version=torch.__version__,
    )


# ---------------------------------------------------------------------------------------------
# Loading an exported file (jobs/predict.py)


@dataclass
class ExportedModel:
    uri: str
    spec: ExportSpec
    data: bytes  # the file itself: model actors load it from the object store

    def checkpoint(self) -> Checkpoint:
        """The spec as a weightless Checkpoint, so the evaluation's protocol code applies."""
        return Checkpoint(
            reference=storage.redact(self.uri),
            model_config=from_dict(MorphMLPConfig, self.spec.model_config, where="model_config"),
            state_dict={},
            class_names=self.spec.class_names,
            data_config=self.spec.data_config,
        )

    def runner(self, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
        return _runner(self.spec.format, self.data, self.spec, threads)


def load_exported(uri: str) -> ExportedModel:
    """Read an exported file and its sidecar and check that they describe the same network."""
    where = storage.redact(uri)
    fmt = "torch-export" if uri.lower().endswith(".pt2") else "onnx"
    side = sidecar_uri(uri)
    if not storage.exists(uri):
        raise ExportError(f"{where}: no such file")
    if not storage.exists(side):
        raise ExportError(
            f"{where}: no sidecar {os.path.basename(side)} beside it (jobs/export.py writes "
            "one with the input spec); without it the input can't be prepared"
        )
    spec = _read_spec(side)
    if spec.format != fmt:
        raise ExportError(
            f"{storage.redact(side)}: field 'format' is {spec.format!r} but the file is {fmt}"
        )
    data = storage.read_bytes(uri)
    accepts, outputs = _file_signature(fmt, data, where)
    _check_spec(spec, accepts, outputs, storage.redact(side))
    return ExportedModel(uri, spec, data)


def _read_spec(uri: str) -> ExportSpec:
    where = storage.redact(uri)
    try:
        raw = json.loads(storage.read_bytes(uri))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{where}: not valid JSON ({err})") from err
    try:
        spec = from_dict(ExportSpec, raw, where=where)
    except (ConfigError, TypeError, ValueError) as err:
        raise ExportError(f"{where}: {err}") from err
    if spec.spec_version != SPEC_VERSION:
        raise ExportError(
            f"{where}: field 'spec_version' is {spec.spec_version}; this version reads "
            f"{SPEC_VERSION} (re-export with jobs/export.py)"
        )
    return spec


def _check_spec(spec: ExportSpec, accepts: Sequence, outputs: Sequence, where: str) -> None:
    """The sidecar against the file's own input/output shapes and against itself, by field."""
    taken = tuple(int(d) for d in accepts[1:]) if len(accepts) == 5 else None
    shown = f"(batch, {', '.join(str(d) for d in accepts[1:])})"
    expected = {
        "in_chans": (spec.in_chans, 0),
        "frames": (spec.frames, 1),
        "img_size": (spec.img_size, 2),
    }
    if taken is None:
        raise ExportError(f"{where}: the exported file takes {shown}, not a {INPUT_LAYOUT} clip")
    for name, (value, axis) in expected.items():
        if value != taken[axis] or (name == "img_size" and taken[3] != value):
            raise ExportError(
                f"{where}: field {name!r} is {value} but the exported file takes {shown}"
            )
    if int(outputs[-1]) != spec.num_classes:
        raise ExportError(
            f"{where}: field 'num_classes' is {spec.num_classes} but the exported file outputs "
            f"{outputs[-1]} classes"
        )
    if spec.class_names is not None and len(spec.class_names) != spec.num_classes:
        raise ExportError(
            f"{where}: field 'class_names' has {len(spec.class_names)} names for "
            f"{spec.num_classes} outputs"
        )
    try:
        model_cfg = from_dict(MorphMLPConfig, spec.model_config, where="model_config")
    except ConfigError as err:
        raise ExportError(f"{where}: field 'model_config': {err}") from err
    model = to_dict(model_cfg)
    for name, key in (
        ("frames", "num_frames"),
        ("img_size", "img_size"),
        ("num_classes", "num_classes"),
    ):
        if model.get(key) != getattr(spec, name):
            raise ExportError(
                f"{where}: field 'model_config.{key}' is {model.get(key)} but field {name!r} "
                f"is {getattr(spec, name)}"
            )
    try:
        data = _data_config(spec.data_config, where)
    except MorphMLPError as err:
        raise ExportError(f"{where}: field 'data_config': {err}") from err
    # Predictions normalise with data_config's mean/std (the protocol code reads it): the
    # top-level fields, there for other callers, must say the same.
    for name in ("mean", "std"):
        if tuple(getattr(spec, name)) != tuple(getattr(data, name)):
            raise ExportError(
                f"{where}: field {name!r} is {list(getattr(spec, name))} but field "
                f"'data_config.{name}' is {list(getattr(data, name))}"
            )


def _file_signature(fmt: str, data: bytes, where: str) -> tuple[list, list]:
    """(input shape, output shape) the file itself declares; the batch dim comes back symbolic."""
    if fmt == "torch-export":
        import torch

        try:
            program = torch.export.load(io.BytesIO(data))
        except Exception as err:  # torch raises many types for a file that isn't a program
            raise ExportError(f"{where}: not a torch.export program ({err})") from err
        inputs = [
            n
            for n in program.graph.nodes
            if n.op == "placeholder" and n.name in program.graph_signature.user_inputs
        ]
        output = next(n for n in program.graph.nodes if n.op == "output")
        first = output.args[0][0] if isinstance(output.args[0], (tuple, list)) else output.args[0]
        if len(inputs) != 1:
            raise ExportError(f"{where}: the program takes {len(inputs)} inputs; expected 1")
        return list(inputs[0].meta["val"].shape), list(first.meta["val"].shape)
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped errors for a bad model
        raise ExportError(f"{where}: not an ONNX model ONNX Runtime can load ({err})") from err
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ExportError(f"{where}: the ONNX model takes {len(inputs)} inputs; expected 1")
    return list(inputs[0].shape), list(session.get_outputs()[0].shape)


def _runner(
    fmt: str, data: bytes, spec: ExportSpec, threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """float32 normalised (B, 3, T, H, W) -> logits (B, K), through the exported file."""
    if fmt == "torch-export":
        import torch

        module = torch.export.load(io.BytesIO(data)).module()

        def run_program(clips: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.from_numpy(np.ascontiguousarray(clips))).numpy()

        return run_program
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:  # a model actor's CPU share: ORT would take every core of the node
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run_onnx(clips: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(clips, np.float32)})[0]

    return run_onnx


# What the sidecar keeps of the training run's data settings: what test-time decoding and
# sampling read (and what DataConfig checks them against). Training augmentation is left out;
# flip_label_map also would not survive JSON (its integer keys come back as strings).
_TEST_FIELDS = (
    "num_frames",
    "sampling",
    "sampling_rate",
    "target_fps",
    "test_crop_size",
    "train_jitter_scales",
    "mean",
    "std",
    "test_num_clips",
    "test_num_crops",
    "test_scale",
    "decode_threads",
    "decode_actors",
    "cpus_per_decode_actor",
    "decode_resource",
    "decode_batch_size",
)


def _test_settings(data: DataConfig) -> dict[str, Any]:
    settings = to_dict(data)
    return {name: settings[name] for name in _TEST_FIELDS}


def _input_shape(model: MorphMLPConfig) -> tuple[int, int, int, int]:
    return (model.in_chans, model.num_frames, model.img_size, model.img_size)


def _data_config(settings: dict[str, Any] | None, where: str) -> DataConfig:
    """The training run's data settings (DataConfig defaults where none were recorded)."""
    if not settings:
        return DataConfig()
    known = {f.name for f in dataclasses.fields(DataConfig)}
    try:
        return from_dict(
            DataConfig, {k: v for k, v in settings.items() if k in known}, where="data"
        )
    except ConfigError as err:
        raise ConfigError(f"{where}: recorded data settings: {err}") from err
