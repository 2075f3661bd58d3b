"""The benchmark catalog: a versioned YAML list of benchmarks, each an index plus a test protocol.

    version: 1
    benchmarks:
      - name: demo-val              # unique; names the MLflow tag and the leaderboard column
        index: demo                 # index URI (relative: to the catalog's folder) or `demo`
        split: val                  # rows of one split (default: every row)
        content_hash: 3f2a...       # optional: what the rows and class names must hash to
        class_names: [...]          # optional: names for the index's labels 0..N-1
        protocol: {clips: 4, crops: 1, sampling: dense, sampling_rate: 4}

Adding a benchmark is adding one entry. Results are keyed by (model version, benchmark name,
benchmark hash, protocol hash): editing a benchmark's rows, class names or protocol makes every
model's result for it stale, so scheduled re-evaluation runs it again. The benchmark hash is the
index's content hash (`VideoIndex.content_hash`) of the rows evaluated (after `split`) with the
class names used; `jobs/reevaluate.py --list` prints it for every entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Literal

from morphmlp import storage
from morphmlp.config import from_dict, load_yaml, to_dict
from morphmlp.errors import ConfigError, MorphMLPError

CATALOG_VERSION = 1
DEMO_INDEX = "demo"  # the built-in synthetic dataset (`morphmlp.data.demo`)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class CatalogError(ConfigError):
    """A catalog file that can't be used: wrong version, bad entry, duplicate name."""


class BenchmarkHashError(MorphMLPError):
    """The index no longer hashes to the catalog's expected content hash."""


class ProtocolError(MorphMLPError):
    """A protocol the checkpoint can't follow (frames or crop size its network isn't built for)."""


@dataclass(frozen=True)
class Protocol:
    """How each video is viewed at test time, as in the release's test configs.

    Kinetics: `clips` temporal clips (dense sampling, PySlowFast's offsets) × 1 or 3 crops;
    Something-Something: 1 clip × 3 crops with segment sampling. Fields left None take the
    checkpoint's own value (frames, crop size: the ones the network is built for; sampling_rate:
    the one it was trained with).
    """

    clips: int = 1
    crops: Literal[1, 3] = 1
    frames: int | None = None
    sampling: Literal["dense", "segment"] = "dense"
    sampling_rate: int | None = None
    crop_size: int | None = None
    # How views are combined per video. softmax: mean of per-view softmax scores (PySlowFast's
    # TestMeter summing its softmax heads). logits: mean of raw outputs, which is what the
    # MorphMLP release computes (its head has no softmax); top-k then uses the mean logits.
    ensemble: Literal["softmax", "logits"] = "softmax"

    def __post_init__(self) -> None:
        for name in ("clips", "frames", "sampling_rate", "crop_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 1):
                raise ConfigError(f"protocol.{name}: {value!r}; must be an integer >= 1")
        if self.crops not in (1, 3):
            raise ConfigError(
                f"protocol.crops: {self.crops!r}; choose 1 (center) or 3 (three crops along the "
                "long side)"
            )
        if self.sampling not in ("dense", "segment"):
            raise ConfigError(f"protocol.sampling: {self.sampling!r}; choose dense or segment")
        if self.ensemble not in ("softmax", "logits"):
            raise ConfigError(f"protocol.ensemble: {self.ensemble!r}; choose softmax or logits")

    @property
    def num_views(self) -> int:
        return self.clips * self.crops

    def describe(self) -> str:
        """Short human form, e.g. "4x3 dense" (clips x crops, sampling)."""
        return f"{self.clips}x{self.crops} {self.sampling}"

    def content_hash(self) -> str:
        return _hash(to_dict(self))


@dataclass(frozen=True)
class Benchmark:
    name: str
    index: str  # an index URI, or `demo`
    protocol: Protocol = Protocol()
    split: str | None = None  # None: every row of the index
    content_hash: str | None = None  # expected hash of the rows and class names evaluated
    class_names: tuple[str, ...] | None = None  # None: the index's

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise CatalogError(
                f"benchmark name {self.name!r}: use letters, digits, '_', '.' and '-', starting "
                "with a letter or digit"
            )
        if not self.index:
            raise CatalogError(f"benchmark {self.name!r}: empty index URI")
        if self.class_names is not None and len(set(self.class_names)) != len(self.class_names):
            dup = next(n for n in self.class_names if self.class_names.count(n) > 1)
            raise CatalogError(f"benchmark {self.name!r}: class name {dup!r} appears twice")


@dataclass(frozen=True)
class Catalog:
    benchmarks: tuple[Benchmark, ...]
    version: int = CATALOG_VERSION
    uri: str = ""

    def __post_init__(self) -> None:
        if self.version != CATALOG_VERSION:
            raise CatalogError(
                f"{self.uri or 'catalog'}: version {self.version!r} is not supported; this "
                f"release reads version {CATALOG_VERSION}"
            )
        seen: set[str] = set()
        for bench in self.benchmarks:
            if bench.name in seen:
                raise CatalogError(
                    f"{self.uri or 'catalog'}: benchmark name {bench.name!r} appears twice"
                )
            seen.add(bench.name)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.benchmarks]

    def get(self, name: str) -> Benchmark:
        for bench in self.benchmarks:
            if bench.name == name:
                return bench
        raise CatalogError(
            f"{self.uri or 'catalog'}: no benchmark named {name!r}; the catalog has "
            f"{', '.join(self.names) or 'none'}"
        )


