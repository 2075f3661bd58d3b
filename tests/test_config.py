"""Typed configs: YAML and CLI overrides become dataclasses; bad keys and types fail early."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from morphmlp.config import (
    apply_overrides,
    check_at_least,
    check_positive,
    check_range,
    flatten,
    from_dict,
    load_yaml,
    merge,
    set_key,
    to_dict,
    to_yaml,
)
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


def test_set_key_keeps_a_typed_value_as_given_and_to_yaml_round_trips(tmp_path):
    tree = set_key({"inner": {"rate": 1.0}}, "name", "2025-06-01")
    tree = set_key(tree, "inner.mode", "b")
    assert tree == {"inner": {"rate": 1.0, "mode": "b"}, "name": "2025-06-01"}
    cfg = from_dict(Outer, tree)
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert from_dict(Outer, load_yaml(str(tmp_path / "c.yaml"))) == cfg  # still a string
    with pytest.raises(ConfigError, match=r"name\.x: 'name' is not a section"):
        set_key(tree, "name.x", 1)


@dataclass
class Limits:
    size: int = 1
    share: float = 0.5
    extra: int | None = None


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (lambda c: check_positive("limits", c, "size"), "limits.size=0 must be > 0"),
        (
            lambda c: check_at_least("", c, 1, "extra", optional=True),
            r"^extra=0 must be >= 1 or null$",
        ),
        (
            lambda c: check_range("limits", c, "share", 0, 1, high_open=True),
            r"limits.share=1.0 must be in \[0, 1\)",
        ),
    ],
)
def test_check_rules_name_the_key_the_value_and_the_rule(check, message):
    check(Limits())  # the defaults pass
    with pytest.raises(ConfigError, match=message):
        check(Limits(size=0, share=1.0, extra=0))
