"""The whole search against exhaustive enumeration, plan validity re-checked from the cost
model's primitives, and infeasibility explained."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest

from planner import cost_model as cm
from planner.cluster_file import load_cluster_file
from planner.errors import InfeasiblePlanError
from planner.indicator import QualityIndicator, prior_indicator
from planner.make_plan import make_plan
from planner.model_spec import load_model_spec
from planner.plan import Plan, Workload
from planner.problem import PlanningProblem
from planner.search import SearchOptions, search
from tests.planner.instances import (
    brute_force_search,
    random_problem,
    small_model,
    synthetic_cluster,
)

EXACT = SearchOptions(time_limit_s=60, mip_rel_gap=1e-9)
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "clusters"


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("per_layer", [False, True], ids=["count", "per-layer"])
def test_search_optimum_equals_enumeration(seed: int, per_layer: bool) -> None:
    problem = random_problem(random.Random(1000 + seed * 2 + per_layer), per_layer)
    expected = brute_force_search(problem, problem.cluster.pipeline_orders())
    if math.isinf(expected):
        with pytest.raises(InfeasiblePlanError):
            search(problem, EXACT)
        return
    result = search(problem, EXACT)
    assert result.status == "optimal"
    assert result.evaluation.objective == pytest.approx(expected, rel=1e-7)
    check_plan(problem, make_plan(problem, EXACT))


def check_plan(problem: PlanningProblem, plan: Plan) -> None:
    """Memory, contiguity and quality budget, recomputed from the cost model's primitives."""
    model, workload = problem.model, problem.workload
    devices = {d.key: d for d in problem.cluster.devices}
    assert [s.layer_range.start for s in plan.stages] == [0] + [
        s.layer_range.stop for s in plan.stages[:-1]
    ]
    assert plan.stages[-1].layer_range.stop == model.num_layers
    for k, stage in enumerate(plan.stages):
        device = devices[stage.device.key].type
        assert set(stage.layer_bits) <= set(problem.bits) & device.supported_bits
        need = sum(
            cm.layer_memory_bytes(
                model, device, b, workload.global_batch, workload.max_context, problem.group_size
            )
            for b in stage.layer_bits
        )
        need += cm.activation_peak_bytes(
            model,
            device,
            plan.micro_batching.prefill_size,
            plan.micro_batching.decode_size,
            workload.prompt_len,
            workload.max_context,
        )
        if any(b != 16 and b not in device.fast_kernel_bits for b in stage.layer_bits):
            need += cm.dequant_scratch_bytes(model, device.dense_weight_bytes)
        first, last = k == 0, k == len(plan.stages) - 1
        dense = device.activation_bytes
        head = cm.head_bytes(
            model, max(plan.micro_batching.prefill_size, plan.micro_batching.decode_size), dense
        )
        need += cm.embedding_bytes(model, dense) * first + head * last
        need -= cm.tied_saving_bytes(model, dense) * (first and last)
        assert need <= device.usable_memory_bytes
        assert stage.predicted.memory_bytes == pytest.approx(need, abs=2)
    omega = problem.indicator.plan_omega(plan.layer_bits)
    assert plan.quality.omega_sum == pytest.approx(omega)
    if problem.quality_budget is not None:
        assert omega <= problem.quality_budget + 1e-9


@pytest.mark.parametrize("number", [3, 4, 5, 6, 9])
def test_paper_cluster_plans_are_valid_and_beat_baselines(number: int) -> None:
    spec = load_cluster_file(EXAMPLES / f"cluster-{number:02d}.toml")
    assert spec.model is not None
    model = load_model_spec(spec.model)
    problem = PlanningProblem(
        model=model,
        cluster=spec.cluster,
        workload=Workload(32, 512, 100, 100),
        indicator=prior_indicator(model, 128),
        quality_budget=0.05,
    )
    plan = make_plan(problem, SearchOptions(time_limit_s=60))
    check_plan(problem, plan)
    assert plan.solver.status == "optimal"
    assert plan.solver.mip_gap <= 1e-3
    best = plan.prediction.throughput_tokens_per_s
    for baseline in plan.baselines:
        if baseline.feasible and baseline.within_quality_budget:
            assert baseline.throughput_tokens_per_s is not None
            assert best >= baseline.throughput_tokens_per_s * (1 - 1e-3), baseline.name


def test_infeasible_memory_names_the_shortfall() -> None:
    spec = load_cluster_file(EXAMPLES / "cluster-09.toml")  # 4×T4
    model = load_model_spec("bloom-176b")
    problem = PlanningProblem(
        model=model,
        cluster=spec.cluster,
        workload=Workload(32, 512, 100, 100),
        indicator=prior_indicator(model, 128),
    )
    with pytest.raises(InfeasiblePlanError) as err:
        search(problem)
    assert str(err.value) == (
        "needs 131.9 GiB at 2 bits (weights and KV cache for batch 32 × 612 tokens), cluster "
        "has 56.8 GiB usable; add devices, lower --batch, --prompt-len or --max-new, or allow "
        "fewer bits"
    )


