"""The search: one order-free MILP per (prefill, decode) micro-batch pair, then, where the
relaxation leaves a gap, MILPs over fixed device orders.

1. Baselines. The best one that meets the quality budget is the first incumbent; its objective
   is the cutoff of every MILP that follows.
2. Placement (:mod:`planner.placement_milp`): the device order is chosen inside the MILP, over
   every order that keeps a host's devices together. Pairs are solved in order of their LP
   bound; once the next bound cannot beat the incumbent by more than the gap, the rest are
   pruned. With every layer scoring alike (count form) this is exact where the hop model is
   (links alike between hosts, one device type per host); otherwise its optimum is a lower
   bound and its decoded plan an incumbent. With per-layer ω the placement models Σω by its
   convex envelope in the number of layers at each precision (:mod:`planner.milp`, a bound
   that proves pairs infeasible under the cutoff several times faster than a per-layer choice
   of precisions); each placement's stages are turned into per-layer plans by a MILP with
   their sizes fixed, then one layer at a time is moved across a stage boundary while that
   helps.
3. Refinement, for a pair whose bound still leaves a gap (per-layer ω, or mixed hosts), right
   after its placement: every pipeline order when there are at most ``max_orders``
   (exhaustive), else the order the placement chose; per order, the count / envelope MILP
   bounds it, and in the per-layer form the exact per-layer MILP follows only where that bound
   leaves room. The exact MILPs run on a second thread (HiGHS solves without holding the
   interpreter), beside the placements and bounds that follow; an improved incumbent from
   either side cuts off the MILPs the other starts next.

Every step counts against ``time_limit_s`` (baselines and LP bounds too). The reported gap is
the incumbent against the least bound over every pair (an LP bound, a MILP's dual bound, or
the least over an exhaustive set of orders); with no bound at all for some pair the status
says so. ``docs/planner.md`` has the long version.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property

from planner.arrangement import best_arrangement
from planner.baselines import BaselinePlan, all_baselines
from planner.cluster import DeviceSpec
from planner.diagnose import why_infeasible
from planner.errors import InfeasiblePlanError, SolveCancelledError
from planner.highs_model import SolveOptions
from planner.milp import QualityForm
from planner.partition_milp import LayerUnits, PartitionMilp
from planner.placement_milp import Placement, PlacementMilp
from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import Evaluation, StageAssignment, evaluate

ProgressFn = Callable[[int, int], None]
"""Called as progress(done, total) after each MILP."""

_COLUMNS_BUILT_PER_S = 50_000
"""About how many MILP columns (with their rows) Python builds per second here: a per-layer
MILP is only built when the time left would cover twice its building."""


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
        cancel: once set (from another thread), the search stops and raises
            SolveCancelledError: HiGHS is interrupted at its next interrupt check, usually
            within a tenth of a second; its sub-MIP heuristics check none, so the root node of
            a large MILP can run on for a few seconds (the dashboard, which must stop within a
            second, also kills the process it searches in).
    """

    time_limit_s: float = 60.0
    mip_rel_gap: float = 1e-4
    max_unit_binaries: int = 4000
    max_orders: int = 24
    verbose: bool = False
    cancel: threading.Event | None = None


@dataclass(frozen=True)
class OrderSearch:
    """How device orders were searched: ``method`` ("in the MILP", possibly followed by
    ", then N device orders enumerated" or ", then refined on the chosen order"), whether every
    order was solved or pruned by a proven bound (``exhaustive``), and a note naming what was
    pruned and by what."""

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


def search(
    problem: PlanningProblem,
    options: SearchOptions | None = None,
    progress: ProgressFn | None = None,
) -> SearchResult:
    """Find the plan of least objective; raises InfeasiblePlanError when none exists."""
    return _Search(problem, options or SearchOptions(), progress).run()


@dataclass
class _Pair:
    """One micro-batch pair: its tables in the cluster's order, its placement MILP, the best
    lower bound known for it (-inf: none yet), and while refined, the exact per-layer MILPs
    under way (each gives an order's bound) and the least bound of the other orders."""

    tables: CostTables
    milp: PlacementMilp
    bound: float
    placement: Placement | None = None
    solved: bool = False
    exact: list[Future[float]] = field(default_factory=list)
    bounded: float = -math.inf
    chosen: int | None = None


@dataclass
class _Tally:
    """What the search did, for the plan's solver report."""

    milps: int = 0
    orders: int = 0
    pruned_pairs: int = 0
    refined_orders: int = 0
    pruned_orders: int = 0
    timed_out: bool = False
    refinement: str = ""
    layer_group: int = 1


