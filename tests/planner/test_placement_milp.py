"""The order-free MILP against enumeration of every pipeline order on small clusters."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from planner.catalogue import gpu_device_type
from planner.cluster import ClusterSpec, DeviceSpec, HostSpec, LinkSpec
from planner.highs_model import SolveOptions
from planner.placement_milp import PlacementMilp
from planner.problem import PlanningProblem, build_tables
from planner.simulator import StageAssignment, evaluate
from tests.planner.instances import brute_force, random_problem

EXACT = SolveOptions(time_limit_s=30, mip_rel_gap=1e-9)


def hosts_problem(rng: random.Random, per_layer: bool, alike: bool) -> PlanningProblem:
    """2–3 hosts of 1–2 devices, one type a host; links alike or each pair its own."""
    base = random_problem(rng, per_layer)
    kinds = [
        gpu_device_type(
            f"gpu{k}",
            rng.uniform(1.08, 1.25),
            rng.choice([300, 900]),
            rng.choice([10, 60]),
            peer_bandwidth_gb_s=rng.choice([12, 50]),
        )
        for k in range(3)
    ]
    names = [f"h{h}" for h in range(rng.randint(2, 3))]
    devices = tuple(
        DeviceSpec(name, i, kind)
        for name, kind in zip(names, rng.sample(kinds, len(names)), strict=True)
        for i in range(rng.randint(1, 2))
    )
    links = {}
    if not alike:
        links = {
            frozenset((a, b)): LinkSpec(rng.choice([0.1, 1.0, 10.0]), rng.choice([1e-5, 1e-3]))
            for a in names
            for b in names
            if a < b
        }
    cluster = ClusterSpec(
        "hosts",
        tuple(HostSpec(n) for n in names),
        devices,
        links=links,
        default_link=LinkSpec(rng.choice([0.1, 1.0]), rng.choice([1e-5, 1e-3])),
    )
    return replace(base, cluster=cluster)


def enumerated(problem: PlanningProblem, prefill: int, decode: int) -> float:
    return min(
        (
            brute_force(build_tables(problem, order, prefill, decode))
            for order in problem.cluster.pipeline_orders()
        ),
        default=math.inf,
    )


@pytest.mark.parametrize("seed", range(24))
@pytest.mark.parametrize("alike", [True, False], ids=["links-alike", "links-differ"])
def test_count_form_optimum_equals_every_order_enumerated(seed: int, alike: bool) -> None:
    rng = random.Random(500 + seed)
    problem = hosts_problem(rng, per_layer=False, alike=alike)
    prefill, decode = rng.choice(problem.micro_batch_choices())
    tables = build_tables(problem, problem.cluster.devices, prefill, decode)
    milp = PlacementMilp(tables, "count")
    assert milp.links_alike or not alike
    result = milp.solve(EXACT)
    expected = enumerated(problem, prefill, decode)
    if math.isinf(expected):
        assert result.placement is None
        return
    assert result.placement is not None
    assert result.solved.objective == pytest.approx(expected, rel=1e-7)
    ordered = tables.reordered(result.placement.order)
    stages = [
        (j, tuple(b for k, b in enumerate(tables.bits) for _ in range(c[k])))
        for j, c in enumerate(result.placement.counts)
    ]
    plan = tuple(StageAssignment(j, bits) for j, bits in stages)
    assert evaluate(ordered, plan).objective == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("seed", range(16))
def test_free_and_envelope_forms_bound_the_per_layer_optimum_of_every_order(seed: int) -> None:
    """envelope ≤ free ≤ the per-layer optimum over every order (each a relaxation of the
    next): both are valid bounds for the search to prune with."""
    rng = random.Random(900 + seed)
    problem = hosts_problem(rng, per_layer=True, alike=rng.random() < 0.5)
    prefill, decode = rng.choice(problem.micro_batch_choices())
    tables = build_tables(problem, problem.cluster.devices, prefill, decode)
    free = PlacementMilp(tables, "free").solve(EXACT).solved.objective
    envelope = PlacementMilp(tables, "envelope").solve(EXACT).solved.objective
    expected = enumerated(problem, prefill, decode)
    if math.isinf(envelope):
        assert math.isinf(free)
        assert math.isinf(expected)
        return
    assert envelope <= free * (1 + 1e-7)
    assert free <= expected * (1 + 1e-7)


def test_links_within_a_tenth_are_charged_the_cheapest_and_scored_on_their_own() -> None:
    rng = random.Random(7)
    problem = hosts_problem(rng, per_layer=False, alike=True)
    names = sorted({d.host for d in problem.cluster.devices})
    links = {
        frozenset((a, b)): LinkSpec(1.0 * (1 + 0.03 * i), 1e-3)
        for i, (a, b) in enumerate((a, b) for a in names for b in names if a < b)
    }
    problem = replace(problem, cluster=replace(problem.cluster, links=links))
    tables = build_tables(problem, problem.cluster.devices, 1, 1)
    milp = PlacementMilp(tables, "count")
    assert milp.links_alike
    result = milp.solve(EXACT)
    expected = enumerated(problem, 1, 1)
    assert result.solved.objective <= expected * (1 + 1e-9)
