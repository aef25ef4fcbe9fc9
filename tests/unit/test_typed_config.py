"""core/typed_config.py's declared checks: Literal choices and ranged() field ranges, on a toy config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import pytest

from core.typed_config import ConfigError, build, check_choices, check_field_ranges, load_yaml, ranged


@dataclass
class Inner:
    mode: Literal["fast", "slow"] = "fast"
    level: Literal[0, 1, 2] = 0
    rate: float = ranged(0.5, 0, 1, "(]")  # low excluded, high included
    betas: list[float] = ranged([0.5, 0.5], 0, 1, "[)")  # low included, high excluded
    count: int = ranged(1, 1)  # closed, unbounded above
    anything: float = ranged(-3.0)  # any finite number
    below: int = ranged(0, None, 10, "[)")  # unbounded below
    free: int = 7  # no metadata: unchecked

    def __post_init__(self) -> None:
        check_choices(self, "inner.")


@dataclass
class Root:
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self) -> None:
        check_field_ranges(self)


def load(tmp_path, text: str = "", overrides: list[str] | None = None) -> Root:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return build(Root, load_yaml(path, overrides))


def test_a_literal_field_refuses_an_unknown_value_from_yaml_and_from_an_override(tmp_path):
    with pytest.raises(ConfigError, match=r"^inner\.mode: expected one of \('fast', 'slow'\), got 'medium'$"):
        load(tmp_path, "inner:\n  mode: medium\n")
    with pytest.raises(ConfigError, match=r"^inner\.mode: expected one of \('fast', 'slow'\), got 'medium'$"):
        load(tmp_path, overrides=["inner.mode=medium"])
    with pytest.raises(ConfigError, match=r"^inner\.level: expected one of \(0, 1, 2\), got 3$"):
        load(tmp_path, overrides=["inner.level=3"])
    assert load(tmp_path, "inner:\n  mode: slow\n", ["inner.level=2"]).inner == Inner(mode="slow", level=2)


@dataclass
class Mixed:
    value: Literal["auto", 0] = "auto"


def test_a_literal_of_mixed_types_is_refused_as_unsupported():
    with pytest.raises(ConfigError, match=r"^value: unsupported config type .*choices of one type only"):
        build(Mixed, {"value": 0})


def test_a_literal_field_keeps_its_values_type_check(tmp_path):
    with pytest.raises(ConfigError, match=r"^inner\.mode: expected str, got int 3$"):
        load(tmp_path, overrides=["inner.mode=3"])
    with pytest.raises(ConfigError, match=r"^inner\.level: expected int, got str 'two'$"):
        load(tmp_path, overrides=["inner.level=two"])
    with pytest.raises(ConfigError, match=r"^inner\.level: expected int, got bool True$"):
        load(tmp_path, overrides=["inner.level=true"])


def test_a_literal_field_is_checked_when_its_section_is_built_in_code():
    with pytest.raises(ConfigError, match=r"^inner\.mode: expected one of \('fast', 'slow'\), got 'medium'$"):
        Inner(mode="medium")  # type: ignore[arg-type]


@pytest.mark.parametrize("setting, message", [
    ("inner.rate=0", r"^inner\.rate: must be in \(0, 1\], got 0\.0$"),  # excluded low bound
    ("inner.rate=1.0000001", r"^inner\.rate: must be in \(0, 1\], got 1\.0000001$"),
    ("inner.betas=[0.5,1.0]", r"^inner\.betas\[1\]: must be in \[0, 1\), got 1\.0$"),  # excluded high bound
    ("inner.betas=[-0.001,0.5]", r"^inner\.betas\[0\]: must be in \[0, 1\), got -0\.001$"),
    ("inner.count=0", r"^inner\.count: must be >= 1, got 0$"),
    ("inner.below=10", r"^inner\.below: must be < 10, got 10$"),
])
def test_a_range_refuses_just_outside_its_bounds(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, overrides=[setting])


def test_a_range_accepts_its_included_bounds_and_just_inside_the_excluded_ones(tmp_path):
    cfg = load(tmp_path, overrides=["inner.rate=1", "inner.betas=[0,0.999999]", "inner.count=1", "inner.anything=-1e9"])
    assert (cfg.inner.rate, cfg.inner.betas, cfg.inner.count, cfg.inner.anything) == (1.0, [0.0, 0.999999], 1, -1e9)
    assert load(tmp_path, overrides=["inner.rate=1e-12"]).inner.rate == 1e-12
    assert load(tmp_path, overrides=["inner.below=-1000000"]).inner.below == -1000000
    assert load(tmp_path, overrides=["inner.below=9"]).inner.below == 9


def test_a_range_refuses_a_non_finite_value_set_in_code():
    with pytest.raises(ConfigError, match=r"^inner\.anything: must be a finite number, got nan$"):
        Root(Inner(anything=math.nan))
    with pytest.raises(ConfigError, match=r"^inner\.betas\[0\]: must be a finite number, got inf$"):
        Root(Inner(betas=[math.inf, 0.5]))


def test_a_field_without_metadata_is_unchecked(tmp_path):
    assert load(tmp_path, overrides=["inner.free=-1000000"]).inner.free == -1000000
    assert Root(Inner(free=-5)).inner.free == -5


def test_ranged_lists_are_not_shared_and_a_bad_kind_is_refused():
    a, b = Inner(), Inner()
    a.betas.append(0.1)
    assert b.betas == [0.5, 0.5]
    with pytest.raises(ValueError, match="range kind"):
        ranged(1, 0, 1, "()")  # type: ignore[arg-type]
