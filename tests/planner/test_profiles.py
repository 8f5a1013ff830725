"""Tests of planner/profiles.py: regression fits, the profile file format, lookup by shape."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from planner.errors import ProfileError
from planner.model_spec import ModelSpec
from planner.profiles import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    LatencyProfile,
    LatencySample,
    ShapeKey,
    default_profile_dir,
    find_profile,
    fit_phase,
    held_out_error,
    load_profile,
    load_profiles,
    parse_profile,
    save_profile,
    shape_key,
)

# Known coefficients of the two regression forms (seconds).
PREFILL = (2e-4, 1e-5, 3e-6, 2e-9, 5e-4)  # a1*b + a2*s + a3*b*s + a4*b*s^2 + c
DECODE = (4e-8, 3e-5, 2e-7, 1e-4)  # b1*b*(1+p) + b2*b + b3*p + c
BATCHES = (1, 2, 4, 8, 16, 32)
PROMPTS = (128, 256, 512)
CONTEXTS = (129, 257, 513, 613)


def prefill_s(b: float, s: float, coefficients: tuple[float, ...] = PREFILL) -> float:
    a1, a2, a3, a4, c = coefficients
    return a1 * b + a2 * s + a3 * b * s + a4 * b * s * s + c


def decode_s(b: float, p: float, coefficients: tuple[float, ...] = DECODE) -> float:
    b1, b2, b3, c = coefficients
    return b1 * b * (1 + p) + b2 * b + b3 * p + c


def grid_samples(bits: int, scale: float = 1.0) -> list[LatencySample]:
    """Exact samples of both forms on LLM-PQ's profiling grid, latencies times ``scale``."""
    prefill = [
        LatencySample("prefill", bits, b, s, scale * prefill_s(b, s))
        for b in BATCHES
        for s in PROMPTS
    ]
    decode = [
        LatencySample("decode", bits, b, p, scale * decode_s(b, p))
        for b in BATCHES
        for p in CONTEXTS
    ]
    return prefill + decode


def llama(hidden: int = 4096, heads: int = 32, kv_heads: int = 8) -> ModelSpec:
    return ModelSpec(
        source="test", family="llama", num_layers=32, hidden_size=hidden,
        intermediate_size=14336, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=hidden // heads, vocab_size=128256, max_positions=8192, tied_embeddings=False,
        gated_mlp=True, attention_bias=False, output_bias=False, mlp_bias=False,
        position_table_rows=0, embed_dim=hidden, norm_bias=False,
    )  # fmt: skip


SHAPE = shape_key(llama())


def make_profile(device_type: str = "T4", shape: ShapeKey = SHAPE) -> LatencyProfile:
    """16 bits as measured, 4 bits at 0.6x, 2 and 3 bits unavailable."""
    samples = grid_samples(16) + grid_samples(4, scale=0.6)
    return LatencyProfile.from_samples(device_type, shape, samples, unavailable_bits=(2, 3))


# --------------------------------------------------------------------------- fits


def test_prefill_fit_recovers_the_coefficients() -> None:
    fit = fit_phase("prefill", [s for s in grid_samples(16) if s.phase == "prefill"])
    assert fit.phase == "prefill"
    assert fit.coefficients == pytest.approx(PREFILL, rel=1e-9)


def test_decode_fit_recovers_the_coefficients() -> None:
    fit = fit_phase("decode", [s for s in grid_samples(16) if s.phase == "decode"])
    assert fit.phase == "decode"
    assert fit.coefficients == pytest.approx(DECODE, rel=1e-9)


def test_floor_is_half_the_fastest_sample() -> None:
    samples = [s for s in grid_samples(16) if s.phase == "decode"]
    fit = fit_phase("decode", samples)
    assert fit.floor_s == min(s.latency_s for s in samples) / 2
    assert fit.floor_s == pytest.approx(decode_s(1, 129) / 2)


@pytest.mark.parametrize(
    ("b", "s"), [(3, 300), (1, 64), (24, 1024), (64, 200)], ids=["inside", "short", "long", "wide"]
)
def test_profile_predicts_prefill_off_grid(b: int, s: int) -> None:
    profile = make_profile()
    assert profile.layer_latency_s(16, "prefill", b, s) == pytest.approx(prefill_s(b, s), rel=1e-9)
    assert profile.layer_latency_s(4, "prefill", b, s) == pytest.approx(
        0.6 * prefill_s(b, s), rel=1e-9
    )


