"""Arranging each stage's precisions over its own layers for least Σω.

Latency and memory depend only on how many layers of each precision a stage holds; Σω also
depends on which of its layers get which precision. Within one stage that choice is a
transportation problem (layers × precisions) whose LP has integral vertices, so the simplex
answer is an exact assignment.
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.highs_model import SparseModel
from planner.problem import CostTables
from planner.simulator import StageAssignment


def best_arrangement(
    tables: CostTables, stage_counts: Sequence[tuple[int, Sequence[int]]]
) -> tuple[StageAssignment, ...]:
    """Within each stage (device position, layers per precision column, in pipeline order),
    the assignment of precisions to its layers of least Σω."""
    stages, start = [], 0
    for position, counts in stage_counts:
        size = int(sum(counts))
        kinds = [k for k, c in enumerate(counts) if c > 0]
        stages.append(StageAssignment(position, _assign(tables, start, size, kinds, counts)))
        start += size
    return tuple(stages)


def _assign(
    tables: CostTables, start: int, size: int, kinds: Sequence[int], counts: Sequence[int]
) -> tuple[int, ...]:
    if len(kinds) == 1:
        return (tables.bits[kinds[0]],) * size
    m = SparseModel()
    for i in range(size):
        for k in kinds:
            m.var(("a", i, k), ub=1.0, cost=float(tables.omega[start + i, k]))
    for i in range(size):
        m.row([(m.index[("a", i, k)], 1.0) for k in kinds], lo=1.0, hi=1.0)
    for k in kinds:
        total = float(counts[k])
        m.row([(m.index[("a", i, k)], 1.0) for i in range(size)], lo=total, hi=total)
    x = m.relaxation().point
    assert x is not None  # a transportation problem with matching totals is always feasible
    return tuple(
        tables.bits[next(k for k in kinds if x[m.index[("a", i, k)]] > 0.5)] for i in range(size)
    )
