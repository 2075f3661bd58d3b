"""Every path is a URI: local paths, file://, s3:// (with an endpoint override for MinIO and other
S3-compatible stores) and gs:// all go through pyarrow.fs.

Credentials come from the standard environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, GOOGLE_...); an
endpoint override from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL. `redact` strips anything that
looks like a secret before a URI reaches a log line or MLflow.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import uuid
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from morphmlp.errors import StorageError

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_uri(path: str) -> bool:
    return bool(_SCHEME.match(path))


def join(base: str, *parts: str) -> str:
    """Join path segments onto a URI or local path."""
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def resolve_relative(path: str, base_dir: str) -> str:
    """A path relative to `base_dir` (itself a URI or local path) becomes absolute."""
    if is_uri(path) or os.path.isabs(path):
        return path
    return join(base_dir, path)


def parent(uri: str) -> str:
    if is_uri(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(os.path.abspath(uri))


def redact(uri: str) -> str:
    """Hide user:password@ and credential-looking query parameters."""
    uri = re.sub(r"://[^/@]+@", "://***@", uri)
    return re.sub(
        r"(?i)([?&](?:access_key|secret_key|session_token|credential|token)[^=]*=)[^&]*",
        r"\1***",
        uri,
    )


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it)."""
    if not is_uri(uri):
        return _local(), os.path.abspath(os.path.expanduser(uri))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "file":
        return _local(), parts.path
    if scheme in ("s3", "s3a"):
        if parts.query:  # explicit options in the URI win (endpoint_override=..., etc.)
            fs, path = pafs.FileSystem.from_uri(uri.replace("s3a://", "s3://", 1))
            return fs, path
        return _s3(_s3_endpoint(), _s3_region()), f"{parts.netloc}{parts.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pafs.ArrowInvalid, OSError, ValueError) as err:  # type: ignore[attr-defined]
        raise StorageError(
            f"{redact(uri)}: unsupported or unreachable storage URI ({err})"
        ) from err


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as err:
        raise StorageError(f"{redact(uri)}: no such file") from err
    except OSError as err:
        raise StorageError(f"{redact(uri)}: can't read ({err})") from err


def open_input_file(uri: str):
    """A seekable, file-like handle (PyAV reads only the byte ranges it needs)."""
    fs, path = resolve(uri)
    return fs.open_input_file(path)


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as err:
        raise StorageError(f"{redact(uri)}: can't reach storage ({err})") from err


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write so that readers never see a partial file.

    Local: write a temporary sibling, fsync, rename over the target. Object stores: a PUT (or a
    completed multipart upload) becomes visible only once whole, so a direct write is atomic.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise StorageError(f"{redact(uri)}: can't write ({err})") from err


def check_writable(uri: str) -> None:
    """Fail early, before any work starts, if `uri` (a directory) can't be written."""
    probe = join(uri, f".write-probe-{uuid.uuid4().hex[:8]}")
    write_bytes_atomic(probe, b"ok")
    fs, path = resolve(probe)
    try:
        fs.delete_file(path)
    except OSError as err:
        raise StorageError(
            f"{redact(uri)}: wrote a probe file but can't delete it ({err})"
        ) from err


def _s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@functools.cache
def _local() -> pafs.LocalFileSystem:
    return pafs.LocalFileSystem()


@functools.cache
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlsplit(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # S3-compatible stores (MinIO, moto) address buckets by path, not virtual host.
        kwargs["force_virtual_addressing"] = False
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)