@pytest.mark.parametrize(("b", "p"), [(3, 300), (12, 1000), (64, 2048)])
def test_profile_predicts_decode_off_grid(b: int, p: int) -> None:
    profile = make_profile()
    assert profile.layer_latency_s(16, "decode", b, p) == pytest.approx(decode_s(b, p), rel=1e-9)


def test_floor_prevents_negative_predictions() -> None:
    # Latency falls with context here (b3 < 0), so far extrapolation goes below zero.
    falling = (1e-6, 1e-4, -2e-6, 2e-3)
    samples = [
        LatencySample("decode", 16, b, p, decode_s(b, p, falling))
        for b in BATCHES
        for p in CONTEXTS
    ]
    fit = fit_phase("decode", samples)
    assert decode_s(1, 10_000, falling) < 0
    assert float(np.dot(fit.coefficients, [1 * 10_001, 1, 10_000, 1])) < 0
    assert fit.predict_s(1, 10_000) == fit.floor_s == min(s.latency_s for s in samples) / 2
    assert fit.predict_s(1, 10_000) > 0
    # On the grid the floor does not bite.
    assert fit.predict_s(2, 257) == pytest.approx(decode_s(2, 257, falling), rel=1e-9)


def gemv_decode_s(b: int, p: int) -> float:
    """A CPU-like decode layer: one row takes a GEMV, two or more a GEMM that costs ~1.8x the
    GEMV and grows slowly per row; plus attention over ``p`` positions per row."""
    weights = 3.9e-3 if b == 1 else 6.5e-3 + 0.45e-3 * (b - 2)
    return weights + 2e-7 * b * p


def test_measured_micro_batches_are_predicted_from_their_own_fit() -> None:
    samples = [
        LatencySample("decode", 16, b, p, gemv_decode_s(b, p))
        for b in (1, 2, 4)
        for p in (64, 96, 128)
    ]
    fit = fit_phase("decode", samples)
    # the regression form, linear in the micro-batch, cannot follow the GEMV step
    form = float(np.dot(fit.coefficients, [2 * (1 + 80), 2, 80, 1]))
    assert abs(form - gemv_decode_s(2, 80)) / gemv_decode_s(2, 80) > 0.1
    for b, p in [(1, 64), (2, 80), (2, 128), (4, 100)]:
        assert fit.predict_s(b, p) == pytest.approx(gemv_decode_s(b, p), rel=1e-9)
    # between measured sizes: linear in the micro-batch (exact here: linear from 2 up)
    assert fit.predict_s(3, 96) == pytest.approx(gemv_decode_s(3, 96), rel=1e-9)
    # outside the measured range the form extrapolates
    assert fit.predict_s(8, 96) == pytest.approx(
        float(np.dot(fit.coefficients, [8 * 97, 8, 96, 1])), rel=1e-9
    )
    assert fit.predict_s(2, 512) == pytest.approx(
        float(np.dot(fit.coefficients, [2 * 513, 2, 512, 1])), rel=1e-9
    )


def test_held_out_error_of_interpolation_is_small_where_the_form_misses() -> None:
    samples = [
        LatencySample("decode", 16, b, p, gemv_decode_s(b, p))
        for b in (1, 2, 4, 8)
        for p in (64, 96, 128)
    ]
    error = held_out_error("decode", samples)
    assert error is not None and error < 0.02


def test_too_few_distinct_points_leave_a_phase_unfitted() -> None:
    # Prefill needs 5 distinct (batch, length) points and decode 4; repeats do not count.
    prefill = [LatencySample("prefill", 8, b, 128, prefill_s(b, 128)) for b in (1, 2, 4, 8)]
    prefill += prefill  # 8 samples, 4 distinct points
    decode = [LatencySample("decode", 8, b, 129, decode_s(b, 129)) for b in (1, 2, 4, 8)]
    profile = LatencyProfile.from_samples("T4", SHAPE, prefill + decode)
    assert ("prefill", 8) not in profile.fits
    assert ("decode", 8) in profile.fits
    assert not profile.covers(8)
    assert profile.layer_latency_s(8, "prefill", 1, 128) == math.inf


# --------------------------------------------------------------------------- availability


