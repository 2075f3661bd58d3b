"""Search spaces: a YAML file → validated axes → concrete, costed trial configurations.

A space starts from a named variant and searches the paper's ablation axes (chunk length, depth
and width per stage, MLP ratio, drop path) plus any optimizer or data setting, e.g.:

    variant: xs
    architecture:
      depths: [{choice: [1, 2]}, 1, {choice: [2, 3]}, 1]          # one entry per stage, or
      widths: {choice: [[28, 56, 112, 224], [42, 84, 168, 336]]}  # a choice of whole tuples
      chunk_lengths: [{choice: [7, 14, 28]}, 28, 7, {choice: [4, 8, 16]}]
      mlp_ratio: {choice: [2.0, 3.0]}
      drop_path_rate: {uniform: [0.0, 0.2]}
    training:                                                     # dotted training-config keys
      optim.lr: {loguniform: [2.0e-4, 1.0e-3]}

A value is fixed, `{choice: [...]}` (one drawn per trial), `{grid: [...]}` (every value tried:
the trial count is multiplied by the grid's size, as with Tune's grid_search), or a float range,
`{uniform: [low, high]}` / `{loguniform: [low, high]}`. Fields left out keep the variant's value.

Which chunk lengths fit a stage depends on its width (L must divide the H·W token plane, and the
width, which is split into L channel groups), so chunk lengths are drawn *given* the trial's
widths, from the stage's listed lengths that fit. `SearchSpace.check` rejects a space in which a
listed length fits none of the stage's widths, or a width has no listed length that fits.

All sampling happens in the driver, before anything launches: every trial is a valid
architecture with known params and GMACs, and under a GMACs budget the draws over it are drawn
again (never trained).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from morphmlp.config import from_dict, load_yaml, merge, to_dict
from morphmlp.errors import ConfigError
from morphmlp.models.variants import MorphMLPConfig, valid_chunk_lengths
from morphmlp.train.config import TrainJobConfig

DEFAULT_SPACE = os.path.join(os.path.dirname(__file__), "spaces", "default.yaml")

KINDS = ("choice", "grid", "uniform", "loguniform")
STAGE_FIELDS = ("depths", "widths", "chunk_lengths")  # one value per stage
SCALAR_FIELDS = ("mlp_ratio", "drop_path_rate")
# Training keys the search sets itself (architecture, --epochs, --dataset, resources, run).
FIXED_SECTIONS = ("model", "scaling", "run")
FIXED_KEYS = (
    "dataset",
    "optim.epochs",
    "data.num_frames",
    "data.train_crop_size",
    "data.test_crop_size",
)
# Draws allowed for one trial before a GMACs budget is declared out of reach.
MAX_DRAWS_PER_TRIAL = 50
_CHUNK_RULE = "a chunk length must divide the plane and the width (its channel groups)"


class SearchSpaceError(ConfigError):
    """A search space that is malformed, or lists values that can never make a valid trial."""


@dataclass(frozen=True)
class Param:
    """A searched value: `kind` is one of KINDS; `values` the options, or (low, high)."""

    kind: str
    values: tuple

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"


@dataclass(frozen=True)
class Trial:
    """One configuration to train: its architecture, training overrides and cost."""

    name: str
    arch: MorphMLPConfig
    training: dict[str, Any]  # dotted training-config key -> value
    values: dict[str, Any]  # the searched values (what tells trials apart in the results)
    gmacs: float
    params: int


@dataclass
class SearchSpace:
    variant: str
    # field -> fixed value | Param; per-stage fields may also be a list of (int | Param)
    architecture: dict[str, Any]
    training: dict[str, Any]  # dotted key -> fixed value | Param
    source: str = "search space"

    # -- validation ----------------------------------------------------------------------------
    def check(self, base: MorphMLPConfig, base_tree: Mapping[str, Any]) -> None:
        """Reject the space unless every listed value can be part of a valid trial.

        `base` is the variant at the run's frames and size: its token planes decide which chunk
        lengths fit. `base_tree` is the resolved training config the trials start from.
        """
        for field in STAGE_FIELDS:
            for option in self._options(field, base):
                if len(option) != base.num_stages:
                    self._fail(
                        f"architecture.{field}: {list(option)} has {len(option)} values for "
                        f"{base.num_stages} stages; give one per stage"
                    )
        self._check_chunk_lengths(base)
        # Every other listed value, on the base architecture (with widths and chunk lengths the
        # space allows) changed in that field alone.
        for field in self.architecture:
            if field == "chunk_lengths":
                continue
            for option in self._options(field, base):
                widths = option if field == "widths" else self._options("widths", base)[0]
                change = {
                    field: option,
                    "widths": widths,
                    "chunk_lengths": self._first_fitting(base, widths),
                }
                self._build(base, change, f"architecture.{field} = {_plain(option)}")
        for key, value in self.training.items():
            for option in value.values if isinstance(value, Param) else (value,):
                try:
                    from_dict(TrainJobConfig, training_tree(base_tree, {key: option}))
                except ConfigError as err:
                    self._fail(f"training.{key} = {option!r}: {err}")

    def _check_chunk_lengths(self, base: MorphMLPConfig) -> None:
        widths_by_stage = [
            list(dict.fromkeys(option[i] for option in self._options("widths", base)))
            for i in range(base.num_stages)
        ]
        for i, ((_, h, w), entry, widths) in enumerate(
            zip(base.grids, self._chunk_entries(base), widths_by_stage, strict=True), start=1
        ):
            fits = {width: valid_chunk_lengths(h * w, width) for width in widths}
            where = f"architecture.chunk_lengths, stage {i} ({h}×{w}={h * w}-token plane)"
            valid = "; ".join(f"width {k}: {_join(v)}" for k, v in fits.items())
            listed = entry.values if isinstance(entry, Param) else (entry,)
            every_width = not isinstance(entry, Param) or entry.is_grid
            for length in listed:
                misfits = [width for width in widths if length not in fits[width]]
                if len(misfits) == len(widths):
                    self._fail(
                        f"{where}: chunk length {length} fits none of the stage's widths "
                        f"({_join(widths)}); {_CHUNK_RULE}. Valid here: {valid}"
                    )
                if every_width and misfits:
                    self._fail(
                        f"{where}: chunk length {length} is used with every width (fixed or "
                        f"grid) but does not fit width {_join(misfits)}; {_CHUNK_RULE}. "
                        f"Valid here: {valid}"
                    )
            for width in widths:
                if not any(length in fits[width] for length in listed):
                    self._fail(
                        f"{where}: none of the chunk lengths {_join(listed)} fits width {width}; "
                        f"{_CHUNK_RULE}. Valid for width {width}: {_join(fits[width])}"
                    )

    def _options(self, field: str, base: MorphMLPConfig) -> list[Any]:
        """Every value `field` can take (per-stage entries combined)."""
        value = self.architecture.get(field, getattr(base, field))
        if isinstance(value, Param):
            return list(value.values)
        if isinstance(value, list):
            per_stage = [e.values if isinstance(e, Param) else (e,) for e in value]
            return list(itertools.product(*per_stage))
        return [value]

    def _chunk_entries(self, base: MorphMLPConfig) -> list[Any]:
        return list(self.architecture.get("chunk_lengths", base.chunk_lengths))

    def _first_fitting(self, base: MorphMLPConfig, widths: Sequence[int]) -> tuple[int, ...]:
        lengths = []
        for (_, h, w), entry, width in zip(
            base.grids, self._chunk_entries(base), widths, strict=True
        ):
            listed = entry.values if isinstance(entry, Param) else (entry,)
            lengths.append(next(L for L in listed if L in valid_chunk_lengths(h * w, width)))
        return tuple(lengths)

    def _build(self, base: MorphMLPConfig, change: Mapping[str, Any], what: str) -> MorphMLPConfig:
        try:
            return from_dict(MorphMLPConfig, {**to_dict(base), **change})
        except ConfigError as err:
            self._fail(f"{what}: {err}")

    def _fail(self, message: str):
        raise SearchSpaceError(f"{self.source}: {message}")

    # -- sampling --------------------------------------------------------------------------------
    def sample(
        self,
        base: MorphMLPConfig,
        num_samples: int,
        *,
        seed: int = 0,
        max_gmacs: float | None = None,
    ) -> list[Trial]:
        """`num_samples` random draws at every point of the grid (like Tune's num_samples), each
        a valid architecture with its cost; a draw over `max_gmacs` is drawn again."""
        from morphmlp.models import count_gmacs, count_params

        rng = np.random.default_rng(seed)
        grid = self._grid_axes()
        costs: dict[MorphMLPConfig, tuple[float, int]] = {}
        trials: list[Trial] = []
        # Tune's order: the whole grid, num_samples times over.
        for _, point in itertools.product(range(num_samples), itertools.product(*grid.values())):
            fixed = dict(zip(grid, point, strict=True))
            cheapest = math.inf
            for _ in range(MAX_DRAWS_PER_TRIAL):
                arch, training, values = self._draw(base, fixed, rng)
                if arch not in costs:
                    costs[arch] = (count_gmacs(arch), count_params(arch))
                gmacs, params = costs[arch]
                cheapest = min(cheapest, gmacs)
                if max_gmacs is None or gmacs <= max_gmacs:
                    name = f"trial-{len(trials):03d}"
                    trials.append(Trial(name, arch, training, values, gmacs, params))
                    break
            else:
                at = f" at grid point {_describe(fixed)}" if fixed else ""
                self._fail(
                    f"none of {MAX_DRAWS_PER_TRIAL} drawn configurations{at} fits the budget of "
                    f"{max_gmacs:g} GMACs (the cheapest drawn: {cheapest:.3f} GMACs); raise "
                    "--gmacs-budget or narrow the space"
                )
        return trials

    def _grid_axes(self) -> dict[str, tuple]:
        """Axis name (e.g. "depths, stage 3", "optim.lr") -> values, for every grid."""
        axes = {}
        for field, value in self.architecture.items():
            if isinstance(value, Param) and value.is_grid:
                axes[field] = value.values
            elif isinstance(value, list):
                for i, entry in enumerate(value):
                    if isinstance(entry, Param) and entry.is_grid:
                        axes[_stage_axis(field, i)] = entry.values
        for key, value in self.training.items():
            if isinstance(value, Param) and value.is_grid:
                axes[key] = value.values
        return axes

    def _draw(self, base: MorphMLPConfig, fixed: Mapping[str, Any], rng: np.random.Generator):
        def pick(axis: str, value: Any) -> Any:
            if axis in fixed:
                return fixed[axis]
            return _draw_one(value, rng) if isinstance(value, Param) else value

        arch: dict[str, Any] = {}
        for field, value in self.architecture.items():
            if field == "chunk_lengths":
                continue
            if isinstance(value, list):
                arch[field] = tuple(pick(_stage_axis(field, i), v) for i, v in enumerate(value))
            else:
                arch[field] = pick(field, value)
        # Chunk lengths last: a stage draws from its listed lengths that fit the drawn width.
        if "chunk_lengths" in self.architecture:
            widths = arch.get("widths", base.widths)
            lengths = []
            for i, ((_, h, w), entry, width) in enumerate(
                zip(base.grids, self.architecture["chunk_lengths"], widths, strict=True)
            ):
                if isinstance(entry, Param) and not entry.is_grid:
                    fitting = [L for L in entry.values if L in valid_chunk_lengths(h * w, width)]
                    lengths.append(fitting[int(rng.integers(len(fitting)))])
                else:
                    lengths.append(pick(_stage_axis("chunk_lengths", i), entry))
            arch["chunk_lengths"] = tuple(lengths)
        training = {key: pick(key, value) for key, value in self.training.items()}
        values = {f: _plain(arch[f]) for f in self.architecture if _searched(self.architecture[f])}
        values |= {k: v for k, v in training.items() if isinstance(self.training[k], Param)}
        cfg = self._build(base, arch, f"drawn architecture {values}")
        return cfg, training, values


def training_tree(base_tree: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base_tree` with dotted keys ("optim.lr") set to the given values."""
    tree = dict(base_tree)
    for key, value in overrides.items():
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        tree = merge(tree, nested)
    return tree


# ---------------------------------------------------------------------------------------------
# Parsing


def load_space(uri: str) -> SearchSpace:
    """Read and parse a search-space YAML (any URI); `SearchSpace.check` validates the values."""
    return parse_space(load_yaml(uri), source=uri)


def parse_space(data: Mapping[str, Any], *, source: str = "search space") -> SearchSpace:
    allowed = ("variant", "architecture", "training")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SearchSpaceError(f"{source}: unknown key {unknown[0]!r}; allowed: {_join(allowed)}")
    variant = data.get("variant")
    if not isinstance(variant, str) or not variant:
        raise SearchSpaceError(f"{source}: 'variant' must name the variant the space starts from")
    sections = {name: data.get(name) or {} for name in ("architecture", "training")}
    for name, section in sections.items():
        if not isinstance(section, Mapping):
            raise SearchSpaceError(f"{source}: '{name}' must be a mapping, got {section!r}")
    searchable = STAGE_FIELDS + SCALAR_FIELDS
    architecture: dict[str, Any] = {}
    for field, value in sections["architecture"].items():
        where = f"{source}: architecture.{field}"
        if field not in searchable:
            raise SearchSpaceError(
                f"{where} can't be searched; searchable: {_join(searchable)} (frames and size "
                "come from the training config: model.num_frames, model.img_size)"
            )
        if field in STAGE_FIELDS:
            architecture[field] = _parse_stage_field(field, value, where)
        elif isinstance(value, Mapping):
            architecture[field] = _parse_param(value, where)
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise SearchSpaceError(f"{where}: expected a number or a search value, got {value!r}")
        else:
            architecture[field] = value
    training: dict[str, Any] = {}
    for key, value in sections["training"].items():
        key = str(key)
        if key in FIXED_KEYS or key.split(".")[0] in FIXED_SECTIONS:
            raise SearchSpaceError(
                f"{source}: training.{key} can't be searched: the search sets it (architecture, "
                "--epochs, --dataset, resources, run settings); search optim.* and data.* keys"
            )
        where = f"{source}: training.{key}"
        training[key] = _parse_param(value, where) if isinstance(value, Mapping) else value
    return SearchSpace(variant, architecture, training, source)


def _parse_stage_field(field: str, value: Any, where: str) -> Any:
    """A list with one entry (an integer or a Param of integers) per stage, or a Param whose
    options are whole tuples. Chunk lengths must be per stage: what fits depends on the width."""
    if isinstance(value, Mapping):
        if field == "chunk_lengths":
            raise SearchSpaceError(
                f"{where}: give one entry per stage, e.g. [{{choice: [7, 14]}}, 28, 7, 16]: the "
                "lengths that fit a stage depend on its width"
            )
        param = _parse_param(value, where, integers=True)
        return Param(param.kind, tuple(tuple(_integers(o, where)) for o in param.values))
    if not isinstance(value, list) or not value:
        raise SearchSpaceError(f"{where}: expected a list with one entry per stage, got {value!r}")
    entries: list[Any] = []
    for i, entry in enumerate(value, start=1):
        at = f"{where}, stage {i}"
        if isinstance(entry, Mapping):
            param = _parse_param(entry, at, integers=True)
            entries.append(Param(param.kind, tuple(_integers(param.values, at))))
        else:
            entries.append(_integers([entry], at)[0])
    return entries


def _parse_param(value: Mapping[str, Any], where: str, *, integers: bool = False) -> Param:
    if len(value) != 1 or next(iter(value)) not in KINDS:
        raise SearchSpaceError(
            f"{where}: {dict(value)!r} is not a search value; use one of "
            + ", ".join(f"{{{kind}: [...]}}" for kind in KINDS)
        )
    kind, options = next(iter(value.items()))
    if not isinstance(options, list) or not options:
        raise SearchSpaceError(f"{where}: {kind} needs a non-empty list, got {options!r}")
    if kind in ("uniform", "loguniform"):
        if integers:
            raise SearchSpaceError(f"{where}: {kind} is a float range; use choice for integers")
        return Param(kind, _range(options, kind, where))
    if len({repr(v) for v in options}) != len(options):
        raise SearchSpaceError(f"{where}: {kind} lists a value twice: {options!r}")
    return Param(kind, tuple(options))


def _range(options: list, kind: str, where: str) -> tuple[float, float]:
    try:  # YAML 1.1 reads 2e-4 (no dot) as a string
        low, high = (float(v) for v in options if not isinstance(v, bool))
    except (TypeError, ValueError):
        raise SearchSpaceError(f"{where}: {kind} needs [low, high], got {options!r}") from None
    if not low < high:
        raise SearchSpaceError(f"{where}: {kind} [{low:g}, {high:g}]: low must be below high")
    if kind == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}: loguniform [{low:g}, {high:g}]: low must be > 0")
    return low, high


def _integers(values: Any, where: str) -> list[int]:
    if not isinstance(values, list | tuple):
        raise SearchSpaceError(f"{where}: expected a list of integers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise SearchSpaceError(f"{where}: {v!r} is not an integer")
    return list(values)


# ---------------------------------------------------------------------------------------------
# Helpers


def _draw_one(param: Param, rng: np.random.Generator) -> Any:
    if param.kind == "uniform":
        return float(rng.uniform(*param.values))
    if param.kind == "loguniform":
        low, high = param.values
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    return param.values[int(rng.integers(len(param.values)))]


def _searched(value: Any) -> bool:
    if isinstance(value, list):
        return any(isinstance(v, Param) for v in value)
    return isinstance(value, Param)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _stage_axis(field: str, index: int) -> str:
    return f"{field}, stage {index + 1}"


def _describe(fixed: Mapping[str, Any]) -> str:
    return "; ".join(f"{axis}: {_plain(value)}" for axis, value in fixed.items())


def _join(values: Sequence[Any]) -> str:
    return ", ".join(map(str, values))
