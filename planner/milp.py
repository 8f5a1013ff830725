"""The joint partition × precision MILP (HiGHS), in a fixed device order or with the order
left to the solver (:mod:`planner.placement_milp`). One instance per micro-batch choice.

Formulation (seconds, GiB). Paper symbols in brackets.

Sets
    J   devices (in pipeline order when the order is fixed); K precisions; I layer units
        (single layers, or groups of g_i consecutive layers).

Data (``planner.problem.CostTables``)
    lp[j,k], ld[j,k]   one layer's prefill / decode time on j at precision k   [l^p, l^d]
    M[j,k]             one layer's weights at k plus its KV cache on j          [M_{i,b}]
    C_j                usable memory of j                                       [M̄_j]
    A_j, S             activation peak of a used stage; dequantization scratch of a stage
                       running a precision without a fast kernel
    E, H, T            embedding (first stage), LM head + logits (last stage), tied saving
    ep_j, ed_j / hp_j, hd_j   embedding / LM-head time per micro-batch on j
    op_j, od_j         per-call stage overhead on j (measured; 0 from the datasheet)
    cp[j,l], cd[j,l]   hidden-state hop j → l;  r[l,j] token ids l → j          [c^p, c^d]
    m_p, m_d           micro-batches per phase;  σ = μ_n − 1 decode steps
    ω[i,k]             normalised quality indicator;  q budget;  θ trade-off (s per unit ω)

Variables
    n[j,k] ∈ ℤ₊        layers on device j at precision k
    u_j, e_j, f_j ∈ {0,1}   j is used / the first used / the last used device
    s_j ∈ {0,1}        j runs a precision without a fast kernel
    t_j ∈ [0,1]        j holds both ends of a tied-embedding model (one copy)
    P_j, D_j ≥ 0       stage times per micro-batch;  P* ≥ 0 prefill bottleneck;
    R ≥ 0              decode round (every micro-batch one token)
    hops               fixed order: h[j,l] ≥ 0 (j, l consecutive used devices), g[l,j] ≥ 0
                       (l last, j first); free order: see planner.placement_milp

Objective
    min  Σ_j P_j + Σ hops^p + (m_p − 1) P* + σ R + θ Ω

Constraints
    layers      Σ_{j,k} n[j,k] = L
    use         u_j ≤ Σ_k n[j,k] ≤ L u_j
    slow        L s_j ≥ Σ_{k slow on j} n[j,k]
    memory      Σ_k M[j,k] n[j,k] + A_j u_j + S s_j + E e_j + H f_j − T t_j ≤ C_j;  t_j ≤ e_j, f_j
    stage time  P_j ≥ Σ_k lp[j,k] n[j,k] + ep_j e_j + hp_j f_j + op_j u_j;   D_j likewise
    prefill     P* ≥ P_j;   P* ≥ every prefill hop used
    decode      R ≥ Σ_j D_j + Σ hops^d + return;   R ≥ m_d D_j;   R ≥ m_d · every decode hop
                used;   R ≥ m_d · return
    fixed order ends  e_j ≥ u_j − Σ_{l<j} u_l,  Σ_j e_j = 1;   f_j ≥ u_j − Σ_{l>j} u_l,  Σ_j f_j = 1
                hops  h[j,l] ≥ u_j + u_l − 1 − Σ_{j<m<l} u_m;     g[l,j] ≥ f_l + e_j − 1   (l > j)
    quality     Ω ≤ q, with Ω in one of three forms:
      count     every layer scores alike: Ω = Σ_{j,k} ω_k n[j,k];
      free      layers score differently, each layer's precision is chosen apart from its
                device (a relaxation of the per-layer form: contiguity is dropped):
                y[i,k] ≥ 0,  Σ_k y[i,k] = 1,  Σ_i y[i,k] = Σ_j n[j,k],  Ω = Σ ω[i,k] y[i,k];
      envelope  layers score differently, and only how many sit at each precision is modelled
                (a relaxation of the free form): q_k ≥ the least Σω of any N_k layers at k,
                N_k = Σ_j n[j,k], a convex piecewise-linear function of N_k written as one row
                per breakpoint;  Ω = Σ_k q_k. Each layer's precision is not chosen, so a
                placement's precisions are arranged afterwards; it proves pairs and orders
                infeasible under a cutoff several times faster than the free form;
      per-layer (fixed order) z[i,j,k] unit i on device j at precision k   [z_{i,j,b}]:
                Σ_{j,k} z[i,j,k] = 1;   n[j,k] = Σ_i g_i z[i,j,k];   u_j ≥ Σ_k z[i,j,k];
                e_j = Σ_k z[0,j,k];   f_j = Σ_k z[I−1,j,k];   Ω = Σ ω[i,k] z[i,j,k];
                contiguity  Σ_{l≤j,k} z[i,l,k] ≤ Σ_{l≤j,k} z[i−1,l,k]   (i ≥ 1, j < |J| − 1)

The free form's y lies in a transportation polytope with integral vertices once the counts n
are integral, so its optimum is a valid lower bound on the per-layer form's, reached exactly
whenever each stage's precisions can be arranged over its own layers for the same Σω
(:func:`planner.arrangement.best_arrangement` finds that arrangement).

With single layers as units, z is continuous and the cumulative columns w[i,j] (unit i on
device j or earlier) are the binaries: once w and the counts n are integral, the z of each stage
form a transportation polytope (layers × precisions) with integral vertices, so the optimum is
exact while branching only touches L·|J| + |J|·|K| integers. Its z may be fractional when Σω does
not matter at the optimum; decoding then assigns each stage's precisions to its layers for least
Σω. Grouped units keep z binary.

The ``max`` terms of the simulator become epigraph variables (P*, R) that the minimisation
drives down to the maximum, so on any integer point the objective equals
``planner.simulator.evaluate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from planner.highs_model import GIB, Solved, SolveOptions, SparseModel
from planner.problem import CostTables
from planner.simulator import StageAssignment

QualityForm = Literal["count", "envelope", "free", "per-layer"]
"""How Σω is modelled (module docstring)."""

Terms = list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class MilpResult:
    """Outcome of one MILP: the HiGHS run and the plan decoded from its point (if any)."""

    solved: Solved
    stages: tuple[StageAssignment, ...] | None

    @property
    def status(self) -> str:
        """HiGHS's model status."""
        return self.solved.status

    @property
    def objective(self) -> float:
        """Objective of the best point (inf without one)."""
        return self.solved.objective

    @property
    def dual_bound(self) -> float:
        """Nothing in this instance scores lower (-inf: no bound yet)."""
        return self.solved.dual_bound


