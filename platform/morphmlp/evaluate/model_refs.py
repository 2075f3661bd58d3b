"""Resolve a checkpoint reference to weights, architecture and class names.

References:
  models:/morphmlp/<version>        a registered model version (what the schedule evaluates)
  models:/morphmlp/latest           the newest version, as MLflow means it (highest number)
  models:/morphmlp@<alias>          the version an alias (best, newest, champion) points at
  runs:/<run_id>                    that training run's best model (checkpoints/best/model.pt)
  runs:/<run_id>/<artifact path>    a file, or a folder holding model.pt, in that run
  <path or URI>                     a model.pt file: ours carries its architecture and classes;
                                    a release file (PySlowFast's model_state) needs the variant
                                    and frame count, and has no class names

Exported programs (model.pt2, model.onnx, with their sidecar JSON: evaluate/export.py) hold a
graph, not weights: `is_exported` tells them apart; jobs/predict.py runs them, `load` refuses them.

Everything is checked here, on the driver, before any evaluation work starts: the weights are
loaded strictly into the network they claim to be.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from morphmlp import storage, tracking
from morphmlp.config import from_dict
from morphmlp.errors import ConfigError, MorphMLPError
from morphmlp.models import MorphMLPConfig, create_model, load_checkpoint, variant_config
from morphmlp.models.weights import CheckpointError, torch_load, unwrap_state_dict

MODEL_FILE = "model.pt"
BEST_ARTIFACT = "checkpoints/best"
_MODEL_URI = re.compile(rf"^models:/{tracking.REGISTERED_MODEL}/(\d+|latest)$")
_ALIAS_URI = re.compile(rf"^models:/{tracking.REGISTERED_MODEL}@([A-Za-z0-9_-]+)$")
EXPORTED_SUFFIXES = (".pt2", ".onnx")
_RUN_URI = re.compile(r"^runs:/([0-9a-fA-F]+)(?:/(.+))?$")


class CheckpointNotFoundError(MorphMLPError):
    """A checkpoint reference that points at nothing: unknown version, run, artifact or file."""


@dataclass
class Checkpoint:
    reference: str  # as given (credentials redacted)
    model_config: MorphMLPConfig
    state_dict: dict[str, torch.Tensor]
    class_names: list[str] | None  # None: a release file (outputs = the benchmark's labels)
    data_config: dict[str, Any] | None  # the training run's DataConfig, when recorded
    model_version: str | None = None
    run_id: str | None = None  # the training run that produced it, when known
    version_tags: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.model_config.num_classes

    def describe(self) -> str:
        if self.model_version is not None:
            return f"{tracking.REGISTERED_MODEL} v{self.model_version}"
        return self.reference


@dataclass(frozen=True)
class RegisteredVersion:
    version: str
    run_id: str | None
    source: str
    tags: dict[str, str]

    @property
    def reference(self) -> str:
        return model_version_uri(self.version)


def model_version_uri(version: str | int) -> str:
    return f"models:/{tracking.REGISTERED_MODEL}/{version}"


def registered_versions(uri: str | None = None) -> list[RegisteredVersion]:
    """Every version of the registered model `morphmlp`, oldest first."""

    client = tracking.client(uri)
    found, token = [], None
    while True:
        page = client.search_model_versions(
            f"name='{tracking.REGISTERED_MODEL}'", max_results=1000, page_token=token
        )
        found += [
            RegisteredVersion(str(mv.version), mv.run_id, mv.source, dict(mv.tags)) for mv in page
        ]
        token = page.token
        if not token:
            return sorted(found, key=lambda v: int(v.version))


def is_exported(reference: str) -> bool:
    """An exported program (jobs/export.py), not a checkpoint: a .pt2 or .onnx path or URI."""
    return not reference.startswith(("models:/", "runs:/")) and reference.lower().endswith(
        EXPORTED_SUFFIXES
    )


def registered_aliases(uri: str | None = None) -> dict[str, str]:
    """alias -> version of the registered model `morphmlp` (empty when it isn't registered)."""
    import mlflow

    client = tracking.client(uri)
    try:
        model = client.get_registered_model(tracking.REGISTERED_MODEL)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return {}
    return {alias: str(version) for alias, version in sorted(model.aliases.items())}


def load(
    reference: str,
    *,
    variant: str | None = None,
    frames: int | None = None,
    img_size: int | None = None,
    uri: str | None = None,
) -> Checkpoint:
    """Resolve `reference` (see the module docstring) and load its weights strictly."""
    version = _MODEL_URI.match(reference)
    alias = _ALIAS_URI.match(reference)
    run = _RUN_URI.match(reference)
    if version is not None:
        ckpt = _load_model_version(_version_number(version.group(1), uri), uri)
    elif alias is not None:
        ckpt = _load_model_version(_alias_version(alias.group(1), uri), uri)
    elif run is not None:
        ckpt = _load_run_artifact(run.group(1), run.group(2) or BEST_ARTIFACT, reference, uri)
    elif reference.startswith(("models:/", "runs:/")):
        raise CheckpointNotFoundError(
            f"{reference!r} is not a checkpoint reference this job knows; use "
            f"models:/{tracking.REGISTERED_MODEL}/<version>, models:/{tracking.REGISTERED_MODEL}"
            "@<alias>, runs:/<run_id>[/<artifact path>] or a path/URI of a model.pt file"
        )
    elif is_exported(reference):
        raise CheckpointNotFoundError(
            f"{storage.redact(reference)} is an exported program (jobs/export.py): it runs with "
            "jobs/predict.py; this needs the model.pt it was exported from"
        )
    else:
        if not storage.exists(reference):
            raise CheckpointNotFoundError(f"checkpoint {storage.redact(reference)}: no such file")
        ckpt = _from_bytes(storage.read_bytes(reference), storage.redact(reference))
    return _finish(ckpt, variant=variant, frames=frames, img_size=img_size)


def _version_number(version: str, uri: str | None) -> str:
    if version != "latest":
        return version
    versions = registered_versions(uri)
    if not versions:
        raise CheckpointNotFoundError(f"{tracking.REGISTERED_MODEL} has no registered versions")
    return versions[-1].version


def _alias_version(alias: str, uri: str | None) -> str:
    aliases = registered_aliases(uri)
    if alias not in aliases:
        known = ", ".join(f"{name} (v{v})" for name, v in aliases.items()) or "none"
        # MLflow refuses "latest" as an alias name: its newest version has a URI of its own
        hint = (
            f"; the newest version is models:/{tracking.REGISTERED_MODEL}/latest"
            if alias.lower() == "latest"
            else ""
        )
        raise CheckpointNotFoundError(
            f"alias {alias!r} of {tracking.REGISTERED_MODEL} is not set; aliases: {known}{hint}"
        )
    return aliases[alias]


def _load_model_version(version: str, uri: str | None) -> dict:
    import mlflow

    client = tracking.client(uri)
    try:
        mv = client.get_model_version(tracking.REGISTERED_MODEL, version)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = [v.version for v in registered_versions(uri)]
        raise CheckpointNotFoundError(
            f"model version {tracking.REGISTERED_MODEL} v{version} is not registered; "
            f"registered versions: {', '.join(known) or 'none'}"
        ) from err
    # The version's own source, not models:/...: MLflow resolves those through its process-wide
    # registry URI, which may name another server than `uri`.
    source = client.get_model_version_download_uri(tracking.REGISTERED_MODEL, version)
    loaded = _download(source, f"{tracking.REGISTERED_MODEL} v{version}", uri)
    loaded.update(model_version=version, run_id=mv.run_id, version_tags=dict(mv.tags))
    return loaded


def _load_run_artifact(run_id: str, path: str, reference: str, uri: str | None) -> dict:
    import mlflow

    client = tracking.client(uri)
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise CheckpointNotFoundError(f"{reference}: no MLflow run {run_id}") from err
    loaded = _download(f"runs:/{run_id}/{path}", reference, uri)
    loaded["run_id"] = run_id
    return loaded


def _download(artifact_uri: str, what: str, uri: str | None) -> dict:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=artifact_uri, dst_path=tmp, tracking_uri=uri or tracking.tracking_uri()
            )
        except mlflow.exceptions.MlflowException as err:
            raise CheckpointNotFoundError(
                f"{what}: can't download {artifact_uri} ({err.message})"
            ) from err
        if os.path.isdir(local):
            local = os.path.join(local, MODEL_FILE)
        if not os.path.isfile(local):
            raise CheckpointNotFoundError(f"{what}: {artifact_uri} holds no {MODEL_FILE}")
        with open(local, "rb") as f:
            return _from_bytes(f.read(), what)