def test_unavailable_bits_give_inf() -> None:
    profile = make_profile()
    assert profile.layer_latency_s(3, "prefill", 4, 256) == math.inf
    assert profile.layer_latency_s(2, "decode", 4, 257) == math.inf
    assert profile.layer_latency_s(8, "decode", 4, 257) == math.inf  # never measured


def test_unavailable_wins_over_measured_samples() -> None:
    profile = LatencyProfile.from_samples("T4", SHAPE, grid_samples(4), unavailable_bits=(4,))
    assert ("decode", 4) in profile.fits
    assert profile.layer_latency_s(4, "decode", 1, 129) == math.inf


def test_covers_measured_and_unavailable_but_not_unknown_bits() -> None:
    profile = make_profile()
    assert profile.covers(16)
    assert profile.covers(4)
    assert profile.covers(3)
    assert profile.covers(2)
    assert not profile.covers(8)


def test_covers_needs_both_phases() -> None:
    prefill_only = [s for s in grid_samples(8) if s.phase == "prefill"]
    profile = LatencyProfile.from_samples("T4", SHAPE, prefill_only)
    assert ("prefill", 8) in profile.fits
    assert not profile.covers(8)


# --------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    profile = make_profile()
    path = tmp_path / "t4.json"
    save_profile(profile, path)
    loaded = load_profile(path)
    assert loaded == profile
    assert loaded.fits[("prefill", 16)].coefficients == pytest.approx(PREFILL, rel=1e-9)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == PROFILE_FORMAT == "pqctl-latency-profile"
    assert data["version"] == PROFILE_VERSION == 1
    assert data["unavailable_bits"] == [2, 3]
    assert data["model_shape"] == {
        "family": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_heads": 32,
        "num_kv_heads": 8, "head_dim": 128,
    }  # fmt: skip
    assert data["samples"][0] == {
        "phase": "prefill", "bits": 16, "micro_batch": 1, "context_len": 128,
        "latency_s": prefill_s(1, 128),
    }  # fmt: skip
    assert len(data["samples"]) == 2 * (len(BATCHES) * (len(PROMPTS) + len(CONTEXTS)))


def test_shape_key_takes_the_latency_relevant_fields() -> None:
    model = llama()
    assert shape_key(model) == ShapeKey("llama", 4096, 14336, 32, 8, 128)


def test_load_profiles_and_find_by_device_type_and_shape(tmp_path: Path) -> None:
    other_shape = shape_key(llama(hidden=2048, heads=16))
    save_profile(make_profile("T4"), tmp_path / "b-t4.json")
    save_profile(make_profile("A100-40G"), tmp_path / "a-a100.json")
    save_profile(make_profile("T4", other_shape), tmp_path / "c-t4-small.json")
    (tmp_path / "README.txt").write_text("not a profile", encoding="utf-8")
    profiles = load_profiles(tmp_path)
    assert [(p.device_type, p.shape.hidden_size) for p in profiles] == [
        ("A100-40G", 4096),
        ("T4", 4096),
        ("T4", 2048),
    ]
    found = find_profile(profiles, "T4", shape_key(llama()))
    assert found is profiles[1]
    assert find_profile(profiles, "T4", other_shape) is profiles[2]
    assert find_profile(profiles, "V100-32G", SHAPE) is None
    assert find_profile(profiles, "T4", shape_key(llama(kv_heads=32))) is None


def test_load_profiles_of_a_missing_directory_is_empty(tmp_path: Path) -> None:
    assert load_profiles(tmp_path / "nowhere") == []


def test_default_profile_dir_honours_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PQCTL_PROFILE_DIR", str(tmp_path / "profiles"))
    assert default_profile_dir() == tmp_path / "profiles"
    save_profile(make_profile(), tmp_path / "profiles.json")  # beside, not inside: ignored
    (tmp_path / "profiles").mkdir()
    save_profile(make_profile("L4"), tmp_path / "profiles" / "l4.json")
    assert [p.device_type for p in load_profiles()] == ["L4"]


def test_default_profile_dir_without_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PQCTL_PROFILE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_profile_dir() == tmp_path / ".cache" / "pqctl" / "profiles"
    monkeypatch.setenv("PQCTL_PROFILE_DIR", "")
    assert default_profile_dir() == tmp_path / ".cache" / "pqctl" / "profiles"