class PipelineFormulation:
    """The constraint families every form shares; subclasses add the device order."""

    free_order = False
    """Whether the device order is the solver's to choose (the ends are then free too)."""

    def __init__(self, tables: CostTables, quality: QualityForm) -> None:
        self.unit_s = _time_unit_s(tables)
        self.t = tables.in_time_unit(self.unit_s)
        self.quality = quality
        self.m = SparseModel()
        self.num_layers = tables.num_layers
        self.devices = range(tables.num_devices)
        self.kinds = range(len(tables.bits))

    def _build(self) -> None:
        self._add_device_variables()
        self._add_layer_count()
        self._add_use()
        self._add_memory_limits()
        self._add_stage_times()
        self._add_order()
        self._add_bottlenecks()
        self._add_quality()

    # ------------------------------------------------------------- hooks of the order

    def _add_order(self) -> None:
        """Ends, hop columns and the rows that bound P* and R by every hop used."""
        raise NotImplementedError

    def _hop_terms(self, phase: Literal["prefill", "decode"]) -> Terms:
        """Σ of the hops of one phase, as terms over the model's columns."""
        raise NotImplementedError

    def _return_terms(self) -> Terms:
        """The token ids' return from the last stage to the first, as terms."""
        raise NotImplementedError

    # ---------------------------------------------------------------- variables

    def _v(self, *key: object) -> int:
        return self.m.index[key]

    def _add_device_variables(self) -> None:
        t, m = self.t, self.m
        for j in self.devices:
            for k in self.kinds:
                ub = float(self.num_layers) if t.allowed(j, k) else 0.0
                cost = t.theta_s * float(t.omega[0, k]) if self.quality == "count" else 0.0
                m.var(("n", j, k), ub=ub, integer=True, cost=cost)
            for name in ("u", "e", "f", "s"):
                m.var((name, j), ub=1.0, integer=True)
            m.var(("t", j), ub=1.0 if t.tied_saving_bytes[j] > 0 else 0.0)
            m.var(("P", j), cost=1.0)
            m.var(("D", j))
        m.var(("Pmax",), cost=float(t.prefill_micro_batches - 1))
        m.var(("R",), cost=float(t.decode_steps))

    def _n_terms(self, j: int, weights: Sequence[float] | np.ndarray) -> Terms:
        return [(self._v("n", j, k), float(weights[k])) for k in self.kinds if weights[k] != 0]

    def _layer_total(self, j: int) -> Terms:
        return [(self._v("n", j, k), 1.0) for k in self.kinds]

    # ---------------------------------------------------------------- constraints

    def _add_layer_count(self) -> None:
        terms = [(self._v("n", j, k), 1.0) for j in self.devices for k in self.kinds]
        self.m.row(terms, lo=self.num_layers, hi=self.num_layers)

    def _add_use(self) -> None:
        for j in self.devices:
            count = self._layer_total(j)
            self.m.row([*count, (self._v("u", j), -float(self._most_layers(j)))], hi=0.0)
            self.m.row([*count, (self._v("u", j), -1.0)], lo=0.0)
            if self.free_order:
                for end in ("e", "f"):
                    self.m.row([(self._v("u", j), 1.0), (self._v(end, j), -1.0)], lo=0.0)
            slow = self._n_terms(j, self.t.slow_bits[j].astype(float))
            if slow:
                self.m.row(
                    [(self._v("s", j), float(self.num_layers))] + [(c, -v) for c, v in slow], lo=0.0
                )

    def _most_layers(self, j: int) -> int:
        """Most layers device j can hold at any allowed precision (a tight big-M)."""
        t = self.t
        allowed = [k for k in self.kinds if t.allowed(j, k)]
        if not allowed:
            return 0
        smallest = min(float(t.layer_memory_bytes[j, k]) for k in allowed)
        room = float(t.capacity_bytes[j] - t.activation_bytes[j])
        return int(min(self.num_layers, max(0.0, room) // smallest))

    def _add_memory_limits(self) -> None:
        t = self.t
        for j in self.devices:
            terms = self._n_terms(j, t.layer_memory_bytes[j] / GIB)
            terms += [
                (self._v("u", j), t.activation_bytes[j] / GIB),
                (self._v("s", j), float(t.dequant_scratch_bytes[j]) / GIB),
                (self._v("e", j), float(t.embedding_bytes[j]) / GIB),
                (self._v("f", j), float(t.head_bytes[j]) / GIB),
                (self._v("t", j), -float(t.tied_saving_bytes[j]) / GIB),
            ]
            self.m.row(terms, hi=float(t.capacity_bytes[j]) / GIB)
            self.m.row([(self._v("t", j), 1.0), (self._v("e", j), -1.0)], hi=0.0)
            self.m.row([(self._v("t", j), 1.0), (self._v("f", j), -1.0)], hi=0.0)

    def _add_stage_times(self) -> None:
        t = self.t
        phases = (
            ("P", t.layer_prefill_s, t.embed_prefill_s, t.head_prefill_s, t.stage_prefill_s),
            ("D", t.layer_decode_s, t.embed_decode_s, t.head_decode_s, t.stage_decode_s),
        )
        for var, layer_s, embed_s, head_s, stage_s in phases:
            for j in self.devices:
                finite = np.where(np.isfinite(layer_s[j]), layer_s[j], 0.0)
                terms = [(c, -v) for c, v in self._n_terms(j, finite)]
                terms += [
                    (self._v("e", j), -float(embed_s[j])),
                    (self._v("f", j), -float(head_s[j])),
                    (self._v("u", j), -float(stage_s[j])),
                    (self._v(var, j), 1.0),
                ]
                self.m.row(terms, lo=0.0)

    def _add_bottlenecks(self) -> None:
        """P* ≥ P_j; R ≥ m_d D_j; the decode ring; prefill hops as costs."""
        pmax, rnd = self._v("Pmax"), self._v("R")
        md = float(self.t.decode_micro_batches)
        for col, cost in self._hop_terms("prefill"):
            self.m.cost[col] += cost
        ring: Terms = [(rnd, 1.0)]
        for j in self.devices:
            self.m.row([(pmax, 1.0), (self._v("P", j), -1.0)], lo=0.0)
            self.m.row([(rnd, 1.0), (self._v("D", j), -md)], lo=0.0)
            ring.append((self._v("D", j), -1.0))
        ring += [(c, -v) for c, v in self._hop_terms("decode") + self._return_terms()]
        self.m.row(ring, lo=0.0)

    def _omega_terms(self) -> Terms:
        if self.quality == "envelope":
            return [(self._v("q", k), 1.0) for k in self.kinds]
        if self.quality == "count":
            return [(c, v) for j in self.devices for c, v in self._n_terms(j, self.t.omega[0])]
        return [
            (self._v("y", i, k), float(self.t.omega[i, k]))
            for i in range(self.num_layers)
            for k in self.kinds
        ]

    def _add_quality(self) -> None:
        if self.quality == "free":
            self._add_free_assignment()
        if self.quality == "envelope":
            self._add_envelope()
        if self.t.quality_budget is not None:
            self.m.row(self._omega_terms(), hi=self.t.quality_budget)

    def _add_free_assignment(self) -> None:
        """y[i,k]: layer i's precision, chosen apart from its device (module docstring); with
        fixed stage ranges, apart from its place within its stage only."""
        t, m = self.t, self.m
        for i in range(self.num_layers):
            for k in self.kinds:
                m.var(("y", i, k), ub=1.0, cost=t.theta_s * float(t.omega[i, k]))
            m.row([(self._v("y", i, k), 1.0) for k in self.kinds], lo=1.0, hi=1.0)
        groups = self._ranges or [(range(self.num_layers), list(self.devices))]
        for layers, devices in groups:
            for k in self.kinds:
                m.row(
                    [(self._v("y", i, k), 1.0) for i in layers]
                    + [(self._v("n", j, k), -1.0) for j in devices],
                    lo=0.0,
                    hi=0.0,
                )

    def _add_envelope(self) -> None:
        """q_k ≥ S_k(N_k), S_k(N) the sum of the N least ω[·,k]: S_k is convex (its steps,
        the sorted ω, grow), so it is the largest of its pieces S_k(i) + ω_(i)·(N − i)."""
        t, m = self.t, self.m
        for k in self.kinds:
            q = m.var(("q", k), cost=t.theta_s)
            steps = np.sort(t.omega[:, k])
            sums = np.concatenate(([0.0], np.cumsum(steps)))
            for i, step in enumerate(steps):
                total = [(self._v("n", j, k), -float(step)) for j in self.devices if step]
                m.row([(q, 1.0), *total], lo=float(sums[i] - step * i))

    @property
    def _ranges(self) -> list[tuple[range, list[int]]]:
        """Fixed stage ranges as (layers, [device]) pairs; empty when the ranges are free."""
        return []

    # ---------------------------------------------------------------- solving

    def _counts(self, x: np.ndarray, j: int) -> tuple[int, ...]:
        return tuple(round(x[self._v("n", j, k)]) for k in self.kinds)

    def relaxation_bound(self) -> float:
        """Optimum of the LP relaxation, seconds: no plan of this instance scores lower (inf
        when even the relaxation is infeasible)."""
        return self.m.relaxation().dual_bound * self.unit_s

    def _run(self, options: SolveOptions, warm: dict[int, float] | None = None) -> Solved:
        """Solve in the model's time unit; objective, bound and cutoff in seconds."""
        scaled = replace(options, cutoff=options.cutoff / self.unit_s)
        solved = self.m.solve(scaled, warm=warm)
        return replace(
            solved,
            objective=solved.objective * self.unit_s,
            dual_bound=solved.dual_bound * self.unit_s,
        )


def _time_unit_s(tables: CostTables) -> float:
    """About one pass of the model through an average device's prefill (seconds), so that
    the MILP's times sit near 1 whatever the model's size."""
    finite = tables.layer_prefill_s[np.isfinite(tables.layer_prefill_s)]
    per_layer = float(finite.mean()) if finite.size else 1.0
    return max(per_layer * tables.num_layers, 1e-9)
