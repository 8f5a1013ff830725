"""Tests of planner/simulator.py: pipeline timing, memory and quality of a plan from the tables."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from planner import cost_model as cm
from planner.catalogue import gpu_device_type
from planner.cluster import ClusterSpec, DeviceSpec, HostSpec, LinkSpec
from planner.indicator import prior_indicator
from planner.model_spec import ModelSpec
from planner.plan import Workload
from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import StageAssignment, evaluate, stage_memory_bytes

FAST = gpu_device_type("fast", 4, 900, 60, peer_bandwidth_gb_s=24)  # fast kernels 4, 8, 16
SLOW = gpu_device_type("slow", 2, 300, 30, fast_kernel_bits=frozenset({8, 16}))
LINK = LinkSpec(bandwidth_gb_s=1.25, latency_s=2e-4)


def small_model(tied: bool = True) -> ModelSpec:
    return ModelSpec(
        source="test", family="llama", num_layers=4, hidden_size=256, intermediate_size=512,
        num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=1000, max_positions=2048,
        tied_embeddings=tied, gated_mlp=True, attention_bias=False, output_bias=False,
        mlp_bias=False, position_table_rows=0, embed_dim=256, norm_bias=False,
    )  # fmt: skip


def make_problem(
    tied: bool = True, theta_s: float = 0.0, quality_budget: float | None = None
) -> PlanningProblem:
    model = small_model(tied)
    cluster = ClusterSpec(
        name="two-hosts",
        hosts=(HostSpec("h0"), HostSpec("h1")),
        devices=(DeviceSpec("h0", 0, FAST), DeviceSpec("h1", 0, SLOW)),
        links={frozenset(("h0", "h1")): LINK},
    )
    return PlanningProblem(
        model=model,
        cluster=cluster,
        workload=Workload(global_batch=8, prompt_len=64, max_new_tokens=16, expected_new_tokens=10),
        indicator=prior_indicator(model, 128),
        bits=(16, 8, 4),
        theta_s=theta_s,
        quality_budget=quality_budget,
    )


def make_tables(
    problem: PlanningProblem | None = None, prefill: int = 2, decode: int = 4
) -> CostTables:
    problem = problem or make_problem()
    return build_tables(problem, problem.cluster.devices, prefill, decode)


C16, C8, C4 = 0, 1, 2  # columns of bits (16, 8, 4)


# --------------------------------------------------------------------------- tables


def test_tables_shape_and_counts() -> None:
    tables = make_tables()
    assert tables.bits == (16, 8, 4)
    assert tables.layer_prefill_s.shape == tables.layer_decode_s.shape == (2, 3)
    assert (tables.prefill_micro_batches, tables.decode_micro_batches) == (4, 2)
    assert tables.decode_steps == 9
    assert tables.tokens_generated == 80
    assert tables.slow_bits.tolist() == [[False, False, False], [False, False, True]]
    assert tables.hop_decode_s[0, 1] == LINK.transfer_s(4 * 256 * 2)
    assert tables.hop_prefill_s[1, 0] == LINK.transfer_s(2 * 64 * 256 * 2)
    assert tables.token_return_s[1, 0] == LINK.transfer_s(4 * cm.TOKEN_ID_BYTES)


# --------------------------------------------------------------------------- timing


def test_two_stage_timing_from_the_tables() -> None:
    t = make_tables()
    stages = (StageAssignment(0, (16, 16, 4)), StageAssignment(1, (8,)))
    ev = evaluate(t, stages)
    lp, ld = t.layer_prefill_s, t.layer_decode_s
    p0 = 2 * lp[0, C16] + lp[0, C4] + t.embed_prefill_s[0]
    p1 = lp[1, C8] + t.head_prefill_s[1]
    d0 = 2 * ld[0, C16] + ld[0, C4] + t.embed_decode_s[0]
    d1 = ld[1, C8] + t.head_decode_s[1]
    hop_p, hop_d, ret = t.hop_prefill_s[0, 1], t.hop_decode_s[0, 1], t.token_return_s[1, 0]
    prefill = p0 + p1 + hop_p + (4 - 1) * max(p0, p1, hop_p)
    round_s = max(d0 + d1 + hop_d + ret, 2 * max(d0, d1, hop_d, ret))
    decode = 9 * round_s
    assert ev.stage_prefill_s == pytest.approx((p0, p1), rel=1e-12)
    assert ev.stage_decode_s == pytest.approx((d0, d1), rel=1e-12)
    assert ev.prefill_s == pytest.approx(prefill, rel=1e-12)
    assert ev.decode_s == pytest.approx(decode, rel=1e-12)
    assert ev.total_s == pytest.approx(prefill + decode, rel=1e-12)
    assert ev.throughput_tokens_per_s == pytest.approx(8 * 10 / (prefill + decode), rel=1e-12)
    omega = t.omega[0, C16] + t.omega[1, C16] + t.omega[2, C4] + t.omega[3, C8]
    assert ev.omega_sum == pytest.approx(omega, rel=1e-12)
    assert ev.objective == pytest.approx(prefill + decode, rel=1e-12)  # theta = 0


def _synthetic(tables: CostTables, **changes: object) -> CostTables:
    """The tables with hand-chosen round numbers (seconds) in place of the cost model's."""
    base: dict[str, object] = {
        "layer_prefill_s": np.array([[1.0, 0.6, 0.5], [2.0, 1.2, 1.0]]),
        "layer_decode_s": np.array([[0.1, 0.06, 0.05], [0.2, 0.12, 0.1]]),
        "embed_prefill_s": np.array([0.1, 0.1]),
        "embed_decode_s": np.array([0.01, 0.01]),
        "head_prefill_s": np.array([0.3, 0.3]),
        "head_decode_s": np.array([0.03, 0.03]),
        "hop_prefill_s": np.array([[0.0, 0.25], [9.0, 0.0]]),  # asymmetric: direction matters
        "hop_decode_s": np.array([[0.0, 0.02], [0.9, 0.0]]),
        "token_return_s": np.array([[0.0, 0.5], [0.005, 0.0]]),
    }
    base.update(changes)
    return dataclasses.replace(tables, **base)  # type: ignore[arg-type]


