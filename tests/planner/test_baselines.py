"""Tests of planner/baselines.py on small hand-made problems with exact device capacities."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Sequence

import numpy as np
import pytest

from planner import baselines as bl
from planner.catalogue import gpu_device_type
from planner.cluster import ClusterSpec, DeviceSpec, DeviceType, HostSpec
from planner.indicator import prior_indicator
from planner.model_spec import ModelSpec
from planner.plan import Workload
from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import StageAssignment, evaluate, stage_memory_bytes

MIB = 2**20
AMPERE = frozenset({4, 8, 16})

# Per layer of the model below, with B = 8 and s + n = 160: 25.0 MiB at 16 bits, 13.8 MiB at 8,
# 8.5 MiB at 4; activations 16.25 MiB per stage; embedding 15.6 MiB, LM head 15.7 MiB (vocab 8000).


def device_type(name: str, capacity_mib: float, bandwidth_gb_s: float = 900) -> DeviceType:
    """A GPU whose usable memory is exactly ``capacity_mib`` (no reserve, 100 % usable)."""
    gpu = gpu_device_type(name, 1, bandwidth_gb_s, bandwidth_gb_s / 15, fast_kernel_bits=AMPERE)
    return dataclasses.replace(
        gpu,
        memory_bytes=int(capacity_mib * MIB),
        runtime_reserve_bytes=0,
        usable_memory_fraction=1.0,
    )


def model(num_layers: int, vocab_size: int = 8000) -> ModelSpec:
    return ModelSpec(
        source="test", family="llama", num_layers=num_layers, hidden_size=1024,
        intermediate_size=2816, num_heads=16, num_kv_heads=8, head_dim=64, vocab_size=vocab_size,
        max_positions=4096, tied_embeddings=False, gated_mlp=True, attention_bias=False,
        output_bias=False, mlp_bias=False, position_table_rows=0, embed_dim=1024,
        norm_bias=False,
    )  # fmt: skip


def problem(
    types: Sequence[DeviceType],
    num_layers: int,
    bits: tuple[int, ...] = (16, 8, 4),
    vocab_size: int = 8000,
) -> PlanningProblem:
    spec = model(num_layers, vocab_size)
    devices = tuple(DeviceSpec("h0", i, t) for i, t in enumerate(types))
    return PlanningProblem(
        model=spec,
        cluster=ClusterSpec("test", (HostSpec("h0"),), devices),
        workload=Workload(
            global_batch=8, prompt_len=128, max_new_tokens=32, expected_new_tokens=16
        ),
        indicator=prior_indicator(spec, 128),
        bits=bits,
    )


def counts(stages: Sequence[StageAssignment], num_devices: int) -> list[int]:
    layers = [0] * num_devices
    for stage in stages:
        layers[stage.position] = len(stage.layer_bits)
    return layers


def uniform_stages(layer_counts: Sequence[int], bits: int) -> tuple[StageAssignment, ...]:
    return tuple(StageAssignment(j, (bits,) * c) for j, c in enumerate(layer_counts) if c)


def all_splits(num_layers: int, num_devices: int) -> list[tuple[int, ...]]:
    """Every way to give the devices, in order, layer counts summing to ``num_layers``."""
    return [
        c for c in itertools.product(range(num_layers + 1), repeat=num_devices)
        if sum(c) == num_layers
    ]  # fmt: skip


def best_bottleneck(tables: CostTables, bits: int) -> float:
    """Least slowest-stage decode time of any split at ``bits`` that fits memory."""
    best = math.inf
    for split in all_splits(tables.num_layers, tables.num_devices):
        ev = evaluate(tables, uniform_stages(split, bits))
        if ev.fits_memory:
            best = min(best, max(ev.stage_decode_s))
    return best


# --------------------------------------------------------------------------- decode micro-batch


@pytest.mark.parametrize(
    ("batch", "devices", "expected"),
    [
        (32, 3, 16),  # ceil(32/3) = 11 -> 16
        (32, 4, 8),
        (12, 5, 3),  # ceil(2.4) = 3
        (8, 3, 4),
        (7, 2, 7),  # 7 is prime
        (6, 6, 1),
        (4, 8, 1),  # more devices than sequences
        (1, 1, 1),
        (30, 7, 5),  # ceil(30/7) = 5
    ],
)
def test_decode_micro_batch_is_smallest_divisor_at_least_b_over_n(
    batch: int, devices: int, expected: int
) -> None:
    assert bl.decode_micro_batch(batch, devices) == expected


# --------------------------------------------------------------------------- uniform


def test_uniform_even_split_at_the_highest_precision_that_fits() -> None:
    # 4 layers + activations + one end: 16 bits needs ~132 MiB, 8 bits ~87 MiB.
    p = problem([device_type("a", 100), device_type("b", 100)], num_layers=8)
    plan = bl.uniform(p)
    assert plan.name == "uniform"
    assert plan.stages is not None and plan.evaluation is not None and plan.tables is not None
    assert counts(plan.stages, 2) == [4, 4]
    assert {b for s in plan.stages for b in s.layer_bits} == {8}
    assert plan.evaluation.fits_memory
    assert not evaluate(plan.tables, uniform_stages([4, 4], 16)).fits_memory
    assert plan.tables.decode_micro_batch == 4  # ceil(8 / 2)
    assert plan.reason == ""


def test_uniform_keeps_16_bits_when_memory_allows() -> None:
    p = problem([device_type("a", 1000), device_type("b", 1000)], num_layers=8)
    plan = bl.uniform(p, num_devices=2)
    assert plan.stages == uniform_stages([4, 4], 16)


def test_uniform_prefill_micro_batch_is_the_best_by_simulation() -> None:
    p = problem([device_type("a", 1000), device_type("b", 1000, bandwidth_gb_s=300)], 8)
    plan = bl.uniform(p, num_devices=2)
    assert plan.evaluation is not None and plan.tables is not None and plan.stages is not None
    decode = plan.tables.decode_micro_batch
    for prefill in (1, 2, 4):
        tables = build_tables(p, p.cluster.devices, prefill, decode)
        other = evaluate(tables, plan.stages)
        assert plan.evaluation.objective <= other.objective
    assert plan.tables.prefill_micro_batch in (1, 2, 4)


def test_uniform_largest_remainder_over_three_devices() -> None:
    p = problem([device_type(n, 1000) for n in "abc"], num_layers=8)
    plan = bl.uniform(p, num_devices=3)
    assert plan.stages is not None
    assert counts(plan.stages, 3) == [3, 3, 2]
    assert [s.position for s in plan.stages] == [0, 1, 2]


def test_uniform_with_more_devices_than_layers_leaves_the_rest_empty() -> None:
    p = problem([device_type(n, 1000) for n in "abc"], num_layers=2)
    plan = bl.uniform(p, num_devices=3)
    assert plan.stages == uniform_stages([1, 1, 0], 16)
    assert plan.evaluation is not None and plan.evaluation.fits_memory


# --------------------------------------------------------------------------- memory-proportional


def test_memory_proportional_split_by_largest_remainder() -> None:
    # 10 layers over 50 : 100 : 250 MiB -> 1.25, 2.5, 6.25 -> floors 1, 2, 6; the 0.5 remainder
    # takes the tenth layer. Device 0 cannot hold one 16-bit layer with the embedding (57 MiB).
    p = problem([device_type("a", 50), device_type("b", 100), device_type("c", 250)], 10)
    plan = bl.memory_proportional(p, num_devices=3)
    assert plan.name == "memory-proportional"
    assert plan.stages == uniform_stages([1, 3, 6], 8)
    assert plan.evaluation is not None and plan.evaluation.fits_memory
    assert plan.tables is not None
    assert not evaluate(plan.tables, uniform_stages([1, 3, 6], 16)).fits_memory
    assert plan.tables.prefill_micro_batch == plan.tables.decode_micro_batch == 4


def test_memory_proportional_at_16_bits_with_room() -> None:
    p = problem([device_type("a", 300), device_type("b", 900)], 8)
    plan = bl.memory_proportional(p, num_devices=2)
    assert plan.stages == uniform_stages([2, 6], 16)


# --------------------------------------------------------------------------- pipeedge


PIPEEDGE_CASES = {
    "fast-slow": ([device_type("fast", 2000, 900), device_type("slow", 2000, 300)], 8),
    "slow-fast": ([device_type("slow", 2000, 300), device_type("fast", 2000, 900)], 8),
    "three-speeds": (
        [
            device_type("mid", 2000, 500),
            device_type("fast", 2000, 900),
            device_type("slow", 2000, 200),
        ],
        9,
    ),
    "fast-but-small": ([device_type("fast", 120, 900), device_type("slow", 2000, 300)], 8),
}


@pytest.mark.parametrize("case", PIPEEDGE_CASES, ids=list(PIPEEDGE_CASES))
def test_pipeedge_split_minimises_the_slowest_decode_stage(case: str) -> None:
    types, num_layers = PIPEEDGE_CASES[case]
    plan = bl.pipeedge(problem(types, num_layers), num_devices=len(types))
    assert plan.stages is not None and plan.evaluation is not None and plan.tables is not None
    bits = {b for s in plan.stages for b in s.layer_bits}
    assert len(bits) == 1
    (chosen,) = bits
    assert chosen == 16
    assert plan.evaluation.fits_memory
    slowest = max(plan.evaluation.stage_decode_s)
    assert slowest == pytest.approx(best_bottleneck(plan.tables, chosen), rel=1e-12)
    assert plan.tables.prefill_micro_batch == plan.tables.decode_micro_batch


def test_pipeedge_gives_the_faster_device_more_layers() -> None:
    types, num_layers = PIPEEDGE_CASES["fast-slow"]
    plan = bl.pipeedge(problem(types, num_layers), num_devices=2)
    assert plan.stages is not None
    fast, slow = counts(plan.stages, 2)
    assert fast > slow > 0


def test_pipeedge_respects_memory() -> None:
    # The fast device holds at most 3 layers at 16 bits (3 x 25 + 16.25 + 15.6 <= 120).
    types, num_layers = PIPEEDGE_CASES["fast-but-small"]
    plan = bl.pipeedge(problem(types, num_layers), num_devices=2)
    assert plan.stages is not None
    assert counts(plan.stages, 2) == [3, 5]


def test_pipeedge_counts_the_lm_head_where_it_lands() -> None:
    # Two identical devices, two layers, vocabulary 128000: the head (~0.38 ms) outweighs a
    # layer (~0.1 ms), so 1 + 1 (slowest: layer + head) beats 2 + 0 (2 layers + embed + head).
    p = problem([device_type("a", 4000), device_type("b", 4000)], 2, bits=(16,), vocab_size=128000)
    plan = bl.pipeedge(p, num_devices=2)
    assert plan.stages is not None and plan.evaluation is not None and plan.tables is not None
    slowest = max(plan.evaluation.stage_decode_s)
    assert slowest == pytest.approx(best_bottleneck(plan.tables, 16), rel=1e-12)


def test_pipeedge_uses_the_highest_precision_with_a_feasible_split() -> None:
    # Device 0: slow, roomy. Device 1: fast, 87 MiB: two 16-bit layers + head + activations
    # (82 MiB) fit, but not with the embedding as well (97.6 MiB).
    p = problem([device_type("slow", 1000, 100), device_type("fast", 87, 900)], 2)
    plan = bl.pipeedge(p, num_devices=2)
    assert plan.tables is not None
    assert evaluate(plan.tables, uniform_stages([1, 1], 16)).fits_memory
    assert plan.stages is not None
    assert {b for s in plan.stages for b in s.layer_bits} == {16}


# --------------------------------------------------------------------------- adabits


def test_adabits_mixes_precisions_within_memory() -> None:
    # 4 + 4 layers on 100 MiB each: all-16 needs ~132 MiB per stage, so some layers drop to 8.
    p = problem([device_type("a", 100), device_type("b", 100)], num_layers=8)
    plan = bl.adabits(p)
    assert plan.name == "adabits"
    assert plan.stages is not None and plan.evaluation is not None and plan.tables is not None
    tables = plan.tables
    assert counts(plan.stages, 2) == [4, 4]
    assert plan.evaluation.fits_memory
    for k, stage in enumerate(plan.stages):
        first, last = k == 0, k == len(plan.stages) - 1
        assert stage_memory_bytes(tables, stage, first, last) <= tables.capacity_bytes[k]
        assert set(stage.layer_bits) == {8, 16}, stage.layer_bits
        # No more layers lowered than needed: raising any 8-bit layer back overflows.
        for i, bits in enumerate(stage.layer_bits):
            if bits == 8:
                raised = list(stage.layer_bits)
                raised[i] = 16
                bigger = StageAssignment(stage.position, tuple(raised))
                assert stage_memory_bytes(tables, bigger, first, last) > tables.capacity_bytes[k]
    assert plan.stages == (StageAssignment(0, (8, 8, 8, 16)), StageAssignment(1, (8, 8, 8, 16)))


def test_adabits_loses_less_quality_than_one_precision_for_all() -> None:
    p = problem([device_type("a", 100), device_type("b", 100)], num_layers=8)
    mixed = bl.adabits(p)
    single = bl.memory_proportional(p)
    assert mixed.evaluation is not None and single.evaluation is not None
    assert single.stages == uniform_stages([4, 4], 8)
    assert mixed.evaluation.omega_sum < single.evaluation.omega_sum


def test_adabits_keeps_16_bits_with_room() -> None:
    p = problem([device_type("a", 1000), device_type("b", 3000)], num_layers=8)
    plan = bl.adabits(p, num_devices=2)
    assert plan.stages == uniform_stages([2, 6], 16)


# --------------------------------------------------------------------------- nothing fits


def test_nothing_fits_gives_reasons_and_no_evaluation() -> None:
    # 10 MiB devices cannot even hold the activations.
    p = problem([device_type("a", 10), device_type("b", 10)], num_layers=4)
    plans = bl.all_baselines(p)
    assert [plan.name for plan in plans] == list(bl.BASELINE_NAMES)
    assert bl.BASELINE_NAMES == ("uniform", "pipeedge", "adabits", "memory-proportional")
    reasons = {plan.name: plan.reason for plan in plans}
    assert reasons == {
        "uniform": "no single precision fits an even split",
        "pipeedge": "no precision has a split that fits",
        "adabits": "stage on h0/cuda:0 does not fit even at the lowest bits",
        "memory-proportional": "no single precision fits a memory-proportional split",
    }
    for plan in plans:
        assert plan.stages is None
        assert plan.evaluation is None
        assert plan.tables is not None


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nothing_fits_on_devices_without_usable_memory() -> None:
    tiny = gpu_device_type("tiny", 1, 300, 20)
    assert tiny.usable_memory_bytes == 0
    plans = bl.all_baselines(problem([tiny, tiny], num_layers=4))
    assert [plan.evaluation for plan in plans] == [None] * 4
    assert all(plan.reason for plan in plans)


# --------------------------------------------------------------------------- best prefix

BASELINES = {
    "uniform": bl.uniform,
    "pipeedge": bl.pipeedge,
    "adabits": bl.adabits,
    "memory-proportional": bl.memory_proportional,
}


@pytest.mark.parametrize("name", BASELINES)
def test_a_slow_device_at_the_end_of_the_cluster_is_left_out(name: str) -> None:
    # Two fast devices, then one 30x slower: every rule that must use it is slower.
    types = [device_type("a", 2000), device_type("b", 2000), device_type("slow", 2000, 30)]
    p = problem(types, num_layers=8)
    plan = BASELINES[name](p)
    everything = BASELINES[name](p, num_devices=3)
    assert plan.stages is not None and plan.evaluation is not None
    assert everything.stages is not None and everything.evaluation is not None
    assert 2 in {s.position for s in everything.stages}
    assert max(s.position for s in plan.stages) < 2
    assert len(plan.stages) < len(p.cluster.devices)
    assert plan.evaluation.objective < everything.evaluation.objective
    assert plan.evaluation.fits_memory


def random_problem(seed: int) -> tuple[list[DeviceType], int, tuple[int, ...]]:
    """Devices, layers and precisions of a small random cluster."""
    rng = random.Random(seed)
    types = [
        device_type(f"t{i}", rng.choice([45, 60, 90, 120, 200, 400, 2000]), rng.choice([100, 900]))
        for i in range(rng.randint(1, 4))
    ]
    bits = rng.choice([(16, 8, 4), (16,), (8, 4), (16, 4)])
    return types, rng.randint(1, 10), bits


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("name", BASELINES)
def test_the_chosen_prefix_scores_best_of_every_prefix(name: str, seed: int) -> None:
    """Brute force: the rule on a cluster of only the first n devices, for every n."""
    types, num_layers, bits = random_problem(seed)
    p = problem(types, num_layers, bits)
    plan = BASELINES[name](p)
    prefixes = [
        BASELINES[name](problem(types[:n], num_layers, bits), num_devices=n)
        for n in range(1, len(types) + 1)
    ]
    scored = [q for q in prefixes if q.evaluation is not None and q.evaluation.fits_memory]
    if not scored:
        assert plan.stages is None and plan.evaluation is None
        assert plan.reason == prefixes[-1].reason != ""
        return
    best = min(scored, key=lambda q: q.evaluation.objective if q.evaluation else math.inf)
    assert plan.evaluation is not None and best.evaluation is not None
    assert plan.evaluation.objective == pytest.approx(best.evaluation.objective, rel=1e-12)
    assert plan.stages == best.stages
    assert plan.tables is not None and best.tables is not None
    assert plan.tables.prefill_micro_batch == best.tables.prefill_micro_batch
    assert plan.tables.decode_micro_batch == best.tables.decode_micro_batch


@pytest.mark.parametrize("name", BASELINES)
def test_the_plan_is_scored_by_the_simulator_on_the_cluster_tables(name: str) -> None:
    types = [device_type("a", 120), device_type("b", 2000, 300), device_type("c", 90, 900)]
    p = problem(types, num_layers=9)
    plan = BASELINES[name](p)
    assert plan.stages is not None and plan.evaluation is not None and plan.tables is not None
    tables = plan.tables
    assert tables.devices == p.cluster.devices
    assert plan.evaluation == evaluate(tables, plan.stages)
    fresh = build_tables(
        p, p.cluster.devices, tables.prefill_micro_batch, tables.decode_micro_batch
    )
    for field in ("layer_decode_s", "layer_memory_bytes", "capacity_bytes", "hop_decode_s"):
        assert np.array_equal(getattr(tables, field), getattr(fresh, field)), field
    decodes = {bl.decode_micro_batch(8, n) for n in range(1, len(types) + 1)}
    assert tables.decode_micro_batch in decodes


def test_num_devices_outside_the_cluster_is_refused() -> None:
    p = problem([device_type("a", 1000), device_type("b", 1000)], num_layers=4)
    for n in (0, 3):
        with pytest.raises(ValueError, match="num_devices"):
            bl.uniform(p, num_devices=n)