@dataclass
class _Search:
    """One search's state: the problem, the incumbent, the clock and the tally."""

    problem: PlanningProblem
    options: SearchOptions
    progress: ProgressFn | None
    started: float = field(default_factory=time.perf_counter)
    tables: CostTables | None = None
    stages: tuple[StageAssignment, ...] | None = None
    objective: float = math.inf
    tally: _Tally = field(default_factory=_Tally)
    total: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    pool: ThreadPoolExecutor | None = None

    def run(self) -> SearchResult:
        problem = self.problem
        if not problem.cluster.devices:
            raise InfeasiblePlanError("the cluster has no devices (all excluded?)")
        baselines = tuple(all_baselines(problem))
        for b in baselines:
            if b.tables is not None and b.stages is not None:
                self.offer(b.tables, b.stages)
        form: QualityForm = "count" if problem.indicator.layers_alike else "envelope"
        pairs = self._ranked_pairs(form)
        self.total = len(pairs)
        with self._exact_solver():
            self._place(pairs, form)
            if self._orders_enumerable:
                for pair in sorted(pairs, key=lambda p: p.bound):
                    if pair.solved and not self._beaten(pair.bound) and not self.tally.timed_out:
                        self._bound_other_orders(pair, form)
        self._check_cancelled()  # an interrupted MILP proves nothing
        for pair in pairs:
            exact = min((f.result() for f in pair.exact), default=math.inf)
            pair.bound = max(pair.bound, min(pair.bounded, exact))
        if self.tables is None or self.stages is None:
            if self.tally.timed_out:
                raise InfeasiblePlanError(
                    f"no plan found within --time-limit {self.options.time_limit_s:g} s; raise it"
                )
            raise InfeasiblePlanError(why_infeasible(problem))
        bound = min((p.bound for p in pairs), default=-math.inf)
        if len(pairs) < len(problem.micro_batch_choices()):
            bound = -math.inf
        status, gap = _summary(self.objective, bound, self.options.mip_rel_gap, self.tally)
        return SearchResult(
            tables=self.tables,
            stages=self.stages,
            evaluation=evaluate(self.tables, self.stages),
            status=status,
            mip_gap=gap,
            bound=bound,
            time_s=time.perf_counter() - self.started,
            milps_solved=self.tally.milps,
            orders_tried=self.tally.orders,
            formulation="count" if form == "count" else "per-layer",
            layer_group_size=self.tally.layer_group,
            order_search=_order_search(problem, pairs, self.tally),
            baselines=baselines,
        )

    # ------------------------------------------------------------ incumbent, clock, options

    def offer(self, tables: CostTables, stages: tuple[StageAssignment, ...]) -> bool:
        """Keep ``stages`` if it is feasible and better than the incumbent; says whether."""
        ev = evaluate(tables, stages)
        allowed = all(
            tables.allowed(s.position, tables.bits.index(b)) for s in stages for b in s.layer_bits
        )
        with self.lock:
            if allowed and ev.feasible and ev.objective < self.objective:
                self.tables, self.stages, self.objective = tables, stages, ev.objective
                return True
        return False

    @contextmanager
    def _exact_solver(self) -> Iterator[None]:
        """A second thread for the exact per-layer MILPs, which HiGHS solves without holding
        the interpreter: they run beside the placements and bounds of the search's own thread,
        and are waited for on the way out."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pqctl-exact") as pool:
            self.pool = pool
            try:
                yield
            finally:
                self.pool = None

    @cached_property
    def _orders_enumerable(self) -> bool:
        """Few enough pipeline orders that a refinement enumerates them all."""
        return self.problem.cluster.count_pipeline_orders() <= self.options.max_orders

    def _beaten(self, bound: float) -> bool:
        """Nothing at or above ``bound`` can beat the incumbent by more than the gap."""
        return bound >= self.objective * (1 - self.options.mip_rel_gap)

    def _check_cancelled(self) -> None:
        if self.options.cancel is not None and self.options.cancel.is_set():
            raise SolveCancelledError("the solve was cancelled")

    def _left(self) -> float:
        """Seconds left of the time limit; raises SolveCancelledError once cancelled."""
        self._check_cancelled()
        left = self.options.time_limit_s - (time.perf_counter() - self.started)
        if left <= 0:
            self.tally.timed_out = True
        return left

    def _solve_options(self) -> SolveOptions:
        """HiGHS checks its clock between steps and can run a few tenths of a second past its
        limit on a large model: it gets the time left less a margin for that."""
        o, left = self.options, self._left()
        limit = max(left * 0.95 - 0.05, 1e-3)
        return SolveOptions(limit, o.mip_rel_gap, self.objective * (1 + 1e-9), o.verbose, o.cancel)

    def _solved(self, extra: int = 0, finished: bool = True) -> None:
        with self.lock:
            self.tally.milps += 1
            self.tally.timed_out |= not finished
            self.total = max(self.total + extra, self.tally.milps)
            done, total = self.tally.milps, self.total
        if self.progress is not None:
            self.progress(done, total)

    # ---------------------------------------------------------------- placement

    def _ranked_pairs(self, form: QualityForm) -> list[_Pair]:
        """Every micro-batch pair with its LP bound, lowest first (pairs left when time runs
        out have no bound)."""
        pairs = []
        for prefill, decode in self.problem.micro_batch_choices():
            if self._left() <= 0:
                break
            tables = build_tables(self.problem, self.problem.cluster.devices, prefill, decode)
            milp = PlacementMilp(tables, form)
            pairs.append(_Pair(tables, milp, milp.relaxation_bound()))
        return sorted(pairs, key=lambda p: p.bound)

    def _place(self, pairs: Sequence[_Pair], form: QualityForm) -> None:
        for pair in pairs:
            if self._beaten(pair.bound):
                self.tally.pruned_pairs += 1
                continue
            if self._left() <= 0:
                return
            result = pair.milp.solve(self._solve_options())
            self._solved(finished=result.solved.finished)
            pair.bound = max(pair.bound, result.solved.dual_bound)
            pair.solved = True
            if result.placement is not None:
                pair.placement = result.placement
                tables = pair.tables.reordered(result.placement.order)
                self.offer(tables, _stages(tables, result.placement.counts, form))
                if form != "count":
                    self._fit_ranges(pair.tables, result.placement)
            if not self._beaten(pair.bound) and not self.tally.timed_out:
                self._refine_chosen(pair)

    def _fit_ranges(self, tables: CostTables, placement: Placement) -> None:
        """Per-layer plans on the placement's devices: the precisions chosen again layer by
        layer within each stage (an exact MILP once the stage sizes are fixed), starting from
        the placement's sizes, then moving one layer across a stage boundary while that
        helps."""
        used = tables.reordered(placement.order[: len(placement.counts)])
        interchangeable = _interchangeable(used.devices)

        def improves(sizes: list[int]) -> bool:
            if self._left() <= 0:
                return False
            milp = PartitionMilp(used, None, interchangeable, "free", sizes)
            result = milp.solve(self._solve_options())
            self._solved(extra=1, finished=result.solved.finished)
            return result.stages is not None and self.offer(used, result.stages)

        sizes = [sum(c) for c in placement.counts]
        moved = improves(sizes) and not self._orders_enumerable
        while moved:  # with few orders, the exact per-layer refinement searches the sizes
            moved = False
            for b, step in itertools.product(range(len(sizes) - 1), (1, -1)):
                trial = list(sizes)
                trial[b] -= step
                trial[b + 1] += step
                if min(trial[b], trial[b + 1]) >= 1 and improves(trial):
                    sizes, moved = trial, True

    # ---------------------------------------------------------------- refinement

    def _refine_chosen(self, pair: _Pair) -> None:
        """The exact per-layer MILP of the order the pair's placement chose, queued on the
        second thread right after the placement, while the search goes on placing pairs."""
        if pair.placement is None:
            return
        cluster = self.problem.cluster
        if not self._orders_enumerable:
            self.tally.refinement = "refined on the chosen order"
            used = pair.placement.order[: len(pair.placement.counts)]
            self._per_layer_later(pair, pair.tables.reordered(used), -math.inf)
            return
        self.tally.refinement = f"{len(self._orders)} device orders enumerated"
        first = pair.placement.order[: len(pair.placement.counts)]
        pair.chosen = _first_covering(self._orders, [cluster.devices[j] for j in first])
        if pair.chosen is not None:
            self.tally.orders += 1
            tables = self._in_order(pair, self._orders[pair.chosen])
            self._per_layer_later(pair, tables, pair.bound)  # the pair's bound: that order's

    def _bound_other_orders(self, pair: _Pair, form: QualityForm) -> None:
        """Every other pipeline order of a pair bounded on its own (solved per layer later
        where that bound leaves room); the least of them is kept once every order has one."""
        bounds = []
        for k, order in enumerate(self._orders):
            if k == pair.chosen:
                continue
            if self._left() <= 0:
                return
            self.tally.orders += 1
            bounds.append(self._bounded(pair, self._in_order(pair, order), form))
        pair.bounded = min(bounds, default=math.inf)

    @cached_property
    def _orders(self) -> list[tuple[DeviceSpec, ...]]:
        """Every pipeline order of the cluster, once (a pair's chosen order is an index here)."""
        return self.problem.cluster.pipeline_orders()

    @cached_property
    def _position(self) -> dict[str, int]:
        return {d.key: j for j, d in enumerate(self.problem.cluster.devices)}

    def _in_order(self, pair: _Pair, order: Sequence[DeviceSpec]) -> CostTables:
        return pair.tables.reordered([self._position[d.key] for d in order])

    def _bounded(self, pair: _Pair, tables: CostTables, form: QualityForm) -> float:
        """One fixed order in the count or envelope form (exact in the count form); per layer,
        where that bound leaves room, the order is solved exactly later. Returns the bound
        known now."""
        milp = PartitionMilp(tables, None, _interchangeable(tables.devices), quality=form)
        result = milp.solve(self._solve_options())
        self._solved(extra=1, finished=result.solved.finished)
        if result.stages is not None:
            self.offer(tables, result.stages)
        if form == "count" or self._beaten(result.dual_bound):
            self.tally.pruned_orders += form != "count"
            return result.dual_bound
        self._per_layer_later(pair, tables, result.dual_bound)
        return math.inf

    def _per_layer_later(self, pair: _Pair, tables: CostTables, bound: float) -> None:
        """Queue the exact per-layer MILP of one order on the second thread."""
        assert self.pool is not None
        pair.exact.append(self.pool.submit(self._per_layer, tables, bound))

    def _per_layer(self, tables: CostTables, bound: float = -math.inf) -> float:
        """The exact per-layer MILP of one order; returns its bound (``bound`` when layers
        had to be grouped, or when there is no time to build and solve it)."""
        group = _group_size(tables, self.options)
        units = LayerUnits.grouped(tables, group)
        columns = len(units.sizes) * tables.num_devices * (len(tables.bits) + 1)
        if self._beaten(bound):  # the incumbent improved while this waited
            with self.lock:
                self.tally.pruned_orders += 1
            return bound
        if self._left() < 2 * columns / _COLUMNS_BUILT_PER_S:
            self.tally.timed_out = True
            return bound
        with self.lock:
            self.tally.refined_orders += 1
            self.tally.layer_group = max(self.tally.layer_group, group)
            same = self.tables is not None and self.tables.devices == tables.devices
            warm = self.stages if same else None
        exact = PartitionMilp(tables, units, _interchangeable(tables.devices))
        result = exact.solve(self._solve_options(), warm)
        self._solved(extra=1, finished=result.solved.finished)
        if result.stages is not None:
            self.offer(tables, result.stages)
        return max(bound, result.dual_bound) if group == 1 else bound


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


def _first_covering(
    orders: Sequence[tuple[DeviceSpec, ...]], used: Sequence[DeviceSpec]
) -> int | None:
    """The first order in which the used devices' types and hosts follow one another as they
    do in ``used`` (so ``used``'s plan is one of that order's plans)."""
    wanted = _class_runs(used)
    for k, order in enumerate(orders):
        at = 0
        for key in _class_runs(order):
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


def _group_size(tables: CostTables, options: SearchOptions) -> int:
    per_unit = tables.num_devices * len(tables.bits)
    return max(1, math.ceil(tables.num_layers * per_unit / options.max_unit_binaries))


def _interchangeable(order: Sequence[DeviceSpec]) -> list[bool]:
    return [a.class_key == b.class_key for a, b in itertools.pairwise(order)] + [False]


def _summary(best: float, bound: float, target: float, tally: _Tally) -> tuple[str, float | None]:
    """Status and relative gap of the incumbent against the least bound."""
    if not math.isfinite(bound):
        if bound > 0:  # every pair cut off or infeasible: the incumbent is optimal
            return "optimal", 0.0
        return "time limit, no bound", None
    gap = max(0.0, (best - bound) / best) if best > 0 else 0.0
    if gap <= target * (1 + 1e-6):
        return "optimal", gap
    return ("time limit" if tally.timed_out else "feasible"), gap


def _order_search(problem: PlanningProblem, pairs: Sequence[_Pair], tally: _Tally) -> OrderSearch:
    hosts = len({d.host for d in problem.cluster.devices})
    method = "in the MILP" + (f", then {tally.refinement}" if tally.refinement else "")
    solved = sum(p.solved for p in pairs)
    hosts_text = (
        f"{hosts} hosts kept contiguous, their order chosen by the solver"
        if hosts > 1
        else "one host"
    )
    note = (
        f"{hosts_text}; {len(pairs)} pairs of micro-batch sizes: {solved} solved in full, "
        f"{tally.pruned_pairs} ruled out by a bound"
    )
    if tally.refinement:
        note += (
            f"; {tally.orders} fixed device orders bounded, {tally.pruned_orders} ruled out by "
            f"that bound, {tally.refined_orders} solved layer by layer"
        )
    if tally.timed_out:
        note += "; stopped at the time limit"
    exhaustive = not tally.timed_out and "chosen order" not in tally.refinement
    return OrderSearch(method, exhaustive, note)
