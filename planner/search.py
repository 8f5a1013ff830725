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
from dataclasses import dataclass, replace

import numpy as np

from planner.baselines import BaselinePlan, all_baselines
from planner.cluster import DeviceSpec
from planner.errors import InfeasiblePlanError
from planner.indicator import BITS_COLUMN
from planner.milp import (
    LayerUnits,
    MilpResult,
    PartitionMilp,
    SolveOptions,
    best_arrangement,
)
from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import Evaluation, StageAssignment, evaluate

GIB = 1024**3

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


@dataclass(frozen=True)
class _Candidate:
    """One (order, micro-batch) instance, its MILP and its LP-relaxation bound."""

    tables: CostTables
    milp: PartitionMilp
    bound: float


def _ranked_candidates(
    problem: PlanningProblem, units_of: Callable[[CostTables], LayerUnits | None]
) -> list[_Candidate]:
    """Every order × micro-batch instance with a feasible relaxation, lowest bound first."""
    candidates = []
    for order in problem.cluster.class_orders():
        for prefill, decode in problem.micro_batch_choices():
            tables = build_tables(problem, order, prefill, decode)
            milp = PartitionMilp(tables, units_of(tables), _interchangeable(order))
            bound = milp.relaxation_bound()
            if math.isfinite(bound):
                candidates.append(_Candidate(tables, milp, bound))
    return sorted(candidates, key=lambda c: c.bound)


def search(
    problem: PlanningProblem,
    options: SearchOptions | None = None,
    progress: ProgressFn | None = None,
) -> SearchResult:
    """Find the plan of least objective; raises InfeasiblePlanError when none exists.

    Instances are solved in order of their LP bound, each with the incumbent as cutoff; the
    search stops once the next bound cannot beat the incumbent by more than the gap.
    """
    options = options or SearchOptions()
    started = time.perf_counter()
    if not problem.cluster.devices:
        raise InfeasiblePlanError("the cluster has no devices (all excluded?)")
    baselines = tuple(all_baselines(problem))
    best = _Incumbent()
    for b in baselines:
        if b.tables is not None and b.stages is not None:
            best.offer(b.tables, b.stages)
    group = _group_size(problem, options)
    candidates = _ranked_candidates(
        problem, lambda t: None if group == 0 else LayerUnits.grouped(t, group)
    )
    if group != 0 and candidates:
        _offer_count_form_plan(candidates[0].tables, best, options)
    results: list[MilpResult] = []
    for candidate in candidates:
        remaining = options.time_limit_s - (time.perf_counter() - started)
        if candidate.bound >= best.objective * (1 - options.mip_rel_gap) or remaining <= 0:
            break  # sorted by bound: no later instance can do better
        results.append(_solve(candidate, best, remaining, options))
        if progress is not None:
            progress(len(results), len(candidates))
    if best.tables is None or best.stages is None:
        raise InfeasiblePlanError(diagnose_infeasible(problem))
    status, gap = _summary(results, candidates, best.objective, options.mip_rel_gap)
    return SearchResult(
        tables=best.tables,
        stages=best.stages,
        evaluation=evaluate(best.tables, best.stages),
        status=status,
        mip_gap=gap,
        time_s=time.perf_counter() - started,
        milps_solved=len(results),
        orders_tried=len(problem.cluster.class_orders()),
        formulation="count" if group == 0 else "per-layer",
        layer_group_size=max(group, 1),
        baselines=baselines,
    )


def _group_size(problem: PlanningProblem, options: SearchOptions) -> int:
    """0 for the count form (layers alike), else the per-layer unit size (1 = no grouping)."""
    if problem.indicator.layers_alike:
        return 0
    per_unit = len(problem.cluster.devices) * len(problem.bits)
    return max(1, math.ceil(problem.model.num_layers * per_unit / options.max_unit_binaries))


