"""Typed configs: YAML and CLI overrides become dataclasses; bad keys and types fail early."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from morphmlp.config import apply_overrides, flatten, from_dict, merge, to_dict
from morphmlp.errors import ConfigError


@dataclass
class Inner:
    rate: float = 0.1
    sizes: tuple[int, int] = (1, 2)
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    count: int = 1
    maybe: int | None = None
    inner: Inner = field(default_factory=Inner)


def test_from_dict_builds_nested_and_coerces():
    cfg = from_dict(Outer, {"count": 3.0, "inner": {"rate": "2e-4", "sizes": [3, 4], "mode": "b"}})
    assert cfg.count == 3 and isinstance(cfg.count, int)
    assert cfg.inner.rate == pytest.approx(2e-4)
    assert cfg.inner.sizes == (3, 4)
    assert cfg.inner.mode == "b"
    assert to_dict(cfg)["inner"]["sizes"] == [3, 4]


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"cuont": 1}, "unknown config key 'cuont'; allowed keys: count, inner, maybe, name"),
        ({"inner": {"rat": 1}}, "unknown config key 'inner.rat'"),
        ({"count": "many"}, "count: expected an integer, got 'many'"),
        ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not allowed; choose one of 'a', 'b'"),
        ({"inner": {"sizes": [1, 2, 3]}}, "inner.sizes: expected 2 values, got 3"),
        ({"maybe": "x"}, "maybe: 'x' fits none of"),
    ],
)
def test_errors_name_the_key_and_the_allowed_values(tree, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict(Outer, tree)


def test_overrides_parse_yaml_values_and_merge_wins():
    tree = apply_overrides({"inner": {"rate": 1.0}}, ["inner.rate=0.5", "name=run-1", "count=7"])
    assert tree == {"inner": {"rate": 0.5}, "name": "run-1", "count": 7}
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}
    with pytest.raises(ConfigError, match="not of the form key=value"):
        apply_overrides({}, ["nonsense"])
