"""Outer search: device-class orders × (prefill, decode) micro-batch sizes, one MILP each.

Orders come from :meth:`ClusterSpec.class_orders` (devices of one host and type stay together
and are never permuted among themselves). The best baseline plan that meets the quality
budget is the first incumbent: its objective is the cutoff handed to every MILP, so a
candidate that cannot beat it stops early, and it warm-starts the MILP of its own order.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.baselines import BaselinePlan, all_baselines
from planner.cluster import DeviceSpec
from planner.errors import InfeasiblePlanError
from planner.milp import LayerUnits, MilpResult, PartitionMilp, SolveOptions
from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import Evaluation, StageAssignment, evaluate

ProgressFn = Callable[[int, int], None]
"""Called as progress(done, total) after each MILP."""


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """Limits of a search.

    Attributes:
        time_limit_s: wall-clock budget of the whole search, seconds.
        mip_rel_gap: relative optimality gap each MILP stops at.
        max_unit_binaries: above this many per-layer binaries, consecutive layers are grouped.
        verbose: print HiGHS's log.
    """

    time_limit_s: float = 60.0
    mip_rel_gap: float = 1e-4
    max_unit_binaries: int = 4000
    verbose: bool = False


@dataclass(frozen=True)
class SearchResult:
    """The best plan found, how it scores, and how the search went."""

    tables: CostTables
    stages: tuple[StageAssignment, ...]
    evaluation: Evaluation
    status: str
    mip_gap: float
    time_s: float
    milps_solved: int
    orders_tried: int
    formulation: str
    layer_group_size: int
    baselines: tuple[BaselinePlan, ...]


@dataclass
class _Incumbent:
    tables: CostTables | None = None
    stages: tuple[StageAssignment, ...] | None = None
    objective: float = math.inf

    def offer(self, tables: CostTables, stages: tuple[StageAssignment, ...]) -> None:
        ev = evaluate(tables, stages)
        if ev.feasible and ev.objective < self.objective:
            self.tables, self.stages, self.objective = tables, stages, ev.objective


def _interchangeable(order: Sequence[DeviceSpec]) -> list[bool]:
    return [a.class_key == b.class_key for a, b in itertools.pairwise(order)] + [False]


def _units(
    problem: PlanningProblem, tables: CostTables, options: SearchOptions
) -> tuple[LayerUnits | None, int]:
    """Count form when layers score alike, else per-layer units, grouped when too many."""
    if problem.indicator.layers_alike:
        return None, 1
    per_group = tables.num_devices * len(tables.bits)
    group = max(1, math.ceil(tables.num_layers * per_group / options.max_unit_binaries))
    return LayerUnits.grouped(tables, group), group


def search(
    problem: PlanningProblem,
    options: SearchOptions | None = None,
    progress: ProgressFn | None = None,
) -> SearchResult:
    """Find the plan of least objective; raises InfeasiblePlanError when none exists."""
    options = options or SearchOptions()
    started = time.perf_counter()
    if not problem.cluster.devices:
        raise InfeasiblePlanError("the cluster has no devices (all excluded?)")
    baselines = tuple(all_baselines(problem))
    best = _Incumbent()
    for b in baselines:
        if b.tables is not None and b.stages is not None:
            best.offer(b.tables, b.stages)
    orders = problem.cluster.class_orders()
    candidates = [(o, p, d) for o in orders for p, d in problem.micro_batch_choices()]
    results: list[MilpResult] = []
    formulation, group = "count", 1
    for done, (order, prefill, decode) in enumerate(candidates, start=1):
        remaining = options.time_limit_s - (time.perf_counter() - started)
        if remaining <= 0:
            break
        tables = build_tables(problem, order, prefill, decode)
        units, group = _units(problem, tables, options)
        formulation = "count" if units is None else "per-layer"
        milp = PartitionMilp(tables, units, _interchangeable(order))
        warm = best.stages if best.tables is not None and best.tables.devices == order else None
        cutoff = best.objective * (1 + 1e-9) if math.isfinite(best.objective) else math.inf
        result = milp.solve(
            SolveOptions(remaining, options.mip_rel_gap, cutoff, options.verbose), warm
        )
        results.append(result)
        if result.stages is not None:
            best.offer(tables, result.stages)
        if progress is not None:
            progress(done, len(candidates))
    if best.tables is None or best.stages is None:
        raise InfeasiblePlanError(diagnose_infeasible(problem))
    status, gap = _summary(results, len(candidates), best.objective)
    return SearchResult(
        tables=best.tables,
        stages=best.stages,
        evaluation=evaluate(best.tables, best.stages),
        status=status,
        mip_gap=gap,
        time_s=time.perf_counter() - started,
        milps_solved=len(results),
        orders_tried=len({id(c[0]) for c in candidates[: len(results)]}),
        formulation=formulation,
        layer_group_size=group,
        baselines=baselines,
    )


def _summary(results: Sequence[MilpResult], total: int, best: float) -> tuple[str, float]:
    """Overall status and relative gap: best versus the least dual bound of all MILPs."""
    if len(results) < total:
        return f"time limit ({len(results)} of {total} MILPs solved)", math.inf
    bound = min((r.dual_bound for r in results), default=math.inf)
    gap = max(0.0, (best - bound) / best) if math.isfinite(bound) and best > 0 else 0.0
    limited = any(r.status.lower().startswith("time") for r in results)
    return ("time limit" if limited else "optimal"), gap


def diagnose_infeasible(problem: PlanningProblem) -> str:
    """Say why no plan exists, in the terms an operator can act on."""
    lowest = min(problem.bits)
    devices = problem.cluster.devices
    tables = build_tables(problem, devices, 1, 1)
    k = tables.bits.index(lowest)
    per_layer = min(float(tables.layer_memory_bytes[j, k]) for j in range(len(devices)))
    need = problem.model.num_layers * per_layer + tables.embedding_bytes + tables.head_bytes
    have = float(tables.capacity_bytes.sum())
    gib = 1024**3
    if need > have:
        return (
            f"needs {need / gib:.1f} GiB at {lowest} bits (weights and KV cache for batch "
            f"{problem.workload.global_batch} × {problem.workload.max_context} tokens), "
            f"cluster has {have / gib:.1f} GiB usable; add devices, lower --batch, "
            "--prompt-len or --max-new, or allow fewer bits"
        )
    budget = problem.quality_budget
    if budget is not None:
        return (
            f"the quality budget {budget:g} cannot be met within the cluster's memory "
            f"({have / gib:.1f} GiB usable): raise --quality or lower --batch/--max-new"
        )
    return (
        "no device order fits: each device must hold whole layers "
        f"({per_layer / gib:.2f} GiB per layer at {lowest} bits with its KV cache) plus "
        "its activations; lower --batch or --max-new"
    )