PIPELINE = (StageAssignment(0, (16, 8)), StageAssignment(1, (4, 4)))


def test_prefill_pipeline_fill_and_drain() -> None:
    t = _synthetic(make_tables(), prefill_micro_batches=4)
    ev = evaluate(t, PIPELINE)
    # P0 = 1 + 0.6 + 0.1 = 1.7, P1 = 1 + 1 + 0.3 = 2.3, hop 0->1 = 0.25
    assert ev.stage_prefill_s == pytest.approx((1.7, 2.3))
    assert ev.prefill_s == pytest.approx(1.7 + 2.3 + 0.25 + 3 * 2.3)


def test_prefill_bottleneck_can_be_the_link() -> None:
    hops = np.array([[0.0, 3.0], [0.0, 0.0]])
    t = _synthetic(make_tables(), prefill_micro_batches=4, hop_prefill_s=hops)
    assert evaluate(t, PIPELINE).prefill_s == pytest.approx(1.7 + 2.3 + 3.0 + 3 * 3.0)


def test_decode_round_is_the_ring_with_one_micro_batch() -> None:
    t = _synthetic(make_tables(), decode_micro_batches=1, decode_steps=9)
    ev = evaluate(t, PIPELINE)
    # D0 = 0.1 + 0.06 + 0.01 = 0.17, D1 = 0.1 + 0.1 + 0.03 = 0.23, hop 0.02, return 1->0 0.005
    assert ev.stage_decode_s == pytest.approx((0.17, 0.23))
    assert ev.decode_s == pytest.approx(9 * (0.17 + 0.23 + 0.02 + 0.005))


