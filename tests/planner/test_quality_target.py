"""The perplexity mapping: fitting, budgets, the statistics file section, percentages, paths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from planner.errors import ProfileError
from planner.quality_target import (
    PplPoint,
    default_stats_path,
    fit_ppl_mapping,
    parse_mapping,
    parse_ppl_increase,
    stats_key,
)


def points() -> list[PplPoint]:
    base = 50.0
    return [
        PplPoint((8, 8), 0.001, base * math.exp(0.5 * 0.001)),  # below the fit floor
        PplPoint((4, 4), 0.05, base * math.exp(0.10 * 0.05)),
        PplPoint((2, 2), 1.0, base * math.exp(0.08)),
        PplPoint((16, 2), 0.4, base * math.exp(0.12 * 0.4)),
    ]


def test_the_slope_bounds_every_point_above_the_floor() -> None:
    mapping = fit_ppl_mapping(
        points(), 50.0, indicator="measured", text="t", tokens=100, seq_len=16
    )
    assert math.isclose(mapping.slope, 0.12)
    for p in points()[1:]:
        assert math.log(p.perplexity / 50.0) <= mapping.slope * p.omega + 1e-12
    assert 0.07 < mapping.fit_slope < 0.12
    budget = mapping.omega_budget(0.02)
    assert math.isclose(budget, math.log(1.02) / 0.12)
    assert math.isclose(mapping.predicted_increase(budget), 0.02)


def test_the_mapping_round_trips_and_bad_fields_are_named() -> None:
    mapping = fit_ppl_mapping(
        points(), 50.0, indicator="measured", text="t", tokens=100, seq_len=16
    )
    data = json.loads(json.dumps(mapping.to_dict()))
    assert parse_mapping(data, "f.json") == mapping
    data["slope"] = -1
    with pytest.raises(ProfileError, match=r"f.json: ppl_mapping.slope: expected a positive"):
        parse_mapping(data, "f.json")


def test_no_increase_is_an_error() -> None:
    flat = [PplPoint((4,), 0.5, 50.0)]
    with pytest.raises(ProfileError, match="no measured assignment raised"):
        fit_ppl_mapping(flat, 50.0, indicator="measured", text="t", tokens=1, seq_len=1)


@pytest.mark.parametrize(("text", "value"), [("2%", 0.02), ("0.02", 0.02), (" 1.5 % ", 0.015)])
def test_ppl_increase_accepts_fractions_and_percentages(text: str, value: float) -> None:
    assert math.isclose(parse_ppl_increase(text), value)


@pytest.mark.parametrize("text", ["", "two", "-1%", "0", "2%%", "2000%"])
def test_bad_ppl_increases_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ppl_increase(text)


def test_statistics_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PQCTL_STATS_DIR", str(tmp_path))
    assert default_stats_path("bard-tiny") == tmp_path / "bard-tiny.json"
    assert stats_key("org/model-7b") == "org--model-7b"
    model = tmp_path / "my model"
    model.mkdir()
    key = stats_key(str(model))
    assert key.startswith("my_model-") and key == stats_key(str(model / ".." / "my model"))
