"""Baseline planners, each scored by the same simulator as pqctl's own plan.

Each baseline uses the prefix of the cluster's devices, in the cluster's order, whose plan
scores best: for n = 1..N it applies its rule to the first n devices, with the decode
micro-batch of LLM-PQ's baselines for n devices (the divisor of the batch nearest ⌈B/n⌉ from
above, so each device sees one micro-batch per decode round), and keeps the plan of least
objective among those that fit in memory with allowed precisions. When no prefix has a plan,
the result is the whole cluster's, with its reason. A plan records the tables of its
micro-batch pair over every device of the cluster (its stages sit on the prefix's positions;
unused devices change nothing in the score).

The rule of each baseline, on a list of devices:

- **uniform**: even layer split, one precision (the highest that fits every stage), prefill
  micro-batch picked by simulation among the divisors of the decode one.
- **pipeedge**: heterogeneity-aware split that minimises the slowest decode stage, the first
  device holding the embedding and the last the LM head; one precision (the highest with a
  feasible split), prefill micro-batch = decode micro-batch.
- **adabits**: memory-driven mixed precision: a memory-proportional split, then in each stage
  the lowest Σω mix of precisions that fits; prefill micro-batch = decode micro-batch.
- **memory-proportional**: layers in proportion to device memory (as exo splits), one
  precision (the highest that fits).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import Evaluation, StageAssignment, evaluate, stage_memory_bytes

BASELINE_NAMES = ("uniform", "pipeedge", "adabits", "memory-proportional")

_SLACK_BYTES = 1.0
"""Memory pre-checks reject only what overflows by more than this; the simulator decides the
rest, so float rounding in a pre-check never changes a plan."""


@dataclass(frozen=True)
class BaselinePlan:
    """A baseline's plan and score, or the reason it has none."""

    name: str
    tables: CostTables | None
    stages: tuple[StageAssignment, ...] | None
    evaluation: Evaluation | None
    reason: str = ""


def decode_micro_batch(global_batch: int, num_devices: int) -> int:
    """Smallest divisor of the batch that is at least ⌈B / N⌉."""
    target = math.ceil(global_batch / num_devices)
    return min(d for d in range(target, global_batch + 1) if global_batch % d == 0)


class _Cluster:
    """A problem's cost tables, built once per micro-batch pair and shared by every prefix and
    baseline. The rules read tables over the devices that a decode micro-batch's prefixes
    reach (the first n of them, n the longest prefix with that decode micro-batch); a plan is
    recorded on the tables over every device (no cost of a device or a pair of devices depends
    on the devices after them)."""

    def __init__(self, problem: PlanningProblem) -> None:
        self.problem = problem
        self.num_layers = problem.model.num_layers
        self.num_devices = len(problem.cluster.devices)
        self._reach: dict[int, int] = {}
        for n in range(1, self.num_devices + 1):  # the longest prefix last
            self._reach[self.decode_micro_batch(n)] = n
        self._tables: dict[tuple[int, int, int], CostTables] = {}

    def decode_micro_batch(self, n: int) -> int:
        return decode_micro_batch(self.problem.workload.global_batch, n)

    def tables(self, prefill: int, decode: int) -> CostTables:
        """Tables over the first devices, as many as the prefixes with this decode reach."""
        return self._build(prefill, decode, self._reach.get(decode, self.num_devices))

    def full_tables(self, prefill: int, decode: int) -> CostTables:
        """Tables over every device of the cluster."""
        return self._build(prefill, decode, self.num_devices)

    def _build(self, prefill: int, decode: int, n: int) -> CostTables:
        key = (prefill, decode, n)
        if key not in self._tables:
            devices = self.problem.cluster.devices[:n]
            self._tables[key] = build_tables(self.problem, devices, prefill, decode)
        return self._tables[key]

    def recorded(self, plan: BaselinePlan) -> BaselinePlan:
        """The plan on the tables of its micro-batch pair over every device."""
        assert plan.tables is not None
        tables = self.full_tables(plan.tables.prefill_micro_batch, plan.tables.decode_micro_batch)
        if tables is plan.tables:
            return plan
        ev = None if plan.stages is None else evaluate(tables, plan.stages)
        return BaselinePlan(plan.name, tables, plan.stages, ev, plan.reason)


_Rule = Callable[[_Cluster, int], BaselinePlan]
"""A baseline's rule applied to the first n devices of the cluster."""