def test_decode_round_is_m_d_slowest_stages_when_that_is_longer() -> None:
    t = _synthetic(make_tables(), decode_micro_batches=4, decode_steps=9)
    assert evaluate(t, PIPELINE).decode_s == pytest.approx(9 * 4 * 0.23)
    t = _synthetic(make_tables(), decode_micro_batches=2, decode_steps=9)
    assert evaluate(t, PIPELINE).decode_s == pytest.approx(9 * 2 * 0.23)  # 0.46 > ring 0.425
    # A slow link (0.3 s) makes the ring 0.17 + 0.23 + 0.3 + 0.005 longer than 2 x 0.3 ...
    hops = np.array([[0.0, 0.3], [0.9, 0.0]])
    t = _synthetic(make_tables(), decode_micro_batches=2, decode_steps=9, hop_decode_s=hops)
    assert evaluate(t, PIPELINE).decode_s == pytest.approx(9 * (0.17 + 0.23 + 0.3 + 0.005))
    # ... and with 4 micro-batches the link is the bottleneck: 4 x 0.3 > ring.
    t = _synthetic(make_tables(), decode_micro_batches=4, decode_steps=9, hop_decode_s=hops)
    assert evaluate(t, PIPELINE).decode_s == pytest.approx(9 * 4 * 0.3)


def test_reversed_order_uses_the_reverse_hops() -> None:
    t = _synthetic(make_tables(), prefill_micro_batches=1, decode_micro_batches=1, decode_steps=1)
    ev = evaluate(t, (StageAssignment(1, (4, 4)), StageAssignment(0, (16, 8))))
    # P(first, device 1) = 2 + 0.1, P(last, device 0) = 1.6 + 0.3; hop 1->0 = 9.0
    assert ev.prefill_s == pytest.approx(2.1 + 1.9 + 9.0)
    # D(device 1) = 0.2 + 0.01, D(device 0) = 0.16 + 0.03; hop 1->0 0.9; return 0->1 0.5
    assert ev.decode_s == pytest.approx(0.21 + 0.19 + 0.9 + 0.5)


def test_single_stage_has_no_hops_and_no_token_return() -> None:
    t = _synthetic(make_tables(), prefill_micro_batches=4, decode_micro_batches=2, decode_steps=9)
    ev = evaluate(t, (StageAssignment(0, (16, 16, 8, 4)),))
    p = 2 * 1.0 + 0.6 + 0.5 + 0.1 + 0.3  # both ends on the one stage
    d = 2 * 0.1 + 0.06 + 0.05 + 0.01 + 0.03
    assert ev.stage_prefill_s == pytest.approx((p,))
    assert ev.prefill_s == pytest.approx(4 * p)
    assert ev.decode_s == pytest.approx(9 * 2 * d)


def test_objective_adds_theta_times_omega() -> None:
    problem = make_problem(theta_s=2.5)
    t = make_tables(problem)
    ev = evaluate(t, PIPELINE)
    omega = t.omega[0, C16] + t.omega[1, C8] + t.omega[2, C4] + t.omega[3, C4]
    assert ev.omega_sum == pytest.approx(omega)
    assert ev.omega_sum == pytest.approx(0.25 * (9 / 225) * 2 + t.omega[1, C8])
    assert ev.objective == pytest.approx(ev.prefill_s + ev.decode_s + 2.5 * omega, rel=1e-12)


# --------------------------------------------------------------------------- memory


def test_memory_counts_each_end_on_its_own_stage() -> None:
    t = make_tables(make_problem(tied=True))
    ev = evaluate(t, (StageAssignment(0, (16, 16)), StageAssignment(1, (8, 8))))
    m = t.layer_memory_bytes
    first = 2 * m[0, C16] + t.activation_bytes[0] + t.embedding_bytes[0]
    last = 2 * m[1, C8] + t.activation_bytes[1] + t.head_bytes[1]
    assert ev.stage_memory_bytes == (int(first), int(last))
    assert ev.stage_capacity_bytes == (FAST.usable_memory_bytes, SLOW.usable_memory_bytes)
    model = small_model(tied=True)
    assert list(t.embedding_bytes) == [cm.embedding_bytes(model)] * 2
    assert (
        list(t.head_bytes) == [cm.head_bytes(model, 4)] * 2
    )  # the larger micro-batch sizes the logits


def test_tied_saving_only_when_one_stage_holds_both_ends() -> None:
    t = make_tables(make_problem(tied=True))
    model = small_model(tied=True)
    single = StageAssignment(0, (16, 16, 16, 16))
    expected = (
        4 * t.layer_memory_bytes[0, C16]
        + t.activation_bytes[0]
        + t.embedding_bytes[0]
        + t.head_bytes[0]
        - cm.tied_saving_bytes(model)
    )
    assert cm.tied_saving_bytes(model) == 2 * 1000 * 256
    assert stage_memory_bytes(t, single, first=True, last=True) == pytest.approx(expected)
    assert evaluate(t, (single,)).stage_memory_bytes == (int(expected),)


