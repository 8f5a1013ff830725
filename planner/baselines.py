"""Baseline planners, each scored by the same simulator as pqctl's own plan.

All use the cluster's device order, every device, and the decode micro-batch of LLM-PQ's
baselines (the divisor of the batch nearest ⌈B/N⌉ from above, so each device sees one
micro-batch per decode round).

- **uniform**: even layer split, one precision (the highest that fits every stage), prefill
  micro-batch picked by simulation among the divisors of the decode one.
- **pipeedge**: heterogeneity-aware split that minimises the slowest decode stage, one
  precision (the highest with a feasible split), prefill micro-batch = decode micro-batch.
- **adabits**: memory-driven mixed precision: a memory-proportional split, then in each stage
  the lowest Σω mix of precisions that fits; prefill micro-batch = decode micro-batch.
- **memory-proportional**: layers in proportion to device memory (as exo splits), one
  precision (the highest that fits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import Evaluation, StageAssignment, evaluate, stage_memory_bytes

BASELINE_NAMES = ("uniform", "pipeedge", "adabits", "memory-proportional")


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


def _fits(tables: CostTables, stages: Sequence[StageAssignment]) -> bool:
    ev = evaluate(tables, stages)
    return ev.fits_memory and all(
        tables.allowed(s.position, tables.bits.index(b)) for s in stages for b in s.layer_bits
    )


def _uniform_precision(
    tables: CostTables, counts: Sequence[int]
) -> tuple[StageAssignment, ...] | None:
    for bits in tables.bits:  # highest first
        stages = _uniform_stages(counts, bits)
        if _fits(tables, stages):
            return stages
    return None


def _scored(
    name: str, tables: CostTables, stages: tuple[StageAssignment, ...] | None, why: str
) -> BaselinePlan:
    if stages is None:
        return BaselinePlan(name, tables, None, None, why)
    return BaselinePlan(name, tables, stages, evaluate(tables, stages))


def uniform(problem: PlanningProblem) -> BaselinePlan:
    """Even split, one precision, prefill micro-batch chosen by simulation."""
    devices = problem.cluster.devices
    decode = decode_micro_batch(problem.workload.global_batch, len(devices))
    counts = _split(problem.model.num_layers, [1.0] * len(devices))
    best: BaselinePlan | None = None
    for prefill in (p for p in range(1, decode + 1) if decode % p == 0):
        tables = build_tables(problem, devices, prefill, decode)
        plan = _scored(
            "uniform",
            tables,
            _uniform_precision(tables, counts),
            "no single precision fits an even split",
        )
        if best is None or _better(plan, best):
            best = plan
    assert best is not None
    return best


def _better(a: BaselinePlan, b: BaselinePlan) -> bool:
    if a.evaluation is None:
        return False
    return b.evaluation is None or a.evaluation.objective < b.evaluation.objective


def memory_proportional(problem: PlanningProblem) -> BaselinePlan:
    """Layers in proportion to usable memory, one precision."""
    devices = problem.cluster.devices
    decode = decode_micro_batch(problem.workload.global_batch, len(devices))
    tables = build_tables(problem, devices, decode, decode)
    counts = _split(problem.model.num_layers, list(tables.capacity_bytes))
    if not any(counts):
        return _scored("memory-proportional", tables, None, "no device has usable memory")
    return _scored(
        "memory-proportional",
        tables,
        _uniform_precision(tables, counts),
        "no single precision fits a memory-proportional split",
    )


def pipeedge(problem: PlanningProblem) -> BaselinePlan:
    """Split minimising the slowest decode stage, at the highest precision that fits."""
    devices = problem.cluster.devices
    decode = decode_micro_batch(problem.workload.global_batch, len(devices))
    tables = build_tables(problem, devices, decode, decode)
    for k, bits in enumerate(tables.bits):
        counts = _min_bottleneck_split(tables, k)
        if counts is not None:
            stages = _uniform_stages(counts, bits)
            if _fits(tables, stages):
                return _scored("pipeedge", tables, stages, "")
    return _scored("pipeedge", tables, None, "no precision has a split that fits")


def _min_bottleneck_split(tables: CostTables, k: int) -> list[int] | None:
    """Layer counts minimising the slowest decode stage at precision column k, within memory,
    over every choice of first and last used device (they carry the embedding / LM head)."""
    if not np.all(np.isfinite(tables.layer_decode_s[:, k])):
        return None
    n = tables.num_devices
    found = [
        split
        for first in range(n)
        for last in range(first, n)
        if (split := _split_between(tables, k, first, last)) is not None
    ]
    return min(found, key=lambda f: f[0])[1] if found else None


def _split_between(
    tables: CostTables, k: int, first: int, last: int
) -> tuple[float, list[int]] | None:
    """Least-bottleneck split using devices first..last, both holding at least one layer.

    Tries bottleneck values in increasing order; at each, every device takes as many layers
    as time and memory allow.
    """
    num_layers, span = tables.num_layers, range(first, last + 1)
    if first != last and num_layers < 2:
        return None
    per_layer = tables.layer_decode_s[:, k]
    extra = {
        j: float(tables.embed_decode_s[j]) * (j == first)
        + float(tables.head_decode_s[j]) * (j == last)
        + float(tables.stage_decode_s[j])
        for j in span
    }
    room = {j: _layers_that_fit(tables, j, k, j == first, j == last) for j in span}
    bounds = sorted(
        {c * float(per_layer[j]) + extra[j] for j in span for c in range(1, num_layers + 1)}
    )
    for bound in bounds:
        limits = {
            j: min(room[j], math.floor((bound - extra[j]) / per_layer[j] + 1e-9)) for j in span
        }
        if (
            min(limits[first], limits[last]) >= 1
            and sum(max(0, x) for x in limits.values()) >= num_layers
        ):
            counts = [0] * tables.num_devices
            left = num_layers
            for j in span:
                keep = 1 if j < last else 0  # the last device must keep at least one layer
                counts[j] = left if j == last else max(0, min(limits[j], left - keep))
                left -= counts[j]
            return bound, counts
    return None


def _layers_that_fit(tables: CostTables, j: int, k: int, first: bool, last: bool) -> int:
    """How many layers at column k device j holds, with the pipeline ends it carries."""
    fixed = stage_memory_bytes(tables, StageAssignment(j, ()), first, last)
    per_layer = float(tables.layer_memory_bytes[j, k])
    if tables.slow_bits[j, k]:
        fixed += float(tables.dequant_scratch_bytes[j])
    return max(0, math.floor((float(tables.capacity_bytes[j]) - fixed) / per_layer))


def adabits(problem: PlanningProblem) -> BaselinePlan:
    """Memory-proportional split; per stage the lowest-Σω precision mix that fits."""
    devices = problem.cluster.devices
    decode = decode_micro_batch(problem.workload.global_batch, len(devices))
    tables = build_tables(problem, devices, decode, decode)
    counts = _split(problem.model.num_layers, list(tables.capacity_bytes))
    if not any(counts):
        return _scored("adabits", tables, None, "no device has usable memory")
    stages, start = [], 0
    for j, count in enumerate(counts):
        if count:
            last = start + count == problem.model.num_layers
            bits = _fit_stage(tables, j, start, count, first=start == 0, last=last)
            if bits is None:
                return _scored(
                    "adabits",
                    tables,
                    None,
                    f"stage on {devices[j].key} does not fit even at the lowest bits",
                )
            stages.append(StageAssignment(j, bits))
        start += count
    return _scored("adabits", tables, tuple(stages), "")


def _fit_stage(
    tables: CostTables, j: int, start: int, count: int, first: bool, last: bool
) -> tuple[int, ...] | None:
    """Greedily lower the precision of the layer with the least ω increase per byte saved
    until the stage fits its device."""
    allowed = [k for k in range(len(tables.bits)) if tables.allowed(j, k)]
    if not allowed:
        return None
    cols = [allowed[0]] * count
    while True:
        stage = StageAssignment(j, tuple(tables.bits[k] for k in cols))
        if stage_memory_bytes(tables, stage, first, last) <= tables.capacity_bytes[j]:
            return stage.layer_bits
        moves = [(i, allowed[allowed.index(k) + 1]) for i, k in enumerate(cols) if k != allowed[-1]]
        if not moves:
            return None
        i, k = min(moves, key=lambda m: _downgrade_cost(tables, j, start + m[0], cols[m[0]], m[1]))
        cols[i] = k


def _downgrade_cost(tables: CostTables, j: int, layer: int, k_from: int, k_to: int) -> float:
    d_omega = float(tables.omega[layer, k_to] - tables.omega[layer, k_from])
    saved = float(tables.layer_memory_bytes[j, k_from] - tables.layer_memory_bytes[j, k_to])
    return d_omega / saved if saved > 0 else math.inf


def all_baselines(problem: PlanningProblem) -> list[BaselinePlan]:
    """Every baseline of :data:`BASELINE_NAMES`, in that order."""
    return [uniform(problem), pipeedge(problem), adabits(problem), memory_proportional(problem)]