def _solve(
    candidate: _Candidate, best: _Incumbent, remaining_s: float, options: SearchOptions
) -> MilpResult:
    """Solve one instance against the incumbent. In the per-layer form, first the relaxation
    with fractional layer positions: it prunes the instance or supplies a plan, and only when
    its bound leaves room does the exact MILP run."""
    tables, milp = candidate.tables, candidate.milp
    solve = SolveOptions(
        remaining_s, options.mip_rel_gap, best.objective * (1 + 1e-9), options.verbose
    )
    if milp.layerwise:
        relaxed = milp.solve(solve, relax_positions=True)
        if relaxed.stages is not None:
            best.offer(tables, relaxed.stages)
        if relaxed.dual_bound >= best.objective * (1 - options.mip_rel_gap):
            return relaxed
        solve = replace(solve, cutoff=best.objective * (1 + 1e-9))
    same_order = best.tables is not None and best.tables.devices == tables.devices
    result = milp.solve(solve, best.stages if same_order else None)
    if result.stages is not None:
        best.offer(tables, result.stages)
    return result


def _offer_count_form_plan(tables: CostTables, best: _Incumbent, options: SearchOptions) -> None:
    """Warm start for the per-layer form: solve the count form with every layer scored by
    the mean ω, then arrange each stage's precisions over its layers for least Σω."""
    mean = np.tile(tables.omega.mean(axis=0), (tables.num_layers, 1))
    surrogate = replace(tables, omega=mean)
    milp = PartitionMilp(surrogate, None, _interchangeable(tables.devices))
    result = milp.solve(SolveOptions(options.time_limit_s / 10, options.mip_rel_gap))
    if result.stages is not None:
        counts = [
            (st.position, [st.layer_bits.count(b) for b in tables.bits]) for st in result.stages
        ]
        best.offer(tables, best_arrangement(tables, counts))


def _summary(
    results: Sequence[MilpResult], candidates: Sequence[_Candidate], best: float, gap: float
) -> tuple[str, float]:
    """Overall status and relative gap: the incumbent against the least bound of every
    instance (dual bound if solved, LP bound if not)."""
    bounds = [r.dual_bound for r in results]
    if len(results) < len(candidates):
        bounds.append(candidates[len(results)].bound)
    bound = min(bounds, default=best)
    final_gap = max(0.0, (best - bound) / best) if best > 0 and math.isfinite(bound) else 0.0
    return ("optimal" if final_gap <= gap * (1 + 1e-6) else "time limit"), final_gap


def diagnose_infeasible(problem: PlanningProblem) -> str:
    """Say why no plan exists, in the terms an operator can act on."""
    tables = build_tables(problem, problem.cluster.devices, 1, 1)
    have = float(tables.capacity_bytes.sum())

    def need(bits: int) -> float:
        k = tables.bits.index(bits)
        per_layer = float(tables.layer_memory_bytes[:, k].min())
        ends = float(tables.embedding_bytes.min() + tables.head_bytes.min())
        return problem.model.num_layers * per_layer + ends

    lowest, budget = min(problem.bits), problem.quality_budget
    if need(lowest) > have:
        return (
            f"needs {need(lowest) / GIB:.1f} GiB at {lowest} bits (weights and KV cache for "
            f"batch {problem.workload.global_batch} × {problem.workload.max_context} tokens), "
            f"cluster has {have / GIB:.1f} GiB usable; add devices, lower --batch, "
            "--prompt-len or --max-new, or allow fewer bits"
        )
    if budget is not None:
        within = [
            b
            for b in problem.bits
            if problem.indicator.omega[:, BITS_COLUMN[b]].sum() <= budget + 1e-12
        ]
        bits = min(within, default=max(problem.bits))
        return (
            f"the quality budget {budget:g} keeps layers at about {bits} bits or more, which "
            f"needs {need(bits) / GIB:.1f} GiB; the cluster has {have / GIB:.1f} GiB usable: "
            "raise --quality, add devices, or lower --batch or --max-new"
        )
    k = tables.bits.index(lowest)
    per_layer = float(tables.layer_memory_bytes[:, k].min())
    return (
        "no device order fits: each device must hold whole layers "
        f"({per_layer / GIB:.2f} GiB per layer at {lowest} bits with its KV cache) plus its "
        "activations; lower --batch or --max-new"
    )
