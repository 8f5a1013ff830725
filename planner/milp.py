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

from planner.arrangement import best_arrangement
from planner.highs_model import GIB, Solved, SolveOptions, SparseModel
from planner.problem import CostTables
from planner.simulator import StageAssignment

QualityForm = Literal["count", "free", "per-layer"]
"""How Σω is modelled (module docstring)."""

Terms = list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class MilpResult:
    """Outcome of one MILP: the HiGHS run and the plan decoded from its point (if any)."""

    solved: Solved
    stages: tuple[StageAssignment, ...] | None
    columns: int
    rows: int

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


@dataclass(frozen=True)
class LayerUnits:
    """The MILP's layer units: sizes g_i and each unit's ω row (sum over its layers)."""

    sizes: tuple[int, ...]
    omega: np.ndarray

    @classmethod
    def grouped(cls, tables: CostTables, group: int) -> LayerUnits:
        """Consecutive groups of ``group`` layers (the last may be shorter)."""
        num_layers = tables.num_layers
        starts = list(range(0, num_layers, group))
        sizes = tuple(min(group, num_layers - s) for s in starts)
        omega = np.array(
            [tables.omega[s : s + g].sum(axis=0) for s, g in zip(starts, sizes, strict=True)]
        )
        return cls(sizes, omega)


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


