"""Score any plan with the cost model: per-stage times and memory, latency, throughput, Σω.

Pipeline timing (seconds; P_k, D_k are stage k's time per prefill / decode micro-batch, with
the embedding charged once to the first stage, the LM head once to the last and a measured
per-call overhead, where a profile has one, once to every stage; c_k is the
hop from stage k to k+1, r the token ids going back from the last stage to the first)::

    prefill = Σ_k P_k + Σ_k c^p_k + (m_p - 1) · max(max_k P_k, max_k c^p_k)
    round   = max(Σ_k D_k + Σ_k c^d_k + r,  m_d · max(max_k D_k, max_k c^d_k, r))
    decode  = (mu_n - 1) · round
    objective = prefill + decode + theta · Σω

A prefill is a synchronous pipeline of m_p micro-batches. In decode, each of the m_d
micro-batches needs its previous token before its next step, so one round (every micro-batch
one token) lasts at least the ring latency, and at least m_d times the slowest stage or link.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from planner.problem import CostTables


@dataclass(frozen=True, slots=True)
class StageAssignment:
    """A used device (its position in the tables' order) and the precision of each of its
    layers, in layer order."""

    position: int
    layer_bits: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What the cost model predicts for a plan (seconds, bytes, tokens/s)."""

    stage_prefill_s: tuple[float, ...]
    stage_decode_s: tuple[float, ...]
    stage_memory_bytes: tuple[int, ...]
    stage_capacity_bytes: tuple[int, ...]
    prefill_s: float
    decode_s: float
    omega_sum: float
    throughput_tokens_per_s: float
    objective: float
    fits_memory: bool
    within_budget: bool

    @property
    def total_s(self) -> float:
        """End-to-end time of the batch, seconds."""
        return self.prefill_s + self.decode_s

    @property
    def feasible(self) -> bool:
        """Fits every device and the quality budget."""
        return self.fits_memory and self.within_budget


def stage_memory_bytes(
    tables: CostTables, stage: StageAssignment, first: bool, last: bool
) -> float:
    """Memory a stage needs on its device, bytes (see cost_model for each term)."""
    j = stage.position
    cols = [tables.bits.index(b) for b in stage.layer_bits]
    memory = sum(tables.layer_memory_bytes[j, k] for k in cols) + tables.activation_bytes[j]
    if any(tables.slow_bits[j, k] for k in cols):
        memory += tables.dequant_scratch_bytes[j]
    if first:
        memory += tables.embedding_bytes[j]
    if last:
        memory += tables.head_bytes[j]
    if first and last:
        memory -= tables.tied_saving_bytes[j]
    return float(memory)


def _stage_times(
    tables: CostTables, stage: StageAssignment, first: bool, last: bool
) -> tuple[float, float]:
    j = stage.position
    cols = [tables.bits.index(b) for b in stage.layer_bits]
    prefill = sum(float(tables.layer_prefill_s[j, k]) for k in cols) + tables.stage_prefill_s[j]
    decode = sum(float(tables.layer_decode_s[j, k]) for k in cols) + tables.stage_decode_s[j]
    if first:
        prefill += tables.embed_prefill_s[j]
        decode += tables.embed_decode_s[j]
    if last:
        prefill += tables.head_prefill_s[j]
        decode += tables.head_decode_s[j]
    return float(prefill), float(decode)


def evaluate(tables: CostTables, stages: Sequence[StageAssignment]) -> Evaluation:
    """Score ``stages`` (in pipeline order, covering every layer) under ``tables``."""
    last = len(stages) - 1
    times = [_stage_times(tables, s, k == 0, k == last) for k, s in enumerate(stages)]
    memory = [stage_memory_bytes(tables, s, k == 0, k == last) for k, s in enumerate(stages)]
    capacity = [float(tables.capacity_bytes[s.position]) for s in stages]
    pos = [s.position for s in stages]
    hops_p = [float(tables.hop_prefill_s[a, b]) for a, b in itertools.pairwise(pos)]
    hops_d = [float(tables.hop_decode_s[a, b]) for a, b in itertools.pairwise(pos)]
    ret = float(tables.token_return_s[pos[-1], pos[0]]) if len(pos) > 1 else 0.0
    prefill_stage = [t[0] for t in times]
    decode_stage = [t[1] for t in times]
    prefill = sum(prefill_stage) + sum(hops_p)
    prefill += (tables.prefill_micro_batches - 1) * max(prefill_stage + hops_p)
    ring = sum(decode_stage) + sum(hops_d) + ret
    round_s = max(ring, tables.decode_micro_batches * max([*decode_stage, *hops_d, ret]))
    decode = tables.decode_steps * round_s
    layer = 0
    omega = 0.0
    for s in stages:
        for b in s.layer_bits:
            omega += float(tables.omega[layer, tables.bits.index(b)])
            layer += 1
    budget = tables.quality_budget
    return Evaluation(
        stage_prefill_s=tuple(prefill_stage),
        stage_decode_s=tuple(decode_stage),
        stage_memory_bytes=tuple(int(m) for m in memory),
        stage_capacity_bytes=tuple(int(c) for c in capacity),
        prefill_s=prefill,
        decode_s=decode,
        omega_sum=omega,
        throughput_tokens_per_s=tables.tokens_generated / (prefill + decode),
        objective=prefill + decode + tables.theta_s * omega,
        fits_memory=all(m <= c for m, c in zip(memory, capacity, strict=True)),
        within_budget=budget is None or omega <= budget + 1e-9,
    )