def test_untied_model_saves_nothing() -> None:
    t = make_tables(make_problem(tied=False))
    single = StageAssignment(0, (16, 16, 16, 16))
    expected = (
        4 * t.layer_memory_bytes[0, C16]
        + t.activation_bytes[0]
        + t.embedding_bytes[0]
        + t.head_bytes[0]
    )
    assert not t.tied_saving_bytes.any()
    assert stage_memory_bytes(t, single, first=True, last=True) == pytest.approx(expected)


def test_dequant_scratch_only_for_a_precision_without_fast_kernel() -> None:
    t = make_tables()
    scratch = cm.dequant_scratch_bytes(small_model())
    assert t.dequant_scratch_bytes[0] == scratch == 2 * 256 * 512
    middle = dict(first=False, last=False)
    base = t.activation_bytes[1]
    # The slow device has fast kernels for 8 and 16 bits only.
    assert stage_memory_bytes(t, StageAssignment(1, (8, 16)), **middle) == pytest.approx(
        t.layer_memory_bytes[1, C8] + t.layer_memory_bytes[1, C16] + base
    )
    assert stage_memory_bytes(t, StageAssignment(1, (8, 4)), **middle) == pytest.approx(
        t.layer_memory_bytes[1, C8] + t.layer_memory_bytes[1, C4] + base + scratch
    )
    # One scratch buffer however many layers need it.
    assert stage_memory_bytes(t, StageAssignment(1, (4, 4)), **middle) == pytest.approx(
        2 * t.layer_memory_bytes[1, C4] + base + scratch
    )
    # The fast device runs 4 bits natively.
    assert stage_memory_bytes(t, StageAssignment(0, (4, 4)), **middle) == pytest.approx(
        2 * t.layer_memory_bytes[0, C4] + t.activation_bytes[0]
    )


def test_fits_memory_at_and_over_capacity() -> None:
    t = make_tables()
    need = evaluate(t, PIPELINE).stage_memory_bytes
    at = dataclasses.replace(t, capacity_bytes=np.array([need[0], need[1]], dtype=float))
    assert evaluate(at, PIPELINE).fits_memory
    over = dataclasses.replace(t, capacity_bytes=np.array([need[0], need[1] - 1], dtype=float))
    ev = evaluate(over, PIPELINE)
    assert not ev.fits_memory
    assert not ev.feasible
    assert ev.stage_capacity_bytes == (need[0], need[1] - 1)


def test_fits_memory_false_on_a_device_too_small() -> None:
    tiny = dataclasses.replace(SLOW, memory_bytes=2 * 2**30, runtime_reserve_bytes=2 * 2**30 - 1)
    problem = make_problem()
    cluster = dataclasses.replace(
        problem.cluster, devices=(problem.cluster.devices[0], DeviceSpec("h1", 0, tiny))
    )
    problem = dataclasses.replace(problem, cluster=cluster)
    t = make_tables(problem)
    assert t.capacity_bytes[1] == 0
    assert not evaluate(t, PIPELINE).fits_memory
    assert evaluate(t, (StageAssignment(0, (16, 16, 16, 16)),)).fits_memory


# --------------------------------------------------------------------------- quality budget


def test_within_budget() -> None:
    t = make_tables()
    omega = evaluate(t, PIPELINE).omega_sum
    assert evaluate(t, PIPELINE).within_budget  # no budget
    at = dataclasses.replace(t, quality_budget=omega)
    assert evaluate(at, PIPELINE).within_budget
    below = dataclasses.replace(t, quality_budget=omega - 0.001)
    ev = evaluate(below, PIPELINE)
    assert not ev.within_budget
    assert ev.fits_memory
    assert not ev.feasible


def test_budget_from_the_problem() -> None:
    t = make_tables(make_problem(quality_budget=0.02))
    assert evaluate(t, (StageAssignment(0, (16, 16, 8, 8)),)).within_budget
    assert not evaluate(t, (StageAssignment(0, (4, 4, 4, 4)),)).within_budget  # 4 x 0.01
