"""Why no plan exists, in the terms an operator can act on."""

from __future__ import annotations

from planner.highs_model import GIB
from planner.indicator import BITS_COLUMN
from planner.problem import PlanningProblem, build_tables


def why_infeasible(problem: PlanningProblem) -> str:
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
