"""The MILP against exhaustive enumeration on small instances, and its decoding."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import replace

import pytest

from planner.cluster import DeviceSpec
from planner.highs_model import SolveOptions
from planner.indicator import QualityIndicator, prior_indicator
from planner.partition_milp import LayerUnits, PartitionMilp
from planner.problem import build_tables
from planner.simulator import evaluate
from tests.planner.instances import brute_force, contiguous_plans, random_problem, small_model

EXACT = SolveOptions(time_limit_s=30, mip_rel_gap=1e-9)


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("per_layer", [False, True], ids=["count", "per-layer"])
def test_milp_optimum_equals_enumeration(seed: int, per_layer: bool) -> None:
    rng = random.Random(seed * 2 + per_layer)
    problem = random_problem(rng, per_layer)
    prefill, decode = rng.choice(problem.micro_batch_choices())
    tables = build_tables(problem, problem.cluster.devices, prefill, decode)
    units = LayerUnits.grouped(tables, 1) if per_layer else None
    interchangeable = [
        a.class_key == b.class_key for a, b in zip(tables.devices, tables.devices[1:], strict=False)
    ] + [False]
    result = PartitionMilp(tables, units, interchangeable).solve(EXACT)
    expected = brute_force(tables)
    if math.isinf(expected):
        assert result.stages is None
        assert result.status == "Infeasible"
        return
    assert result.stages is not None
    evaluation = evaluate(tables, result.stages)
    assert evaluation.feasible
    assert evaluation.objective == pytest.approx(expected, rel=1e-7)
    assert result.objective == pytest.approx(evaluation.objective, rel=1e-7)


def test_grouped_units_sum_omega_and_cover_every_layer() -> None:
    problem = random_problem(random.Random(3), per_layer=True)
    tables = build_tables(problem, problem.cluster.devices, 1, 1)
    units = LayerUnits.grouped(tables, 3)
    assert sum(units.sizes) == tables.num_layers
    assert units.omega.sum() == pytest.approx(tables.omega.sum())


def test_fixed_stage_sizes_are_exact_on_identical_devices() -> None:
    """With every stage's size fixed, identical neighbours are no longer interchangeable: a
    middle stage smaller than the next one is a plan like any other (the symmetry rule that
    orders identical middle stages by size must not apply)."""
    rng = random.Random(11)
    base = random_problem(rng, per_layer=True)
    kind = base.cluster.devices[0].type
    devices = tuple(DeviceSpec("h0", i, kind) for i in range(4))
    problem = replace(
        base,
        cluster=replace(base.cluster, devices=devices),
        model=small_model(6),
        indicator=QualityIndicator("random", prior_indicator(small_model(6), 128).omega),
        quality_budget=None,
    )
    tables = build_tables(problem, devices, 1, 1)
    interchangeable = [True, True, True, False]
    for sizes in itertools.product(range(1, 4), repeat=4):
        if sum(sizes) != 6:
            continue
        result = PartitionMilp(tables, None, interchangeable, "free", sizes).solve(EXACT)
        expected = min(
            (
                evaluate(tables, plan).objective
                for plan in contiguous_plans(tables)
                if [len(s.layer_bits) for s in plan] == list(sizes)
                and evaluate(tables, plan).feasible
                and all(
                    tables.allowed(s.position, tables.bits.index(b))
                    for s in plan
                    for b in s.layer_bits
                )
            ),
            default=math.inf,
        )
        assert result.objective == pytest.approx(expected, rel=1e-7), sizes
