"""The search: one order-free MILP per (prefill, decode) micro-batch pair, then, where the
relaxation leaves a gap, MILPs over fixed device orders.

1. Baselines. The best one that meets the quality budget is the first incumbent; its objective
   is the cutoff of every MILP that follows.
2. Placement (:mod:`planner.placement_milp`): the device order is chosen inside the MILP, over
   every order that keeps a host's devices together. Pairs are solved in order of their LP
   bound; once the next bound cannot beat the incumbent by more than the gap, the rest are
   pruned. With every layer scoring alike (count form) this is exact where the hop model is
   (links alike between hosts, one device type per host); otherwise its optimum is a lower
   bound and its decoded plan an incumbent.
3. Refinement, for pairs whose bound still leaves a gap (per-layer ω, or mixed hosts): every
   pipeline order when there are at most ``max_orders`` (exhaustive), else the order the
   placement chose; per order, the count / free-assignment MILP bounds it, and in the per-layer
   form the exact per-layer MILP follows only where that bound leaves room.

Every step counts against ``time_limit_s`` (baselines and LP bounds too). The reported gap is
the incumbent against the least bound over every pair (an LP bound, a MILP's dual bound, or
the least over an exhaustive set of orders); with no bound at all for some pair the status
says so.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from planner.arrangement import best_arrangement
from planner.baselines import BaselinePlan, all_baselines
from planner.cluster import DeviceSpec
from planner.errors import InfeasiblePlanError
from planner.highs_model import GIB, SolveOptions
from planner.indicator import BITS_COLUMN
from planner.milp import LayerUnits, PartitionMilp, QualityForm
from planner.placement_milp import Placement, PlacementMilp
from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import Evaluation, StageAssignment, evaluate

ProgressFn = Callable[[int, int], None]
"""Called as progress(done, total) after each MILP."""


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """Limits of a search.

    Attributes:
        time_limit_s: wall-clock budget of the whole search, seconds.
        mip_rel_gap: relative optimality gap the search stops at.
        max_unit_binaries: above this many per-layer binaries in a refinement MILP,
            consecutive layers are grouped (its plan stays valid; its bound is not used).
        max_orders: refine over every pipeline order when there are at most this many.
        verbose: print HiGHS's log.
    """

    time_limit_s: float = 60.0
    mip_rel_gap: float = 1e-4
    max_unit_binaries: int = 4000
    max_orders: int = 24
    verbose: bool = False


@dataclass(frozen=True)
class OrderSearch:
    """How device orders were searched: ``method`` ("in the MILP", or "in the MILP, then N
    orders enumerated"), whether every order was solved or bounded away (``exhaustive``), and a
    note naming what was pruned and by what."""

    method: str
    exhaustive: bool
    note: str


@dataclass(frozen=True)
class SearchResult:
    """The best plan found, how it scores, and how the search went."""

    tables: CostTables
    stages: tuple[StageAssignment, ...]
    evaluation: Evaluation
    status: str
    mip_gap: float | None
    bound: float
    time_s: float
    milps_solved: int
    orders_tried: int
    formulation: str
    layer_group_size: int
    order_search: OrderSearch
    baselines: tuple[BaselinePlan, ...]


@dataclass
class _Incumbent:
    tables: CostTables | None = None
    stages: tuple[StageAssignment, ...] | None = None
    objective: float = math.inf

    def offer(self, tables: CostTables, stages: tuple[StageAssignment, ...]) -> None:
        ev = evaluate(tables, stages)
        allowed = all(
            tables.allowed(s.position, tables.bits.index(b)) for s in stages for b in s.layer_bits
        )
        if allowed and ev.feasible and ev.objective < self.objective:
            self.tables, self.stages, self.objective = tables, stages, ev.objective

    def cutoff(self) -> float:
        return self.objective * (1 + 1e-9)


@dataclass
class _Pair:
    """One micro-batch pair: its tables in the cluster's order, its placement MILP and the
    best lower bound known for it (-inf: none yet)."""

    tables: CostTables
    milp: PlacementMilp | None = None
    bound: float = -math.inf
    placement: Placement | None = None
    solved: bool = False


@dataclass
class _Clock:
    limit_s: float
    started: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.limit_s - (time.perf_counter() - self.started)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class _Tally:
    milps: int = 0
    orders: int = 0
    pruned_pairs: int = 0
    refined_orders: int = 0
    pruned_orders: int = 0
    timed_out: bool = False
    refinement: str = ""
    layer_group: int = 1


def search(
    problem: PlanningProblem,
    options: SearchOptions | None = None,
    progress: ProgressFn | None = None,
) -> SearchResult:
    """Find the plan of least objective; raises InfeasiblePlanError when none exists."""
    options = options or SearchOptions()
    clock = _Clock(options.time_limit_s)
    if not problem.cluster.devices:
        raise InfeasiblePlanError("the cluster has no devices (all excluded?)")
    baselines = tuple(all_baselines(problem))
    best = _Incumbent()
    for b in baselines:
        if b.tables is not None and b.stages is not None:
            best.offer(b.tables, b.stages)
    form: QualityForm = "count" if problem.indicator.layers_alike else "free"
    tally = _Tally()
    pairs = _ranked_pairs(problem, form, clock, tally)
    report = _Reporter(progress, len(pairs))
    _place(pairs, best, form, options, clock, tally, report)
    if _gap_left(pairs, best, options) and not tally.timed_out:
        _refine(problem, pairs, best, form, options, clock, tally, report)
    if best.tables is None or best.stages is None:
        if tally.timed_out:
            raise InfeasiblePlanError(
                f"no plan found within --time-limit {options.time_limit_s:g} s; raise it"
            )
        raise InfeasiblePlanError(diagnose_infeasible(problem))
    bound = min((p.bound for p in pairs), default=-math.inf)
    if len(pairs) < len(problem.micro_batch_choices()):
        bound = -math.inf
    status, gap = _summary(best.objective, bound, options.mip_rel_gap, tally.timed_out)
    return SearchResult(
        tables=best.tables,
        stages=best.stages,
        evaluation=evaluate(best.tables, best.stages),
        status=status,
        mip_gap=gap,
        bound=bound,
        time_s=clock.elapsed(),
        milps_solved=tally.milps,
        orders_tried=tally.orders,
        formulation="count" if form == "count" else "per-layer",
        layer_group_size=tally.layer_group,
        order_search=_order_search(problem, pairs, tally),
        baselines=baselines,
    )


class _Reporter:
    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def milp(self, tally: _Tally, extra: int = 0) -> None:
        tally.milps += 1
        self.done += 1
        self.total = max(self.total + extra, self.done)
        if self.progress is not None:
            self.progress(self.done, self.total)


def _ranked_pairs(
    problem: PlanningProblem, form: QualityForm, clock: _Clock, tally: _Tally
) -> list[_Pair]:
    """Every micro-batch pair with its LP bound, lowest first (pairs left when time runs out
    have no bound)."""
    pairs = []
    for prefill, decode in problem.micro_batch_choices():
        if clock.left() <= 0:
            tally.timed_out = True
            break
        pair = _Pair(build_tables(problem, problem.cluster.devices, prefill, decode))
        pair.milp = PlacementMilp(pair.tables, form)
        pair.bound = pair.milp.relaxation_bound()
        pairs.append(pair)
    return sorted(pairs, key=lambda p: p.bound)


def _place(
    pairs: Sequence[_Pair],
    best: _Incumbent,
    form: QualityForm,
    options: SearchOptions,
    clock: _Clock,
    tally: _Tally,
    report: _Reporter,
) -> None:
    for pair in pairs:
        if pair.bound >= best.objective * (1 - options.mip_rel_gap):
            tally.pruned_pairs += 1
            continue
        if clock.left() <= 0:
            tally.timed_out = True
            break
        assert pair.milp is not None
        solve = SolveOptions(clock.left(), options.mip_rel_gap, best.cutoff(), options.verbose)
        result = pair.milp.solve(solve)
        report.milp(tally)
        pair.bound = max(pair.bound, result.solved.dual_bound)
        pair.solved = True
        if not result.solved.finished:
            tally.timed_out = True
        if result.placement is not None:
            pair.placement = result.placement
            tables = pair.tables.reordered(result.placement.order)
            best.offer(tables, _stages(tables, result.placement.counts, form))
            if form == "free" and clock.left() > 0:
                _fit_ranges(pair.tables, result.placement, best, options, clock, tally, report)


def _fit_ranges(
    tables: CostTables,
    placement: Placement,
    best: _Incumbent,
    options: SearchOptions,
    clock: _Clock,
    tally: _Tally,
    report: _Reporter,
) -> None:
    """Per-layer plans on the placement's devices: the precisions chosen again layer by layer
    within each stage (an exact MILP once the stage sizes are fixed), starting from the
    placement's sizes, then moving one layer across a stage boundary while that helps."""
    used = tables.reordered(placement.order[: len(placement.counts)])
    interchangeable = _interchangeable(used.devices)

    def attempt(sizes: list[int]) -> bool:
        milp = PartitionMilp(used, None, interchangeable, "free", sizes)
        solve = SolveOptions(clock.left(), options.mip_rel_gap, best.cutoff(), options.verbose)
        result = milp.solve(solve)
        report.milp(tally, extra=1)
        before = best.objective
        if result.stages is not None:
            best.offer(used, result.stages)
        return best.objective < before

    sizes = [sum(c) for c in placement.counts]
    moved = attempt(sizes)
    while moved and clock.left() > 0:
        moved = False
        for b, step in itertools.product(range(len(sizes) - 1), (1, -1)):
            trial = list(sizes)
            trial[b] -= step
            trial[b + 1] += step
            if min(trial[b], trial[b + 1]) >= 1 and clock.left() > 0 and attempt(trial):
                sizes, moved = trial, True


def _stages(
    tables: CostTables, counts: Sequence[Sequence[int]], form: QualityForm
) -> tuple[StageAssignment, ...]:
    """Stages on the first devices of ``tables`` with these layer counts per precision."""
    if form == "count":
        return tuple(
            StageAssignment(j, tuple(b for k, b in enumerate(tables.bits) for _ in range(c[k])))
            for j, c in enumerate(counts)
        )
    return best_arrangement(tables, list(enumerate(counts)))


def _gap_left(pairs: Sequence[_Pair], best: _Incumbent, options: SearchOptions) -> bool:
    return any(p.bound < best.objective * (1 - options.mip_rel_gap) for p in pairs)


def _refine(
    problem: PlanningProblem,
    pairs: Sequence[_Pair],
    best: _Incumbent,
    form: QualityForm,
    options: SearchOptions,
    clock: _Clock,
    tally: _Tally,
    report: _Reporter,
) -> None:
    """Fixed-order MILPs for the pairs whose bound still leaves a gap (module docstring)."""
    count = problem.cluster.count_pipeline_orders()
    exhaustive = count <= options.max_orders
    orders = problem.cluster.pipeline_orders() if exhaustive else []
    tally.refinement = (
        f"{count} device orders enumerated" if exhaustive else "refined on the chosen order"
    )
    position = {d.key: j for j, d in enumerate(problem.cluster.devices)}
    step = _Step(best, form, options, clock, tally, report)
    for pair in sorted(pairs, key=lambda p: p.bound):
        if pair.bound >= best.objective * (1 - options.mip_rel_gap):
            continue
        if clock.left() <= 0:
            tally.timed_out = True
            return
        if not exhaustive:
            if pair.placement is not None:
                used = pair.placement.order[: len(pair.placement.counts)]
                step.per_layer(pair.tables.reordered(used))
            continue
        chosen = (
            _first_covering(
                orders,
                pair.tables.reordered(pair.placement.order).devices[: len(pair.placement.counts)],
            )
            if pair.placement
            else None
        )
        bounds = []
        for k, order in enumerate(orders):
            if clock.left() <= 0:
                tally.timed_out = True
                return
            tables = pair.tables.reordered([position[d.key] for d in order])
            tally.orders += 1
            if k == chosen:  # the placement's own order: its free-form bound is the pair's
                bounds.append(step.per_layer(tables, pair.bound))
            else:
                bounds.append(step.bounded(tables))
        pair.bound = max(pair.bound, min(bounds, default=math.inf))


def _first_covering(
    orders: Sequence[tuple[DeviceSpec, ...]], used: Sequence[DeviceSpec]
) -> int | None:
    """The first order in which the used devices' types and hosts follow one another as they
    do in ``used`` (so ``used``'s plan is one of that order's plans)."""
    wanted = _class_runs(used)
    for k, order in enumerate(orders):
        runs, at = _class_runs(order), 0
        for key in runs:
            if at < len(wanted) and key == wanted[at]:
                at += 1
        if at == len(wanted):
            return k
    return None


def _class_runs(devices: Sequence[DeviceSpec]) -> list[tuple[object, ...]]:
    runs: list[tuple[object, ...]] = []
    for d in devices:
        if not runs or runs[-1] != d.class_key:
            runs.append(d.class_key)
    return runs


@dataclass
class _Step:
    """The MILPs of a refinement, all against the same incumbent, clock and tally."""

    best: _Incumbent
    form: QualityForm
    options: SearchOptions
    clock: _Clock
    tally: _Tally
    report: _Reporter

    def _solve_options(self) -> SolveOptions:
        o = self.options
        return SolveOptions(self.clock.left(), o.mip_rel_gap, self.best.cutoff(), o.verbose)

    def _beaten(self, bound: float) -> bool:
        return bound >= self.best.objective * (1 - self.options.mip_rel_gap)

    def bounded(self, tables: CostTables) -> float:
        """One fixed order in the count or free form (exact in the count form), then, per
        layer, solved exactly where that bound leaves room; returns the order's bound."""
        milp = PartitionMilp(tables, None, _interchangeable(tables.devices), quality=self.form)
        result = milp.solve(self._solve_options())
        self.report.milp(self.tally, extra=1)
        if result.stages is not None:
            self.best.offer(tables, result.stages)
        if not result.solved.finished:
            self.tally.timed_out = True
        if self.form == "count" or self._beaten(result.dual_bound):
            self.tally.pruned_orders += self.form != "count"
            return result.dual_bound
        return self.per_layer(tables, result.dual_bound)

    def per_layer(self, tables: CostTables, bound: float = -math.inf) -> float:
        """The exact per-layer MILP of one order; returns its bound (``bound`` when layers
        had to be grouped or time ran out first)."""
        if self.clock.left() <= 0:
            self.tally.timed_out = True
            return bound
        self.tally.refined_orders += 1
        group = _group_size(tables, self.options)
        self.tally.layer_group = max(self.tally.layer_group, group)
        units = LayerUnits.grouped(tables, group)
        exact = PartitionMilp(tables, units, _interchangeable(tables.devices))
        same = self.best.tables is not None and self.best.tables.devices == tables.devices
        result = exact.solve(self._solve_options(), self.best.stages if same else None)
        self.report.milp(self.tally, extra=1)
        if result.stages is not None:
            self.best.offer(tables, result.stages)
        if not result.solved.finished:
            self.tally.timed_out = True
        return max(bound, result.dual_bound) if group == 1 else bound


def _group_size(tables: CostTables, options: SearchOptions) -> int:
    per_unit = tables.num_devices * len(tables.bits)
    return max(1, math.ceil(tables.num_layers * per_unit / options.max_unit_binaries))


def _interchangeable(order: Sequence[DeviceSpec]) -> list[bool]:
    return [a.class_key == b.class_key for a, b in itertools.pairwise(order)] + [False]


def _summary(best: float, bound: float, target: float, timed_out: bool) -> tuple[str, float | None]:
    """Status and relative gap of the incumbent against the least bound."""
    if not math.isfinite(bound):
        if bound > 0:  # every pair cut off or infeasible: the incumbent is optimal
            return "optimal", 0.0
        return ("time limit, no bound" if timed_out else "no bound"), None
    gap = max(0.0, (best - bound) / best) if best > 0 else 0.0
    if gap <= target * (1 + 1e-6):
        return "optimal", gap
    return ("time limit" if timed_out else "feasible"), gap


def _order_search(problem: PlanningProblem, pairs: Sequence[_Pair], tally: _Tally) -> OrderSearch:
    hosts = len({d.host for d in problem.cluster.devices})
    method = "in the MILP" + (f", then {tally.refinement}" if tally.refinement else "")
    solved = sum(p.solved for p in pairs)
    note = (
        f"{hosts} host{'s' * (hosts != 1)} kept contiguous, their order chosen by the MILP; "
        f"{len(pairs)} micro-batch pairs: {solved} solved, {tally.pruned_pairs} pruned by their "
        "LP bound"
    )
    if tally.refinement:
        note += (
            f"; {tally.orders} fixed orders bounded, {tally.pruned_orders} pruned by their "
            f"count-form bound, {tally.refined_orders} solved per layer"
        )
    if tally.timed_out:
        note += "; stopped at the time limit"
    exhaustive = not tally.timed_out and "chosen order" not in tally.refinement
    return OrderSearch(method, exhaustive, note)


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
