"""Tests of runtime/measure/profiling.py and runtime/measure/hop_timing.py on a tiny Llama
shape (CPU)."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
import torch

from planner.profiles import LatencyProfile, LatencySample, ShapeKey, TransferFit
from runtime.measure.hop_timing import activation_frame_sizes, measure_hop
from runtime.measure.profiling import (
    MAX_PASS_FACTOR,
    MIN_POINTS,
    DeviceMeasurement,
    GridPoint,
    ProfileGrid,
    measure_device,
)
from runtime.model.arch import ArchConfig, arch_from_config
from runtime.quant import native

pytestmark = pytest.mark.usefixtures("one_thread")

TINY: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 256, "max_position_embeddings": 64, "tie_word_embeddings": True,
}  # fmt: skip
GRID = ProfileGrid((1, 2), (8, 16, 32), (1, 2), (8, 16, 32), repeats=2, stack_layers=2)
BITS = (16, 8, 4, 3, 2)
SHAPE = ShapeKey("llama", 64, 128, 4, 2, 16)


def tiny_arch() -> ArchConfig:
    return arch_from_config(dict(TINY), "tiny")


@pytest.fixture(scope="module")
def measured(one_thread: None) -> DeviceMeasurement:
    return measure_device(tiny_arch(), "cpu", BITS, GRID, group_size=32)


def layer_samples(m: DeviceMeasurement) -> list[LatencySample]:
    return [
        LatencySample(t.phase, t.bits, t.micro_batch, t.context_len, t.latency_s)
        for t in m.timings
        if t.part == "layer"
    ]


def test_every_precision_gets_enough_positive_samples(measured: DeviceMeasurement) -> None:
    assert measured.unavailable == {}
    assert measured.trimmed == 0
    for bits in BITS:
        for phase, need in MIN_POINTS.items():
            mine = [
                t for t in measured.timings if (t.part, t.bits, t.phase) == ("layer", bits, phase)
            ]
            assert len(mine) == 6 >= need
            assert all(t.latency_s > 0 for t in mine)
    assert measured.kernel_paths[16] == ("dense",)
    stream = (kernels := native.kernels()) is not None and kernels.stream_dot
    assert measured.kernel_paths[3] == ("native-int3" if stream else "dequant-per-call",)
    for part in ("stage", "embedding", "head"):
        assert len([t for t in measured.timings if t.part == part]) == 12


def test_the_fit_predicts_the_measured_samples(measured: DeviceMeasurement) -> None:
    profile = LatencyProfile.from_samples("cpu", SHAPE, layer_samples(measured))
    for bits in BITS:
        assert profile.covers(bits)
        errors = [
            abs(profile.layer_latency_s(bits, s.phase, s.micro_batch, s.context_len) - s.latency_s)
            / s.latency_s
            for s in profile.samples
            if s.bits == bits
        ]
        # a loose bound: timings on a shared CPU are noisy, the fit must still follow them
        assert statistics.median(errors) < 0.5


def test_a_precision_whose_kernel_raises_is_recorded_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("no int4 kernel on this device")

    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", broken)
    monkeypatch.setattr(native.NativeKernels, "int4_matmul", broken)  # whichever the CPU runs
    small = ProfileGrid((1, 2), (8, 16, 32), (1, 2), (8, 16), repeats=1, stack_layers=1)
    m = measure_device(tiny_arch(), "cpu", (16, 4), small, group_size=32)
    assert set(m.unavailable) == {4}
    assert "no int4 kernel" in m.unavailable[4]
    assert {t.bits for t in m.timings if t.part == "layer"} == {16}


def test_a_tiny_time_budget_keeps_the_points_each_fit_needs() -> None:
    m = measure_device(tiny_arch(), "cpu", (16,), GRID, group_size=32, budget_s=1e-3)
    layer = [t for t in m.timings if t.part == "layer"]
    assert len([t for t in layer if t.phase == "prefill"]) == MIN_POINTS["prefill"]
    assert len([t for t in layer if t.phase == "decode"]) == MIN_POINTS["decode"]
    assert m.trimmed == 12 - 9


def test_grid_puts_corners_and_centre_first_and_respects_the_model_length() -> None:
    points = GRID.points("prefill")
    assert set(points[:5]) == {
        GridPoint("prefill", 1, 8), GridPoint("prefill", 1, 32), GridPoint("prefill", 2, 8),
        GridPoint("prefill", 2, 32), GridPoint("prefill", 2, 16),
    }  # fmt: skip
    assert GRID.clipped(16).prompt_lens == (8, 16)


def test_progress_reports_every_point() -> None:
    seen: list[tuple[int, int]] = []
    small = ProfileGrid((1, 2), (8, 16, 32), (1, 2), (8, 16), repeats=1, stack_layers=1)
    measure_device(
        tiny_arch(), "cpu", (16,), small, group_size=32, progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (10, 10)


def test_quick_passes_repeat_until_they_span_spread_s() -> None:
    seen: list[tuple[int, int]] = []
    # ten points a pass; passes far quicker than a minute: MAX_PASS_FACTOR of them
    spread = ProfileGrid((1, 2), (8, 16, 32), (1, 2), (8, 16), 1, 1, spread_s=60.0)
    m = measure_device(
        tiny_arch(), "cpu", (16,), spread, group_size=32, progress=lambda d, t: seen.append((d, t))
    )
    assert seen[-1] == (10 * MAX_PASS_FACTOR, 10 * MAX_PASS_FACTOR)
    assert len([t for t in m.timings if t.part == "layer"]) == 10


def test_a_spent_budget_skips_the_later_passes_and_progress_still_completes() -> None:
    seen: list[tuple[int, int]] = []
    measure_device(
        tiny_arch(), "cpu", (16,), GRID, group_size=32, budget_s=1e-3,
        progress=lambda d, t: seen.append((d, t)),
    )  # fmt: skip
    assert seen[-1] == (12 * GRID.repeats, 12 * GRID.repeats)


def test_activation_hop_over_zeromq_is_timed() -> None:
    sizes = activation_frame_sizes(64)
    samples = measure_hop(sizes[:3], repeats=3, timeout_s=10)
    assert [n for n, _ in samples] == list(sizes[:3])
    assert all(0 < t < 1 for _, t in samples)
    fit = TransferFit.from_samples(samples)
    assert fit.latency_s >= 0 and fit.bandwidth_gb_s > 0
