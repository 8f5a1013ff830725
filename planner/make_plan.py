"""From specs to a validated :class:`Plan`: search, then record the plan and its predictions."""

from __future__ import annotations

from collections.abc import Sequence

from planner.baselines import BaselinePlan
from planner.cost_model import process_baseline_bytes
from planner.plan import (
    BaselineResult,
    LayerRange,
    MicroBatching,
    Plan,
    Prediction,
    QualityReport,
    Quantization,
    SolverReport,
    Stage,
    StagePrediction,
    validate,
)
from planner.problem import PlanningProblem
from planner.search import ProgressFn, SearchOptions, SearchResult, search


def make_plan(
    problem: PlanningProblem,
    options: SearchOptions | None = None,
    progress: ProgressFn | None = None,
) -> Plan:
    """Search for the best plan of ``problem`` and return it validated.

    Raises:
        InfeasiblePlanError: no plan fits the cluster under the workload and quality target.
    """
    result = search(problem, options or SearchOptions(), progress)
    plan = plan_from_result(problem, result)
    validate(plan)
    return plan


def _stages(result: SearchResult) -> tuple[Stage, ...]:
    ev, tables = result.evaluation, result.tables
    stages, start, last = [], 0, len(result.stages) - 1
    for k, s in enumerate(result.stages):
        stages.append(
            Stage(
                device=tables.devices[s.position].ref,
                layer_range=LayerRange(start, start + len(s.layer_bits)),
                layer_bits=s.layer_bits,
                holds_embedding=k == 0,
                holds_lm_head=k == last,
                predicted=StagePrediction(
                    prefill_s=ev.stage_prefill_s[k],
                    decode_s=ev.stage_decode_s[k],
                    memory_bytes=ev.stage_memory_bytes[k],
                    memory_capacity_bytes=ev.stage_capacity_bytes[k],
                    process_bytes=int(ev.stage_memory_bytes[k])
                    + process_baseline_bytes(tables.devices[s.position].type),
                ),
            )
        )
        start += len(s.layer_bits)
    return tuple(stages)


def baseline_result(plan: BaselinePlan, budget: float | None) -> BaselineResult:
    """A baseline's record in the plan file."""
    ev = plan.evaluation
    if ev is None:
        return BaselineResult(name=plan.name, feasible=False, reason=plan.reason)
    within = budget is None or ev.omega_sum <= budget + 1e-9
    return BaselineResult(
        name=plan.name,
        feasible=ev.fits_memory,
        reason="" if ev.fits_memory else "does not fit in memory",
        throughput_tokens_per_s=ev.throughput_tokens_per_s,
        prefill_s=ev.prefill_s,
        decode_s=ev.decode_s,
        omega_sum=ev.omega_sum,
        within_quality_budget=within,
    )


def plan_from_result(
    problem: PlanningProblem, result: SearchResult, notes: Sequence[str] = ()
) -> Plan:
    """Record a search result as a plan (not yet validated)."""
    ev, tables = result.evaluation, result.tables
    return Plan(
        model=problem.model.to_ref(),
        workload=problem.workload,
        quantization=Quantization(group_size=problem.group_size),
        micro_batching=MicroBatching(
            prefill_size=tables.prefill_micro_batch, decode_size=tables.decode_micro_batch
        ),
        stages=_stages(result),
        prediction=Prediction(
            prefill_s=ev.prefill_s,
            decode_s=ev.decode_s,
            total_s=ev.total_s,
            throughput_tokens_per_s=ev.throughput_tokens_per_s,
        ),
        quality=QualityReport(
            indicator=problem.indicator.name,
            omega_sum=ev.omega_sum,
            budget=problem.quality_budget,
            theta_s=problem.theta_s,
        ),
        solver=SolverReport(
            status=result.status,
            mip_gap=result.mip_gap,
            time_s=result.time_s,
            milps_solved=result.milps_solved,
            orders_tried=result.orders_tried,
            formulation=result.formulation,
            layer_group_size=result.layer_group_size,
            order_search=result.order_search.method,
            order_search_exhaustive=result.order_search.exhaustive,
            order_search_note=result.order_search.note,
        ),
        baselines=tuple(baseline_result(b, problem.quality_budget) for b in result.baselines),
        notes=tuple(notes),
    )