def test_infeasible_quality_budget_is_named() -> None:
    spec = load_cluster_file(EXAMPLES / "cluster-09.toml")
    model = load_model_spec("opt-30b")
    problem = PlanningProblem(
        model=model,
        cluster=spec.cluster,
        workload=Workload(32, 512, 100, 100),
        indicator=prior_indicator(model, 128),
        quality_budget=0.0,
    )
    with pytest.raises(InfeasiblePlanError) as err:
        search(problem)
    assert str(err.value) == (
        "the quality budget 0 keeps layers at about 16 bits or more, which needs 81.6 GiB; the "
        "cluster has 56.8 GiB usable: raise --quality, add devices, or lower --batch or "
        "--max-new"
    )


def test_empty_cluster_is_infeasible() -> None:
    spec = load_cluster_file(EXAMPLES / "cluster-01.toml")
    cluster = spec.cluster.without(d.key for d in spec.cluster.devices)
    model = small_model(4)
    problem = PlanningProblem(
        model=model,
        cluster=cluster,
        workload=Workload(4, 64, 8, 8),
        indicator=prior_indicator(model, 128),
    )
    with pytest.raises(InfeasiblePlanError, match="no devices"):
        search(problem)


def synthetic_problem(devices: int, per_layer: bool = False) -> PlanningProblem:
    model = load_model_spec("llama-3.1-70b")
    indicator = prior_indicator(model, 128)
    if per_layer:
        shape = np.linspace(2.0, 0.5, model.num_layers)
        indicator = QualityIndicator("sloped", indicator.omega * shape[:, None])
    return PlanningProblem(
        model=model,
        cluster=synthetic_cluster(devices),
        workload=Workload(32, 512, 100, 100),
        indicator=indicator,
        quality_budget=0.05,
    )


def test_no_bound_is_said_not_hidden() -> None:
    """Out of time before any micro-batch pair has a bound: the baseline's plan comes back as
    'time limit, no bound' with a null gap, never as optimal."""
    problem = synthetic_problem(16)
    result = search(problem, SearchOptions(time_limit_s=1e-6))
    assert result.status == "time limit, no bound"
    assert result.mip_gap is None
    assert not result.order_search.exhaustive
    plan = make_plan(problem, SearchOptions(time_limit_s=1e-6))
    assert plan.solver.status == "time limit, no bound"
    assert json.loads(plan.to_json())["solver"]["mip_gap"] is None
    assert Plan.from_json(plan.to_json()).solver.gap_text == "no bound"


@pytest.mark.parametrize("limit_s", [1.0, 3.0])
def test_every_step_counts_against_the_time_limit(limit_s: float) -> None:
    """Baselines, LP bounds and MILPs together end within a tenth of the limit (64 devices
    on 16 hosts, per-layer ω: far more work than the limit allows)."""
    problem = synthetic_problem(64, per_layer=True)
    started = time.perf_counter()
    result = search(problem, SearchOptions(time_limit_s=limit_s))
    elapsed = time.perf_counter() - started
    assert elapsed <= 1.1 * limit_s
    assert result.time_s <= elapsed
    assert result.status in ("time limit", "time limit, no bound")


def depth_problem(number: int) -> PlanningProblem:
    """A paper cluster with per-layer ω, highest at the first and last layers."""
    spec = load_cluster_file(EXAMPLES / f"cluster-{number:02d}.toml")
    assert spec.model is not None
    model = load_model_spec(spec.model)
    shape = 1 + 2 * np.cos(np.linspace(0, np.pi, model.num_layers)) ** 4
    return PlanningProblem(
        model=model,
        cluster=spec.cluster,
        workload=Workload(32, 512, 100, 100),
        indicator=QualityIndicator("depth", prior_indicator(model, 128).omega * shape[:, None]),
        quality_budget=0.05,
    )


def test_plan_records_an_exhaustive_order_search() -> None:
    """Per-layer ω on a memory-tight paper cluster (3×P100-12G + 1×V100-32G): the free-form
    bound leaves a gap, every pipeline order is refined, and the plan says the search over
    orders was exhaustive."""
    problem = depth_problem(4)
    plan = make_plan(problem, SearchOptions(time_limit_s=120, mip_rel_gap=1e-3))
    check_plan(problem, plan)
    assert plan.solver.status == "optimal"
    assert plan.solver.order_search == "in the MILP, then 2 device orders enumerated"
    assert plan.solver.order_search_exhaustive
    assert plan.solver.orders_tried == 2
    assert "2 hosts kept contiguous" in plan.solver.order_search_note


def test_plan_records_an_order_search_that_was_not_exhaustive() -> None:
    """The same instance allowed one order only, at a gap the placement's bound does not
    close: the per-layer refinement runs on the placement's order, and the plan says the order
    search was not exhaustive."""
    problem = depth_problem(4)
    plan = make_plan(problem, SearchOptions(time_limit_s=120, mip_rel_gap=1e-5, max_orders=1))
    check_plan(problem, plan)
    assert plan.solver.order_search == "in the MILP, then refined on the chosen order"
    assert plan.solver.order_search_exhaustive is False