# --------------------------------------------------------------------------- bad files


def good_data() -> dict[str, Any]:
    return make_profile().to_dict()


def _edited(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = good_data()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return data


_DELETE = object()

BAD_PROFILES = [
    ("wrong-format", ("format",), "pqctl-profile", 'format: expected "pqctl-latency-profile"'),
    ("no-format", ("format",), _DELETE, 'format: expected "pqctl-latency-profile"'),
    ("wrong-version", ("version",), 2, "version: expected 1"),
    ("string-version", ("version",), "1", "version: expected 1"),
    ("empty-device-type", ("device_type",), "", "device_type: expected a device type name"),
    ("no-model-shape", ("model_shape",), _DELETE, "model_shape: expected an object"),
    (
        "missing-head-dim",
        ("model_shape", "head_dim"),
        _DELETE,
        "model_shape.head_dim: missing or invalid",
    ),
    (
        "zero-hidden-size",
        ("model_shape", "hidden_size"),
        0,
        "model_shape.hidden_size: missing or invalid",
    ),
    ("numeric-family", ("model_shape", "family"), 1, "model_shape.family: missing or invalid"),
    (
        "unavailable-five",
        ("unavailable_bits",),
        [3, 5],
        "unavailable_bits: expected a list of 2, 3, 4, 8 or 16",
    ),
    ("samples-object", ("samples",), {}, "samples: expected a list"),
    ("sample-not-object", ("samples", 2), [1, 2], "samples[2]: expected an object"),
    (
        "phase-train",
        ("samples", 0, "phase"),
        "train",
        'samples[0].phase: expected "prefill" or "decode"',
    ),
    ("bits-five", ("samples", 4, "bits"), 5, "samples[4].bits: expected 2, 3, 4, 8 or 16"),
    ("bits-true", ("samples", 4, "bits"), True, "samples[4].bits: expected 2, 3, 4, 8 or 16"),
    (
        "zero-micro-batch",
        ("samples", 1, "micro_batch"),
        0,
        "samples[1].micro_batch: expected a positive integer",
    ),
    (
        "float-context",
        ("samples", 1, "context_len"),
        128.0,
        "samples[1].context_len: expected a positive integer",
    ),
    (
        "negative-latency",
        ("samples", 3, "latency_s"),
        -0.001,
        "samples[3].latency_s: expected a positive number of seconds",
    ),
    (
        "zero-latency",
        ("samples", 3, "latency_s"),
        0,
        "samples[3].latency_s: expected a positive number of seconds",
    ),
    (
        "string-latency",
        ("samples", 3, "latency_s"),
        "0.1",
        "samples[3].latency_s: expected a positive number of seconds",
    ),
    (
        "infinite-latency",
        ("samples", 3, "latency_s"),
        float("inf"),
        "samples[3].latency_s: expected a finite number",
    ),
]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [pytest.param(p, v, m, id=name) for name, p, v, m in BAD_PROFILES],
)
def test_bad_profile_file(tmp_path: Path, path: tuple[Any, ...], value: Any, message: str) -> None:
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(_edited(path, value)), encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(file)
    assert str(info.value) == f"{file}: {message}"
    assert info.value.msg == str(info.value)
    assert info.value.title == "bad profile"


def test_profile_that_is_not_json(tmp_path: Path) -> None:
    file = tmp_path / "bad.json"
    file.write_text("device_type = T4\n", encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profile(file)
    assert str(info.value) == f"{file}: not valid JSON: Expecting value: line 1 column 1 (char 0)"


def test_profile_that_does_not_exist(tmp_path: Path) -> None:
    file = tmp_path / "absent.json"
    with pytest.raises(ProfileError) as info:
        load_profile(file)
    assert str(info.value) == f"{file}: cannot read (No such file or directory)"


def test_profile_that_is_a_list() -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile([good_data()], "inline")
    assert str(info.value) == 'inline: format: expected "pqctl-latency-profile"'


def test_a_bad_file_in_the_directory_stops_load_profiles(tmp_path: Path) -> None:
    save_profile(make_profile(), tmp_path / "a.json")
    (tmp_path / "b.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ProfileError) as info:
        load_profiles(tmp_path)
    assert str(info.value) == f'{tmp_path / "b.json"}: format: expected "pqctl-latency-profile"'