def load_catalog(uri: str) -> Catalog:
    """Read and validate a catalog file (any URI); index URIs resolve against its folder."""
    data = load_yaml(uri)
    where = storage.redact(uri)
    unknown = sorted(set(data) - {"version", "benchmarks"})
    if unknown:
        raise CatalogError(f"{where}: unknown key {unknown[0]!r}; allowed: version, benchmarks")
    if "version" not in data:
        raise CatalogError(f"{where}: missing `version: {CATALOG_VERSION}`")
    entries = data.get("benchmarks") or []
    if not isinstance(entries, list):
        raise CatalogError(f"{where}: `benchmarks` must be a list of entries")
    base = storage.parent(uri)
    benchmarks = []
    for i, entry in enumerate(entries):
        label = f"{where}: benchmarks[{i}]"
        if isinstance(entry, dict) and "name" in entry:
            label += f" ({entry['name']})"
        try:
            bench = from_dict(Benchmark, entry, where="benchmark")
        except ConfigError as err:
            raise CatalogError(f"{label}: {err}") from err
        if bench.index != DEMO_INDEX:
            bench = dataclasses.replace(bench, index=storage.resolve_relative(bench.index, base))
        benchmarks.append(bench)
    try:
        return Catalog(tuple(benchmarks), version=data["version"], uri=where)
    except ConfigError as err:
        raise CatalogError(str(err)) from err


@dataclass
class ResolvedBenchmark:
    """A benchmark with its rows read: what evaluation runs on and what its results are keyed by."""

    spec: Benchmark
    index: object  # morphmlp.data.index.VideoIndex: the rows evaluated, with the class names used
    content_hash: str
    protocol_hash: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def class_names(self) -> list[str]:
        return list(self.index.class_names)


def resolve_benchmark(bench: Benchmark) -> ResolvedBenchmark:
    """Read the index, apply split and class names, and check the expected content hash."""
    from morphmlp.data.index import read_index

    index_uri = bench.index
    if index_uri == DEMO_INDEX:
        from morphmlp.data.demo import ensure_demo_dataset

        index_uri = ensure_demo_dataset()
    index = read_index(index_uri)
    if bench.split is not None:
        index = index.split(bench.split)
    if bench.class_names is not None:
        if len(bench.class_names) != index.num_classes:
            raise CatalogError(
                f"benchmark {bench.name!r}: {len(bench.class_names)} class names given but the "
                f"index {storage.redact(index_uri)} has {index.num_classes} classes"
            )
        index = dataclasses.replace(index, class_names=list(bench.class_names))
    digest = index.content_hash()
    if bench.content_hash is not None and digest != bench.content_hash:
        raise BenchmarkHashError(
            f"benchmark {bench.name!r}: index {storage.redact(index_uri)} hashes to {digest}, "
            f"the catalog expects {bench.content_hash}; the data changed: check it, then update "
            "content_hash in the catalog"
        )
    return ResolvedBenchmark(bench, index, digest, bench.protocol.content_hash())


def index_benchmark(
    index_uri: str, *, name: str | None = None, split: str | None = None, protocol: Protocol
) -> Benchmark:
    """A benchmark for an index given on the command line instead of through a catalog."""
    if name is None:
        stem = index_uri.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", stem) + (f".{split}" if split else "")
    return Benchmark(name=name, index=index_uri, protocol=protocol, split=split)


def _hash(tree: object) -> str:
    """Short stable hash of a JSON-able tree (12 hex digits: plenty for a handful of protocols)."""
    text = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