def _best_prefix(cluster: _Cluster, rule: _Rule, num_devices: int | None) -> BaselinePlan:
    """The rule on the first ``num_devices`` devices; None: on the prefix that scores best."""
    if num_devices is not None:
        if not 1 <= num_devices <= cluster.num_devices:
            raise ValueError(f"num_devices {num_devices} outside 1..{cluster.num_devices}")
        return cluster.recorded(rule(cluster, num_devices))
    best: BaselinePlan | None = None
    plan = None
    for n in range(1, cluster.num_devices + 1):
        plan = rule(cluster, n)
        if _better(plan, best):
            best = plan
    assert plan is not None, "the cluster has no devices"
    return cluster.recorded(best if best is not None else plan)  # none: the whole cluster's


def _better(a: BaselinePlan, b: BaselinePlan | None) -> bool:
    """Whether ``a`` has a plan that fits and scores below ``b``'s (if any)."""
    if a.evaluation is None or not a.evaluation.fits_memory:
        return False
    return b is None or b.evaluation is None or a.evaluation.objective < b.evaluation.objective


def _split(num_layers: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder split of the layers in proportion to ``weights`` (all zero: none)."""
    total = sum(weights)
    if total <= 0:
        return [0] * len(weights)
    exact = [num_layers * w / total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda j: counts[j] - exact[j])
    for j in by_remainder[: num_layers - sum(counts)]:
        counts[j] += 1
    return counts


def _uniform_stages(counts: Sequence[int], bits: int) -> tuple[StageAssignment, ...]:
    return tuple(StageAssignment(j, (bits,) * c) for j, c in enumerate(counts) if c > 0)


def _uniform_precision(name: str, tables: CostTables, counts: Sequence[int]) -> BaselinePlan:
    """The split at the highest single precision that fits (and is allowed) on every stage."""
    for k, bits in enumerate(tables.bits):  # highest first
        if _may_fit_uniform(tables, counts, k):
            stages = _uniform_stages(counts, bits)
            ev = evaluate(tables, stages)
            if ev.fits_memory:
                return BaselinePlan(name, tables, stages, ev)
    return BaselinePlan(name, tables, None, None)


def _may_fit_uniform(tables: CostTables, counts: Sequence[int], k: int) -> bool:
    """Every used device may run column k, and no stage overflows its device by more than
    the slack (the same terms as :func:`stage_memory_bytes`, for all stages at once)."""
    layers = np.asarray(counts, dtype=float)
    used = np.flatnonzero(layers)
    if not all(tables.allowed(int(j), k) for j in used):
        return False
    first, last = int(used[0]), int(used[-1])
    memory = (
        layers[used] * tables.layer_memory_bytes[used, k]
        + tables.activation_bytes[used]
        + np.where(tables.slow_bits[used, k], tables.dequant_scratch_bytes[used], 0.0)
    )
    memory[0] += tables.embedding_bytes[first]
    memory[-1] += tables.head_bytes[last]
    if first == last:
        memory[0] -= tables.tied_saving_bytes[first]
    return bool(np.all(memory <= tables.capacity_bytes[used] + _SLACK_BYTES))


# --------------------------------------------------------------------------- uniform


def uniform(problem: PlanningProblem, num_devices: int | None = None) -> BaselinePlan:
    """Even split, one precision, prefill micro-batch chosen by simulation.

    Args:
        problem: the planning problem.
        num_devices: apply the rule to exactly the cluster's first ``num_devices`` devices;
            None: to the prefix whose plan scores best.
    """
    return _best_prefix(_Cluster(problem), _uniform_on, num_devices)


def _uniform_on(cluster: _Cluster, n: int) -> BaselinePlan:
    decode = cluster.decode_micro_batch(n)
    counts = _split(cluster.num_layers, [1.0] * n)
    best: BaselinePlan | None = None
    for prefill in (p for p in range(1, decode + 1) if decode % p == 0):
        plan = _uniform_precision("uniform", cluster.tables(prefill, decode), counts)
        if best is None or _better(plan, best):
            best = plan
    assert best is not None
    if best.stages is None:
        return _failed(best, "no single precision fits an even split")
    return best


def _failed(plan: BaselinePlan, reason: str) -> BaselinePlan:
    return BaselinePlan(plan.name, plan.tables, None, None, reason)


# --------------------------------------------------------------------------- memory-proportional


def memory_proportional(problem: PlanningProblem, num_devices: int | None = None) -> BaselinePlan:
    """Layers in proportion to usable memory, one precision.

    Args:
        problem: the planning problem.
        num_devices: apply the rule to exactly the cluster's first ``num_devices`` devices;
            None: to the prefix whose plan scores best.
    """
    return _best_prefix(_Cluster(problem), _memory_proportional_on, num_devices)


def _memory_proportional_on(cluster: _Cluster, n: int) -> BaselinePlan:
    name = "memory-proportional"
    decode = cluster.decode_micro_batch(n)
    tables = cluster.tables(decode, decode)
    counts = _split(cluster.num_layers, [float(c) for c in tables.capacity_bytes[:n]])
    if not any(counts):
        return BaselinePlan(name, tables, None, None, "no device has usable memory")
    plan = _uniform_precision(name, tables, counts)
    if plan.stages is None:
        return _failed(plan, "no single precision fits a memory-proportional split")
    return plan


# --------------------------------------------------------------------------- pipeedge


def pipeedge(problem: PlanningProblem, num_devices: int | None = None) -> BaselinePlan:
    """Split minimising the slowest decode stage, at the highest precision that fits.

    Args:
        problem: the planning problem.
        num_devices: apply the rule to exactly the cluster's first ``num_devices`` devices
            (the first holds the embedding, the last the LM head); None: to the prefix whose
            plan scores best.
    """
    return _best_prefix(_Cluster(problem), _pipeedge_on, num_devices)


def _pipeedge_on(cluster: _Cluster, n: int) -> BaselinePlan:
    decode = cluster.decode_micro_batch(n)
    tables = cluster.tables(decode, decode)
    for k, bits in enumerate(tables.bits):
        counts = _min_bottleneck_split(tables, k, n)
        if counts is not None and _may_fit_uniform(tables, counts, k):
            stages = _uniform_stages(counts, bits)
            ev = evaluate(tables, stages)
            if ev.fits_memory:
                return BaselinePlan("pipeedge", tables, stages, ev)
    return BaselinePlan("pipeedge", tables, None, None, "no precision has a split that fits")


def _min_bottleneck_split(tables: CostTables, k: int, n: int) -> list[int] | None:
    """Layer counts over devices 0..n-1 minimising the slowest decode stage at column k within
    memory, device 0 and device n-1 holding at least one layer (they carry the embedding and
    the LM head).

    The least bottleneck is one of the values "c layers on device j" (c = 1..L); feasibility
    only grows with the bound, so a binary search over them finds the least feasible one.
    At that bound every device takes as many layers as time and memory allow.
    """
    num_layers = tables.num_layers
    per_layer = tables.layer_decode_s[:n, k]
    if (n > 1 and num_layers < 2) or not np.all(np.isfinite(per_layer)):
        return None
    ends = np.zeros((2, n), dtype=bool)
    ends[0, 0] = ends[1, n - 1] = True  # first, last
    extra = (
        tables.embed_decode_s[:n] * ends[0] + tables.head_decode_s[:n] * ends[1]
    ) + tables.stage_decode_s[:n]
    room = _layers_that_fit(tables, k, n, ends)
    bounds = np.sort(
        (np.arange(1, num_layers + 1, dtype=float)[None, :] * per_layer[:, None]
         + extra[:, None]).ravel()
    )  # fmt: skip

    def limits(bound: float) -> np.ndarray:
        return np.asarray(np.minimum(room, np.floor((bound - extra) / per_layer + 1e-9)))

    def feasible(i: int) -> bool:
        x = limits(float(bounds[i]))
        return bool(min(x[0], x[-1]) >= 1 and np.maximum(x, 0).sum() >= num_layers)

    i = bisect.bisect_left(range(len(bounds)), True, key=feasible)
    if i == len(bounds):
        return None
    return _greedy_counts(limits(float(bounds[i])), num_layers)


def _greedy_counts(limits: np.ndarray, num_layers: int) -> list[int]:
    """Each device in turn takes as many layers as its limit allows, the last one the rest
    (every device before it leaves at least one layer for it)."""
    n = len(limits)
    counts, left = [0] * n, num_layers
    for j in range(n - 1):
        counts[j] = max(0, min(int(limits[j]), left - 1))
        left -= counts[j]
    counts[n - 1] = left
    return counts


def _layers_that_fit(tables: CostTables, k: int, n: int, ends: np.ndarray) -> np.ndarray:
    """How many layers at column k each of devices 0..n-1 holds with the pipeline ends it
    carries (``ends``: first and last flags), by the terms of :func:`stage_memory_bytes`."""
    fixed = (
        tables.activation_bytes[:n]
        + np.where(ends[0], tables.embedding_bytes[:n], 0.0)
        + np.where(ends[1], tables.head_bytes[:n], 0.0)
        - np.where(ends[0] & ends[1], tables.tied_saving_bytes[:n], 0.0)
    ) + np.where(tables.slow_bits[:n, k], tables.dequant_scratch_bytes[:n], 0.0)
    room = np.floor((tables.capacity_bytes[:n] - fixed) / tables.layer_memory_bytes[:n, k])
    return np.asarray(np.maximum(room, 0.0))


# --------------------------------------------------------------------------- adabits


def adabits(problem: PlanningProblem, num_devices: int | None = None) -> BaselinePlan:
    """Memory-proportional split; per stage the lowest-Σω precision mix that fits.

    Args:
        problem: the planning problem.
        num_devices: apply the rule to exactly the cluster's first ``num_devices`` devices;
            None: to the prefix whose plan scores best.
    """
    return _best_prefix(_Cluster(problem), _adabits_on, num_devices)


def _adabits_on(cluster: _Cluster, n: int) -> BaselinePlan:
    decode = cluster.decode_micro_batch(n)
    tables = cluster.tables(decode, decode)
    num_layers = cluster.num_layers
    counts = _split(num_layers, [float(c) for c in tables.capacity_bytes[:n]])
    if not any(counts):
        return BaselinePlan("adabits", tables, None, None, "no device has usable memory")
    stages, start = [], 0
    for j, count in enumerate(counts):
        if count:
            last = start + count == num_layers
            bits = _fit_stage(tables, j, start, count, first=start == 0, last=last)
            if bits is None:
                why = f"stage on {tables.devices[j].key} does not fit even at the lowest bits"
                return BaselinePlan("adabits", tables, None, None, why)
            stages.append(StageAssignment(j, bits))
        start += count
    return BaselinePlan("adabits", tables, tuple(stages), evaluate(tables, stages))


def _fit_stage(
    tables: CostTables, j: int, start: int, count: int, first: bool, last: bool
) -> tuple[int, ...] | None:
    """Greedily lower the precision of the layer with the least ω increase per byte saved
    (the earliest such layer on a tie) until the stage fits its device."""
    allowed = [k for k in range(len(tables.bits)) if tables.allowed(j, k)]
    if not allowed:
        return None
    lower = dict(itertools.pairwise(allowed))  # column → next lower allowed one
    layer_bytes = [float(x) for x in tables.layer_memory_bytes[j]]
    fixed = stage_memory_bytes(tables, StageAssignment(j, ()), first, last)
    capacity = float(tables.capacity_bytes[j]) + _SLACK_BYTES
    if count * min(layer_bytes[k] for k in allowed) + fixed > capacity:
        return None  # not even every layer at its smallest fits
    cols = [allowed[0]] * count
    weights, slow = count * layer_bytes[allowed[0]], count * int(tables.slow_bits[j, allowed[0]])
    moves = [(_downgrade_cost(tables, j, start + i, cols[i], lower[cols[i]]), i) for i in
             range(count) if cols[i] in lower]  # fmt: skip
    heapq.heapify(moves)  # (cost, layer): the least cost, then the earliest layer
    scratch = float(tables.dequant_scratch_bytes[j])
    while True:
        if weights + fixed + scratch * (slow > 0) <= capacity:
            stage = StageAssignment(j, tuple(tables.bits[k] for k in cols))
            if stage_memory_bytes(tables, stage, first, last) <= tables.capacity_bytes[j]:
                return stage.layer_bits
        if not moves:
            return None
        _, i = heapq.heappop(moves)
        k_from, k_to = cols[i], lower[cols[i]]
        weights += layer_bytes[k_to] - layer_bytes[k_from]
        slow += int(tables.slow_bits[j, k_to]) - int(tables.slow_bits[j, k_from])
        cols[i] = k_to
        if k_to in lower:
            heapq.heappush(moves, (_downgrade_cost(tables, j, start + i, k_to, lower[k_to]), i))


def _downgrade_cost(tables: CostTables, j: int, layer: int, k_from: int, k_to: int) -> float:
    d_omega = float(tables.omega[layer, k_to] - tables.omega[layer, k_from])
    saved = float(tables.layer_memory_bytes[j, k_from] - tables.layer_memory_bytes[j, k_to])
    return d_omega / saved if saved > 0 else math.inf


def all_baselines(problem: PlanningProblem) -> list[BaselinePlan]:
    """Every baseline of :data:`BASELINE_NAMES`, in that order, each on its best prefix."""
    cluster = _Cluster(problem)
    rules = (_uniform_on, _pipeedge_on, _adabits_on, _memory_proportional_on)
    return [_best_prefix(cluster, rule, None) for rule in rules]
