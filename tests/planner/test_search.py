"""The whole search against exhaustive enumeration, plan validity re-checked from the cost
model's primitives, and infeasibility explained."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from planner import cost_model as cm
from planner.cluster_file import load_cluster_file
from planner.errors import InfeasiblePlanError
from planner.indicator import prior_indicator
from planner.make_plan import make_plan
from planner.model_spec import load_model_spec
from planner.plan import Plan, Workload
from planner.problem import PlanningProblem
from planner.search import SearchOptions, search
from tests.planner.instances import brute_force_search, random_problem, small_model

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
