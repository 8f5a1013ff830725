"""Tests of planner/indicator.py: Theorem-1 operator terms, the prior, statistics files."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planner.errors import ProfileError
from planner.indicator import (
    BITS_COLUMN,
    STATS_FORMAT,
    OpStats,
    QualityIndicator,
    indicator_from_stats,
    load_stats_indicator,
    op_omega,
    parse_stats,
    prior_indicator,
    prior_op_stats,
    quantization_step_sq,
)
from planner.model_spec import LinearOp, ModelSpec, load_model_spec


def tiny_llama(num_layers: int = 4) -> ModelSpec:
    """hidden 64, 4 heads of 16, 2 KV heads, FFN 128: q/k/v/o/gate/up read 64, down reads 128."""
    return ModelSpec(
        source="test", family="llama", num_layers=num_layers, hidden_size=64,
        intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=1000,
        max_positions=2048, tied_embeddings=True, gated_mlp=True, attention_bias=False,
        output_bias=False, mlp_bias=False, position_table_rows=0, embed_dim=64, norm_bias=False,
    )  # fmt: skip


STATS = OpStats(
    in_features=256, input_sq_mean=0.5, group_range_sq_mean=0.09, row_absmax_sq_mean=0.04
)


# --------------------------------------------------------------------------- Theorem 1


@pytest.mark.parametrize(
    ("bits", "step_sq"),
    [
        (2, 0.09 / 9),  # (2^2 - 1)^2
        (3, 0.09 / 49),  # (2^3 - 1)^2
        (4, 0.09 / 225),  # (2^4 - 1)^2
        (8, 0.04 / 16129),  # 127^2
        (16, 0.0),
    ],
)
def test_op_omega_is_d_in_times_second_moment_times_step_sq_over_12(
    bits: int, step_sq: float
) -> None:
    assert quantization_step_sq(STATS, bits) == pytest.approx(step_sq, rel=1e-15)
    assert op_omega(STATS, bits) == pytest.approx(256 * 0.5 * step_sq / 12, rel=1e-15)


def test_op_omega_hand_numbers() -> None:
    assert op_omega(STATS, 2) == pytest.approx(128 * 0.01 / 12)  # 0.10666...
    assert op_omega(STATS, 4) == pytest.approx(128 * 0.0004 / 12)  # 0.0042666...
    assert op_omega(STATS, 16) == 0.0


def test_op_omega_is_linear_in_input_dimension_and_second_moment() -> None:
    double_d = OpStats(512, 0.5, 0.09, 0.04)
    triple_x = OpStats(256, 1.5, 0.09, 0.04)
    for bits in (2, 3, 4, 8):
        assert op_omega(double_d, bits) == pytest.approx(2 * op_omega(STATS, bits))
        assert op_omega(triple_x, bits) == pytest.approx(3 * op_omega(STATS, bits))


def test_prior_op_stats() -> None:
    down = prior_op_stats(LinearOp("down_proj", 4096, 1024, False), group_size=128)
    assert down == OpStats(
        in_features=4096,
        input_sq_mean=1.0,
        group_range_sq_mean=8 * math.log(128) / 4096,
        row_absmax_sq_mean=2 * math.log(4096) / 4096,
    )
    # A group never spans more than the row.
    narrow = prior_op_stats(LinearOp("q_proj", 64, 64, False), group_size=128)
    assert narrow.group_range_sq_mean == pytest.approx(8 * math.log(64) / 64)


# --------------------------------------------------------------------------- prior indicator


def test_prior_hand_computed_for_a_tiny_model() -> None:
    model = tiny_llama(num_layers=4)
    indicator = prior_indicator(model, group_size=128)
    # Per layer, D_in cancels: each op at b <= 4 bits gives 8 ln(g) / ((2^b - 1)^2 * 12) with
    # g = min(128, D_in); six ops read 64 features, down_proj reads 128.
    raw_2 = (6 * 8 * math.log(64) + 8 * math.log(128)) / (9 * 12)
    raw_8 = (6 * 2 * math.log(64) + 2 * math.log(128)) / (127**2 * 12)
    assert indicator.name == "prior"
    assert indicator.omega.shape == (4, 5)
    assert indicator.layer_omega(0, 2) == pytest.approx(0.25)
    assert indicator.layer_omega(3, 4) == pytest.approx(0.25 * 9 / 225)
    assert indicator.layer_omega(1, 3) == pytest.approx(0.25 * 9 / 49)
    assert indicator.layer_omega(2, 8) == pytest.approx(raw_8 / (4 * raw_2))
    assert indicator.layer_omega(2, 16) == 0.0


@pytest.mark.parametrize("name", ["opt-13b", "llama-3.1-8b"])
def test_prior_every_layer_alike_and_normalised(name: str) -> None:
    model = load_model_spec(name)
    indicator = prior_indicator(model, group_size=128)
    layers = model.num_layers
    assert indicator.num_layers == layers
    assert indicator.layers_alike
    assert indicator.plan_omega([2] * layers) == pytest.approx(1.0, rel=0, abs=1e-12)
    assert indicator.omega[:, BITS_COLUMN[2]].sum() == pytest.approx(1.0, rel=0, abs=1e-12)
    assert indicator.plan_omega([16] * layers) == 0.0
    assert indicator.layer_omega(layers - 1, 2) == pytest.approx(1 / layers)


@pytest.mark.parametrize("name", ["opt-13b", "llama-3.1-8b"])
def test_prior_omega_strictly_decreases_with_more_bits(name: str) -> None:
    indicator = prior_indicator(load_model_spec(name), group_size=128)
    for layer in (0, indicator.num_layers - 1):
        values = [indicator.layer_omega(layer, b) for b in (2, 3, 4, 8, 16)]
        assert all(a > b for a, b in itertools.pairwise(values)), values


def test_plan_omega_sums_the_chosen_columns() -> None:
    indicator = prior_indicator(tiny_llama(4), group_size=128)
    mixed = [2, 4, 16, 8]
    expected = sum(indicator.omega[i, BITS_COLUMN[b]] for i, b in enumerate(mixed))
    assert indicator.plan_omega(mixed) == pytest.approx(expected)
    assert indicator.plan_omega([2, 2, 16, 16]) == pytest.approx(0.5)


def test_bits_column_order_is_highest_first() -> None:
    assert BITS_COLUMN == {16: 0, 8: 1, 4: 2, 3: 3, 2: 4}


# --------------------------------------------------------------------------- from statistics


def layer_stats(model: ModelSpec, input_sq_mean: float) -> list[OpStats]:
    return [OpStats(op.in_features, input_sq_mean, 0.02, 0.01) for op in model.layer_linears()]


def test_layer_varying_statistics_are_not_alike() -> None:
    model = tiny_llama(3)
    stats = [layer_stats(model, 1.0), layer_stats(model, 3.0), layer_stats(model, 0.5)]
    indicator = indicator_from_stats(stats)
    assert indicator.name == "variance"
    assert not indicator.layers_alike
    for bits in (2, 3, 4, 8):
        ratio = indicator.layer_omega(1, bits) / indicator.layer_omega(0, bits)
        assert ratio == pytest.approx(3.0, rel=1e-12)
        ratio = indicator.layer_omega(2, bits) / indicator.layer_omega(0, bits)
        assert ratio == pytest.approx(0.5, rel=1e-12)
    # Normalised so the all-2-bit total is 1: layer shares 1 : 3 : 0.5.
    assert indicator.layer_omega(0, 2) == pytest.approx(1 / 4.5)
    assert indicator.plan_omega([2, 2, 2]) == pytest.approx(1.0)
    assert indicator.plan_omega([16, 16, 16]) == 0.0


def test_statistics_without_any_error_are_rejected() -> None:
    model = tiny_llama(2)
    silent = [[OpStats(op.in_features, 0.0, 0.02, 0.01) for op in model.layer_linears()]] * 2
    with pytest.raises(ProfileError) as info:
        indicator_from_stats(silent)
    assert str(info.value) == "quality statistics give no error even at 2 bits; recalibrate"


def test_layers_alike_compares_every_row() -> None:
    omega = np.array([[0.0, 0.1, 0.2], [0.0, 0.1, 0.2]])
    assert QualityIndicator("x", omega).layers_alike
    assert not QualityIndicator("x", omega * np.array([[1.0], [1.0 + 1e-9]])).layers_alike


# --------------------------------------------------------------------------- statistics files


def stats_data(model: ModelSpec) -> dict[str, Any]:
    """A valid statistics file for ``model``; layer i has E[x^2] = 1 + i."""
    return {
        "format": STATS_FORMAT,
        "version": 1,
        "group_size": 128,
        "tokens": 65536,
        "model": {"family": model.family, "num_layers": model.num_layers, "hidden_size": 64},
        "layers": [
            {
                op.name: {
                    "in_features": op.in_features,
                    "input_sq_mean": 1.0 + i,
                    "group_range_sq_mean": 0.03 * (k + 1),
                    "row_absmax_sq_mean": 0.01,
                }
                for k, op in enumerate(model.layer_linears())
            }
            for i in range(model.num_layers)
        ],
    }


def test_statistics_file_round_trip(tmp_path: Path) -> None:
    model = tiny_llama(3)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats_data(model)), encoding="utf-8")
    expected = [
        [
            OpStats(op.in_features, 1.0 + i, 0.03 * (k + 1), 0.01)
            for k, op in enumerate(model.layer_linears())
        ]
        for i in range(3)
    ]
    assert parse_stats(stats_data(model), "inline", model) == expected
    indicator = load_stats_indicator(path, model)
    assert indicator.name == "variance"
    np.testing.assert_array_equal(indicator.omega, indicator_from_stats(expected).omega)
    assert indicator.layer_omega(2, 4) / indicator.layer_omega(0, 4) == pytest.approx(3.0)


def _break(edit: str) -> dict[str, Any]:
    data = stats_data(tiny_llama(3))
    if edit == "extra-layer":
        data["layers"].append(data["layers"][0])
    elif edit == "no-layers":
        del data["layers"]
    elif edit == "missing-op":
        del data["layers"][1]["k_proj"]
    elif edit == "op-not-object":
        data["layers"][2]["up_proj"] = 0.5
    elif edit == "layer-not-object":
        data["layers"][1] = []
    elif edit == "wrong-in-features":
        data["layers"][0]["down_proj"]["in_features"] = 64
    elif edit == "negative-value":
        data["layers"][0]["q_proj"]["input_sq_mean"] = -0.1
    elif edit == "missing-value":
        del data["layers"][2]["o_proj"]["row_absmax_sq_mean"]
    elif edit == "bool-value":
        data["layers"][1]["v_proj"]["group_range_sq_mean"] = True
    elif edit == "nan-value":
        data["layers"][1]["v_proj"]["group_range_sq_mean"] = float("nan")
    elif edit == "wrong-format":
        data["format"] = "pqctl-latency-profile"
    elif edit == "wrong-version":
        data["version"] = 3
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("extra-layer", "layers: 4 layers of statistics for a model with 3 layers"),
        ("no-layers", "layers: no layers of statistics for a model with 3 layers"),
        ("missing-op", "layers[1].k_proj: missing"),
        ("op-not-object", "layers[2].up_proj: missing"),
        ("layer-not-object", "layers[1].q_proj: missing"),
        ("wrong-in-features", "layers[0].down_proj.in_features: expected 128 for this model"),
        ("negative-value", "layers[0].q_proj.input_sq_mean: expected a non-negative number"),
        ("missing-value", "layers[2].o_proj.row_absmax_sq_mean: expected a non-negative number"),
        ("bool-value", "layers[1].v_proj.group_range_sq_mean: expected a non-negative number"),
        ("nan-value", "layers[1].v_proj.group_range_sq_mean: expected a non-negative number"),
        ("wrong-format", 'format: expected "pqctl-activation-stats"'),
        ("wrong-version", "version: expected 1 or 2"),
    ],
)
def test_bad_statistics_file(tmp_path: Path, edit: str, message: str) -> None:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(_break(edit)), encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_stats_indicator(path, tiny_llama(3))
    assert str(info.value) == f"{path}: {message}"


def test_statistics_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    path.write_text("layers: 3", encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_stats_indicator(path, tiny_llama(3))
    assert str(info.value) == f"{path}: not valid JSON: Expecting value: line 1 column 1 (char 0)"


def test_statistics_file_that_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ProfileError) as info:
        load_stats_indicator(path, tiny_llama(3))
    assert str(info.value) == f"{path}: cannot read (No such file or directory)"


def test_statistics_for_another_model_shape_are_rejected() -> None:
    data = stats_data(tiny_llama(3))
    opt_like = load_model_spec("opt-13b")
    with pytest.raises(ProfileError) as info:
        parse_stats(data, "inline", opt_like)
    assert str(info.value) == "inline: layers: 3 layers of statistics for a model with 40 layers"


def test_statistics_for_another_group_size_are_refused(tmp_path: Path) -> None:
    model = tiny_llama(3)
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(stats_data(model)), encoding="utf-8")
    assert load_stats_indicator(path, model, group_size=128).name == "variance"
    with pytest.raises(ProfileError) as info:
        load_stats_indicator(path, model, group_size=64)
    assert str(info.value) == (
        f"{path}: group_size: statistics were collected for groups of 128; plan with "
        "--group-size 128 or recalibrate"
    )
    data = stats_data(model)
    data["group_size"] = 0
    with pytest.raises(ProfileError, match="group_size: expected a positive integer"):
        parse_stats(data, "inline", model)