def _from_bytes(data: bytes, source: str) -> dict:
    obj = torch_load(data, source)
    meta = obj if isinstance(obj, Mapping) else {}
    return {
        "reference": source,
        "state_dict": unwrap_state_dict(obj, source),
        "model_config": meta.get("model_config"),
        "class_names": meta.get("class_names"),
        "data_config": meta.get("data_config"),
    }


def _finish(
    loaded: dict, *, variant: str | None, frames: int | None, img_size: int | None
) -> Checkpoint:
    source = loaded["reference"]
    state = loaded["state_dict"]
    head = state.get("head.weight")
    if head is None:
        raise CheckpointError(f"{source}: no classifier (head.weight); can't score classes")
    if loaded["model_config"] is not None:
        given = {"--variant": variant, "--frames": frames, "--img-size": img_size}
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise ConfigError(
                f"{source} records its architecture; {', '.join(extra)} only apply to release "
                "checkpoints (which don't)"
            )
        try:
            cfg = from_dict(MorphMLPConfig, loaded["model_config"], where="model_config")
        except ConfigError as err:
            raise CheckpointError(f"{source}: invalid model_config: {err}") from err
    else:
        if variant is None:
            raise ConfigError(
                f"{source} is a checkpoint without an architecture (a release file); give "
                "--variant (xs, s, b) and --frames"
            )
        overrides = {"num_classes": int(head.shape[0]), "drop_path_rate": 0.0}
        if frames is not None:
            overrides["num_frames"] = frames
        if img_size is not None:
            overrides["img_size"] = img_size
        cfg = variant_config(variant, **overrides)
    if cfg.num_classes != head.shape[0]:
        raise CheckpointError(
            f"{source}: model_config says {cfg.num_classes} classes, the classifier has "
            f"{head.shape[0]} outputs"
        )
    # Strict load into the network it claims to be: a file that doesn't fit fails here.
    model = create_model(cfg)
    load_checkpoint(model, state, strict=True)
    class_names = loaded["class_names"]
    if class_names is not None and len(class_names) != cfg.num_classes:
        raise CheckpointError(
            f"{source}: {len(class_names)} class names for {cfg.num_classes} classifier outputs"
        )
    return Checkpoint(
        reference=source,
        model_config=cfg,
        state_dict=model.state_dict(),
        class_names=list(class_names) if class_names is not None else None,
        data_config=loaded["data_config"],
        model_version=loaded.get("model_version"),
        run_id=loaded.get("run_id"),
        version_tags=loaded.get("version_tags", {}),
    )