class PartitionMilp(PipelineFormulation):
    """The formulation of the module docstring over the devices of ``tables`` in their order."""

    def __init__(
        self,
        tables: CostTables,
        units: LayerUnits | None,
        interchangeable: Sequence[bool],
        quality: QualityForm | None = None,
        stage_sizes: Sequence[int] | None = None,
    ) -> None:
        """``units`` None selects the count form (or ``quality="free"``); ``interchangeable[j]``
        says device j and j + 1 are identical and on the same host. ``stage_sizes`` (free form
        only) fixes how many layers each device holds, every device in use: the precisions are
        then chosen per layer within each stage's own range, so the optimum is exact for those
        ranges."""
        form: QualityForm = quality or ("count" if units is None else "per-layer")
        super().__init__(tables, form)
        self.units = units if form == "per-layer" else None
        self.layerwise = self.units is not None and all(g == 1 for g in self.units.sizes)
        self.interchangeable = interchangeable
        self.stage_sizes = tuple(stage_sizes or ())
        if self.stage_sizes and (form != "free" or len(self.stage_sizes) != tables.num_devices):
            raise ValueError("stage sizes fix the free form's ranges, one size per device")
        self._build()
        if self.stage_sizes:
            self._fix_stage_sizes()
        if self.units is not None:
            self._add_layer_assignment()
            self._add_contiguity()

    @property
    def _ranges(self) -> list[tuple[range, list[int]]]:
        starts = np.cumsum((0, *self.stage_sizes))
        return [(range(starts[j], starts[j + 1]), [j]) for j in range(len(self.stage_sizes))]

    def _fix_stage_sizes(self) -> None:
        for j, size in enumerate(self.stage_sizes):
            self.m.row(self._layer_total(j), lo=float(size), hi=float(size))

    # ---------------------------------------------------------------- the order

    def _add_order(self) -> None:
        m, t = self.m, self.t
        for j in self.devices:
            for d in self.devices:
                if d > j:
                    m.var(("h", j, d))
                    m.var(("g", d, j))
        for j in self.devices:
            before = [(self._v("u", d), 1.0) for d in self.devices if d < j]
            after = [(self._v("u", d), 1.0) for d in self.devices if d > j]
            m.row([(self._v("e", j), 1.0), (self._v("u", j), -1.0), *before], lo=0.0)
            m.row([(self._v("f", j), 1.0), (self._v("u", j), -1.0), *after], lo=0.0)
            if j + 1 < t.num_devices and self.interchangeable[j]:
                self._break_symmetry(j)
        m.row([(self._v("e", j), 1.0) for j in self.devices], lo=1.0, hi=1.0)
        m.row([(self._v("f", j), 1.0) for j in self.devices], lo=1.0, hi=1.0)
        self._add_hops()

    def _break_symmetry(self, j: int) -> None:
        """Identical neighbours j, j + 1: used ones come first, and (unless layers are placed
        one by one) between two stages that are neither the first nor the last, the earlier
        holds at least as many layers."""
        big = float(self.num_layers)
        self.m.row([(self._v("u", j), 1.0), (self._v("u", j + 1), -1.0)], lo=0.0)
        if self.units is None:
            following = [(c, -v) for c, v in self._layer_total(j + 1)]
            self.m.row(
                [
                    *self._layer_total(j),
                    *following,
                    (self._v("e", j), big),
                    (self._v("f", j + 1), big),
                ],
                lo=0.0,
            )

    def _add_hops(self) -> None:
        t, pmax, rnd = self.t, self._v("Pmax"), self._v("R")
        md = float(t.decode_micro_batches)
        for j in self.devices:
            for d in self.devices:
                if d <= j:
                    continue
                between = [(self._v("u", mid), 1.0) for mid in range(j + 1, d)]
                self.m.row(
                    [
                        (self._v("h", j, d), 1.0),
                        (self._v("u", j), -1.0),
                        (self._v("u", d), -1.0),
                        *between,
                    ],
                    lo=-1.0,
                )
                self.m.row(
                    [(self._v("g", d, j), 1.0), (self._v("f", d), -1.0), (self._v("e", j), -1.0)],
                    lo=-1.0,
                )
        for j in self.devices:
            for costs, var, scale in ((t.hop_prefill_s, pmax, 1.0), (t.hop_decode_s, rnd, md)):
                hops = [
                    (self._v("h", j, d), scale * float(costs[j, d])) for d in self.devices[j + 1 :]
                ]
                self.m.row([(var, 1.0)] + [(c, -v) for c, v in hops], lo=0.0)
            self.m.row([(rnd, 1.0)] + [(c, -v) for c, v in self._returns_to_first(j, md)], lo=0.0)

    def _hop_terms(self, phase: Literal["prefill", "decode"]) -> Terms:
        costs = self.t.hop_prefill_s if phase == "prefill" else self.t.hop_decode_s
        return [
            (self._v("h", j, d), float(costs[j, d]))
            for j in self.devices
            for d in self.devices[j + 1 :]
        ]

    def _returns_to_first(self, d: int, scale: float = 1.0) -> Terms:
        r = self.t.token_return_s
        return [(self._v("g", d, j), scale * float(r[d, j])) for j in self.devices if j < d]

    def _return_terms(self) -> Terms:
        return [term for d in self.devices for term in self._returns_to_first(d)]

    # ---------------------------------------------------------------- per-layer units

    def _add_quality(self) -> None:
        if self.units is not None:
            self._add_unit_variables()
        super()._add_quality()

    def _add_unit_variables(self) -> None:
        assert self.units is not None
        t = self.t
        for i, _ in enumerate(self.units.sizes):
            for j in self.devices:
                for k in self.kinds:
                    ub = 1.0 if t.allowed(j, k) else 0.0
                    cost = t.theta_s * float(self.units.omega[i, k])
                    self.m.var(("z", i, j, k), ub=ub, cost=cost, integer=not self.layerwise)

    def _omega_terms(self) -> Terms:
        if self.units is None:
            return super()._omega_terms()
        return [
            (self._v("z", i, j, k), float(self.units.omega[i, k]))
            for i, _ in enumerate(self.units.sizes)
            for j in self.devices
            for k in self.kinds
        ]

    def _add_layer_assignment(self) -> None:
        assert self.units is not None
        units = list(enumerate(self.units.sizes))
        for i, _ in units:
            self.m.row(
                [(self._v("z", i, j, k), 1.0) for j in self.devices for k in self.kinds],
                lo=1.0,
                hi=1.0,
            )
            for j in self.devices:
                self.m.row(
                    [(self._v("u", j), 1.0)] + [(self._v("z", i, j, k), -1.0) for k in self.kinds],
                    lo=0.0,
                )
        for j in self.devices:
            for k in self.kinds:
                self.m.row(
                    [(self._v("n", j, k), 1.0)]
                    + [(self._v("z", i, j, k), -float(g)) for i, g in units],
                    lo=0.0,
                    hi=0.0,
                )
            for name, unit in (("e", 0), ("f", len(units) - 1)):
                self.m.row(
                    [(self._v(name, j), 1.0)]
                    + [(self._v("z", unit, j, k), -1.0) for k in self.kinds],
                    lo=0.0,
                    hi=0.0,
                )

    def _add_contiguity(self) -> None:
        """w[i,j] = Σ_{d≤j,k} z[i,d,k] (unit i sits on device j or earlier) may only fall as
        i grows: a later unit never sits on an earlier device."""
        assert self.units is not None
        last = self.t.num_devices - 1
        for i, _ in enumerate(self.units.sizes):
            for j in range(last):
                w = self.m.var(("w", i, j), ub=1.0, integer=self.layerwise)
                terms = [(w, 1.0)] + [(self._v("z", i, j, k), -1.0) for k in self.kinds]
                if j > 0:
                    terms.append((self._v("w", i, j - 1), -1.0))
                self.m.row(terms, lo=0.0, hi=0.0)
                if i > 0:
                    self.m.row([(w, 1.0), (self._v("w", i - 1, j), -1.0)], hi=0.0)

    # ---------------------------------------------------------------- solving

    def solve(
        self, options: SolveOptions, warm: Sequence[StageAssignment] | None = None
    ) -> MilpResult:
        """Solve with HiGHS; never raises on infeasibility (the status says it)."""
        solved = self._run(options, self._warm_values(warm) if warm else None)
        stages = self._decode(solved.point) if solved.point is not None else None
        return MilpResult(solved, stages, len(self.m.lb), self.m.num_rows)

    def _decode(self, x: np.ndarray) -> tuple[StageAssignment, ...]:
        """Read binaries as value > 0.5 and counts rounded, never ``> 0``."""
        bits = self.t.bits
        if self.quality == "count":
            stages = []
            for j in self.devices:
                layer_bits: list[int] = []
                for k, count in enumerate(self._counts(x, j)):  # highest precision first
                    layer_bits += [bits[k]] * count
                if layer_bits:
                    stages.append(StageAssignment(j, tuple(layer_bits)))
            return tuple(stages)
        if self.units is None or self.layerwise:
            counts = [(j, self._counts(x, j)) for j in self.devices]
            return best_arrangement(self.t, [(j, c) for j, c in counts if sum(c) > 0])
        per_device: dict[int, list[int]] = {}
        for i, size in enumerate(self.units.sizes):
            j, k = next(
                (j, k) for j in self.devices for k in self.kinds if x[self._v("z", i, j, k)] > 0.5
            )
            per_device.setdefault(j, []).extend([bits[k]] * size)
        return tuple(StageAssignment(j, tuple(b)) for j, b in sorted(per_device.items()))

    def _warm_values(self, warm: Sequence[StageAssignment]) -> dict[int, float]:
        """The integer part of a known plan; HiGHS completes the continuous part."""
        values: dict[int, float] = {i: 0.0 for i, kind in enumerate(self.m.integer) if kind}
        layer = 0
        for s in warm:
            j = s.position
            values[self._v("u", j)] = 1.0
            for b in s.layer_bits:
                k = self.t.bits.index(b)
                values[self._v("n", j, k)] += 1
                values[self._v("s", j)] = max(
                    values[self._v("s", j)], float(self.t.slow_bits[j, k])
                )
                if self.units is not None and not self.layerwise:
                    values[self._v("z", _unit_of(self.units.sizes, layer), j, k)] = 1.0
                if self.layerwise:
                    for d in range(j, self.t.num_devices - 1):
                        values[self._v("w", layer, d)] = 1.0
                layer += 1
        values[self._v("e", warm[0].position)] = 1.0
        values[self._v("f", warm[-1].position)] = 1.0
        return values


def _unit_of(sizes: Sequence[int], layer: int) -> int:
    total = 0
    for i, size in enumerate(sizes):
        total += size
        if layer < total:
            return i
    raise ValueError(f"layer {layer} beyond {total} layers")
