"""The joint partition × precision MILP for one device order and micro-batch choice (HiGHS).

Formulation (seconds, GiB; one instance per order and (ξ_p, ξ_d); the outer search in
``planner.search`` enumerates those). Paper symbols in brackets.

Sets
    J   devices in pipeline order (j < l means j comes first); K precisions; I layer units
        (single layers, or groups of g_i consecutive layers when an instance is too large).

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
    h[j,l] ≥ 0         j and l are consecutive used devices;  g[l,j] ≥ 0  l last, j first
    P_j, D_j ≥ 0       stage times per micro-batch;  P* ≥ 0 prefill bottleneck;
    R ≥ 0              decode round (every micro-batch one token)
    z[i,j,k] ∈ {0,1}   (per-layer form only) unit i on device j at precision k   [z_{i,j,b}]

Objective
    min  Σ_j P_j + Σ_{j<l} cp[j,l] h[j,l] + (m_p − 1) P* + σ R + θ Ω

Constraints
    layers      Σ_{j,k} n[j,k] = L
    use         u_j ≤ Σ_k n[j,k] ≤ L u_j;   u_j ≥ u_{j+1} for interchangeable neighbours
    ends        e_j ≥ u_j − Σ_{l<j} u_l,  Σ_j e_j = 1;   f_j ≥ u_j − Σ_{l>j} u_l,  Σ_j f_j = 1
    slow        L s_j ≥ Σ_{k slow on j} n[j,k]
    hops        h[j,l] ≥ u_j + u_l − 1 − Σ_{j<m<l} u_m;     g[l,j] ≥ f_l + e_j − 1   (l > j)
    memory      Σ_k M[j,k] n[j,k] + A_j u_j + S s_j + E e_j + H f_j − T t_j ≤ C_j;  t_j ≤ e_j, f_j
    stage time  P_j ≥ Σ_k lp[j,k] n[j,k] + ep_j e_j + hp_j f_j + op_j u_j;   D_j likewise
    prefill     P* ≥ P_j;   P* ≥ Σ_l cp[j,l] h[j,l]
    decode      R ≥ Σ_j D_j + Σ cd h + Σ r g;   R ≥ m_d D_j;   R ≥ m_d Σ_l cd[j,l] h[j,l];
                R ≥ m_d Σ_j r[l,j] g[l,j]
    quality     Ω ≤ q,  Ω = Σ_{j,k} ω_k n[j,k] when every layer scores alike, else
                Ω = Σ_{i,j,k} ω[i,k] z[i,j,k] with
    per-layer   Σ_{j,k} z[i,j,k] = 1;   n[j,k] = Σ_i g_i z[i,j,k];   u_j ≥ Σ_k z[i,j,k];
                e_j = Σ_k z[0,j,k];   f_j = Σ_k z[I−1,j,k];
                contiguity  Σ_{l≤j,k} z[i,l,k] ≤ Σ_{l≤j,k} z[i−1,l,k]   (i ≥ 1, j < |J| − 1)

With single layers as units, z is continuous and the cumulative columns w[i,j] (unit i on
device j or earlier) are the binaries: once w and the counts n are integral, the z of each stage
form a transportation polytope (layers × precisions) with integral vertices, so the optimum is
exact while branching only touches L·|J| + |J|·|K| integers. Its z may be fractional when Σω does
not matter at the optimum; decoding then assigns each stage's precisions to its layers for least
Σω (:func:`best_arrangement`). Grouped units keep z binary.

The ``max`` terms of the simulator become epigraph variables (P*, R) that the minimisation
drives down to the maximum, so on any integer point the objective equals
``planner.simulator.evaluate``. When all layers score alike the counts n alone decide the
plan (any contiguous arrangement of a stage's precisions is equivalent), which removes the
per-layer binaries and their symmetry.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import highspy
import numpy as np

from planner.problem import CostTables
from planner.simulator import StageAssignment


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """File descriptor 1 points at /dev/null inside (C libraries write there directly)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _absorb_banner() -> None:
    """HiGHS prints its banner on standard output the first time a process creates a solver,
    before any option can turn output off; that would corrupt ``pqctl plan --json``. One solver
    is created here, at import (before any interface draws), with standard output silenced."""
    try:
        with _stdout_silenced():
            highspy.Highs()  # type: ignore[no-untyped-call]
    except (OSError, ValueError):  # no usable fd 1 (e.g. closed): nothing to protect
        pass


_absorb_banner()

GIB = float(1024**3)
_INF = highspy.kHighsInf


@dataclass(frozen=True, slots=True)
class SolveOptions:
    """Solver settings: time limit (s), relative MIP gap, incumbent cutoff, log output."""

    time_limit_s: float = 10.0
    mip_rel_gap: float = 1e-4
    cutoff: float = math.inf
    verbose: bool = False


@dataclass(frozen=True, slots=True)
class MilpResult:
    """Outcome of one MILP: status, best plan (None if none found), objective and gap."""

    status: str
    stages: tuple[StageAssignment, ...] | None
    objective: float
    dual_bound: float
    mip_gap: float
    time_s: float
    columns: int
    rows: int


class _Model:
    """Columns and sparse rows collected as plain arrays, then handed to HiGHS in bulk."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.cost: list[float] = []
        self.integer: list[bool] = []
        self.index: dict[tuple[object, ...], int] = {}
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []
        self.starts: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []

    def var(
        self,
        key: tuple[object, ...],
        lb: float = 0.0,
        ub: float = _INF,
        cost: float = 0.0,
        integer: bool = False,
    ) -> int:
        self.index[key] = len(self.lb)
        self.lb.append(lb)
        self.ub.append(ub)
        self.cost.append(cost)
        self.integer.append(integer)
        return self.index[key]

    def row(self, terms: Iterable[tuple[int, float]], lo: float = -_INF, hi: float = _INF) -> None:
        merged: dict[int, float] = {}
        for col, val in terms:
            merged[col] = merged.get(col, 0.0) + float(val)
        self.starts.append(len(self.cols))
        for col, val in merged.items():
            if val != 0.0:
                self.cols.append(col)
                self.vals.append(val)
        self.row_lo.append(lo)
        self.row_hi.append(hi)

    def to_highs(self, h: highspy.Highs, integer: Sequence[bool] | None = None) -> None:
        """Pass the model to HiGHS; ``integer`` overrides which columns are integral."""
        n = len(self.lb)
        h.addVars(n, np.array(self.lb), np.array(self.ub))
        idx = np.arange(n, dtype=np.int32)
        h.changeColsCost(n, idx, np.array(self.cost))
        kinds = np.array(self.integer if integer is None else integer, dtype=np.uint8)
        h.changeColsIntegrality(n, idx, kinds)
        h.addRows(
            len(self.row_lo),
            np.array(self.row_lo),
            np.array(self.row_hi),
            len(self.cols),
            np.array(self.starts, dtype=np.int32),
            np.array(self.cols, dtype=np.int32),
            np.array(self.vals),
        )


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


class PartitionMilp:
    """Builds and solves the formulation of the module docstring for one ``CostTables``."""

    def __init__(
        self, tables: CostTables, units: LayerUnits | None, interchangeable: Sequence[bool]
    ) -> None:
        """``units`` None selects the count form (every layer alike); ``interchangeable[j]``
        says device j and j + 1 are identical and on the same host."""
        self.t = tables
        self.units = units
        self.layerwise = units is not None and all(g == 1 for g in units.sizes)
        self.m = _Model()
        self.num_layers = tables.num_layers
        self.devices = range(tables.num_devices)
        self.kinds = range(len(tables.bits))
        self._add_variables()
        self._add_layer_count()
        self._add_use(interchangeable)
        self._add_ends()
        self._add_hops()
        self._add_memory_limits()
        self._add_stage_times()
        self._add_bottlenecks()
        self._add_quality()
        if units is not None:
            self._add_layer_assignment()
            self._add_contiguity()

    # ---------------------------------------------------------------- variables

    def _add_variables(self) -> None:
        t, m = self.t, self.m
        for j in self.devices:
            for k in self.kinds:
                ub = float(self.num_layers) if t.allowed(j, k) else 0.0
                cost = t.theta_s * float(t.omega[0, k]) if self.units is None else 0.0
                m.var(("n", j, k), ub=ub, integer=True, cost=cost)
            for name in ("u", "e", "f", "s"):
                m.var((name, j), ub=1.0, integer=True)
            m.var(("t", j), ub=1.0 if t.tied_saving_bytes[j] > 0 else 0.0)
            m.var(("P", j), cost=1.0)
            m.var(("D", j))
            for d in self.devices:
                if d > j:
                    m.var(("h", j, d), cost=float(t.hop_prefill_s[j, d]))
                    m.var(("g", d, j))
        m.var(("Pmax",), cost=float(t.prefill_micro_batches - 1))
        m.var(("R",), cost=float(t.decode_steps))
        if self.units is not None:
            for i, _ in enumerate(self.units.sizes):
                for j in self.devices:
                    for k in self.kinds:
                        ub = 1.0 if t.allowed(j, k) else 0.0
                        cost = t.theta_s * float(self.units.omega[i, k])
                        m.var(("z", i, j, k), ub=ub, cost=cost, integer=not self.layerwise)

    def _v(self, *key: object) -> int:
        return self.m.index[key]

    def _n_terms(self, j: int, weights: Sequence[float] | np.ndarray) -> list[tuple[int, float]]:
        return [(self._v("n", j, k), float(weights[k])) for k in self.kinds if weights[k] != 0]

    # ---------------------------------------------------------------- constraints

    def _add_layer_count(self) -> None:
        terms = [(self._v("n", j, k), 1.0) for j in self.devices for k in self.kinds]
        self.m.row(terms, lo=self.num_layers, hi=self.num_layers)

    def _add_use(self, interchangeable: Sequence[bool]) -> None:
        ones = np.ones(len(self.t.bits))
        for j in self.devices:
            count = self._n_terms(j, ones)
            self.m.row([*count, (self._v("u", j), -float(self._most_layers(j)))], hi=0.0)
            self.m.row([*count, (self._v("u", j), -1.0)], lo=0.0)
            slow = self._n_terms(j, self.t.slow_bits[j].astype(float))
            if slow:
                self.m.row(
                    [(self._v("s", j), float(self.num_layers))] + [(c, -v) for c, v in slow], lo=0.0
                )
            if j + 1 < self.t.num_devices and interchangeable[j]:
                self._break_symmetry(j, count)

    def _most_layers(self, j: int) -> int:
        """Most layers device j can hold at any allowed precision (a tight big-M)."""
        t = self.t
        allowed = [k for k in self.kinds if t.allowed(j, k)]
        if not allowed:
            return 0
        smallest = min(float(t.layer_memory_bytes[j, k]) for k in allowed)
        room = float(t.capacity_bytes[j] - t.activation_bytes[j])
        return int(min(self.num_layers, max(0.0, room) // smallest))

    def _break_symmetry(self, j: int, count: list[tuple[int, float]]) -> None:
        """Identical neighbours j, j + 1: used ones come first, and between two stages that
        are neither the first nor the last, the earlier holds at least as many layers."""
        big = float(self.num_layers)
        self.m.row([(self._v("u", j), 1.0), (self._v("u", j + 1), -1.0)], lo=0.0)
        if self.units is None:
            ones = np.ones(len(self.t.bits))
            following = [(c, -v) for c, v in self._n_terms(j + 1, ones)]
            self.m.row(
                [*count, *following, (self._v("e", j), big), (self._v("f", j + 1), big)], lo=0.0
            )

    def _add_ends(self) -> None:
        for j in self.devices:
            before = [(self._v("u", d), 1.0) for d in self.devices if d < j]
            after = [(self._v("u", d), 1.0) for d in self.devices if d > j]
            self.m.row([(self._v("e", j), 1.0), (self._v("u", j), -1.0), *before], lo=0.0)
            self.m.row([(self._v("f", j), 1.0), (self._v("u", j), -1.0), *after], lo=0.0)
        self.m.row([(self._v("e", j), 1.0) for j in self.devices], lo=1.0, hi=1.0)
        self.m.row([(self._v("f", j), 1.0) for j in self.devices], lo=1.0, hi=1.0)

    def _add_hops(self) -> None:
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

    def _hop_terms(self, j: int, costs: np.ndarray, scale: float = 1.0) -> list[tuple[int, float]]:
        return [(self._v("h", j, d), scale * float(costs[j, d])) for d in self.devices if d > j]

    def _return_terms(self, d: int, scale: float = 1.0) -> list[tuple[int, float]]:
        r = self.t.token_return_s
        return [(self._v("g", d, j), scale * float(r[d, j])) for j in self.devices if j < d]

    def _add_bottlenecks(self) -> None:
        t, pmax, rnd = self.t, self._v("Pmax"), self._v("R")
        md = float(t.decode_micro_batches)
        ring = [(rnd, 1.0)]
        for j in self.devices:
            self.m.row([(pmax, 1.0), (self._v("P", j), -1.0)], lo=0.0)
            self.m.row(
                [(pmax, 1.0)] + [(c, -v) for c, v in self._hop_terms(j, t.hop_prefill_s)], lo=0.0
            )
            self.m.row([(rnd, 1.0), (self._v("D", j), -md)], lo=0.0)
            self.m.row(
                [(rnd, 1.0)] + [(c, -v) for c, v in self._hop_terms(j, t.hop_decode_s, md)], lo=0.0
            )
            self.m.row([(rnd, 1.0)] + [(c, -v) for c, v in self._return_terms(j, md)], lo=0.0)
            ring.append((self._v("D", j), -1.0))
            ring += [(c, -v) for c, v in self._hop_terms(j, t.hop_decode_s)]
            ring += [(c, -v) for c, v in self._return_terms(j)]
        self.m.row(ring, lo=0.0)

    def _omega_terms(self) -> list[tuple[int, float]]:
        if self.units is None:
            return [(c, v) for j in self.devices for c, v in self._n_terms(j, self.t.omega[0])]
        return [
            (self._v("z", i, j, k), float(self.units.omega[i, k]))
            for i, _ in enumerate(self.units.sizes)
            for j in self.devices
            for k in self.kinds
        ]

    def _add_quality(self) -> None:
        if self.t.quality_budget is not None:
            self.m.row(self._omega_terms(), hi=self.t.quality_budget)

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
        self,
        options: SolveOptions,
        warm: Sequence[StageAssignment] | None = None,
        relax_positions: bool = False,
    ) -> MilpResult:
        """Solve with HiGHS; never raises on infeasibility (the status says it).

        ``relax_positions`` (per-layer form) keeps the counts integral but lets layers sit
        fractionally on devices: a relaxation whose optimum bounds the exact one from below,
        and whose counts, arranged per stage, give a feasible plan candidate.
        """
        h = highspy.Highs()  # type: ignore[no-untyped-call]
        h.setOptionValue("output_flag", options.verbose)
        for name, value in (
            ("time_limit", options.time_limit_s),
            ("mip_rel_gap", options.mip_rel_gap),
            ("threads", 1),
            ("random_seed", 0),
        ):
            h.setOptionValue(name, value)
        if math.isfinite(options.cutoff):
            h.setOptionValue("objective_bound", options.cutoff)
        integer = list(self.m.integer)
        if relax_positions and self.layerwise:
            for key, col in self.m.index.items():
                if key[0] == "w":
                    integer[col] = False
        self.m.to_highs(h, integer)
        if warm is not None and not relax_positions:
            self._set_warm_start(h, warm)
        start = time.perf_counter()
        h.run()
        elapsed = time.perf_counter() - start
        return self._result(h, elapsed)

    def relaxation_bound(self) -> float:
        """Optimum of the LP relaxation: no plan of this instance scores lower (inf when
        even the relaxation is infeasible)."""
        h = highspy.Highs()  # type: ignore[no-untyped-call]
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", 1)
        self.m.to_highs(h, integer=[False] * len(self.m.integer))
        h.run()
        if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
            return math.inf
        return float(h.getInfo().objective_function_value)

    def _result(self, h: highspy.Highs, elapsed: float) -> MilpResult:
        status = h.getModelStatus()
        info = h.getInfo()
        name = h.modelStatusToString(status)
        has_point = info.primal_solution_status == 2
        stages = self._decode(np.array(h.getSolution().col_value)) if has_point else None
        objective = float(info.objective_function_value) if has_point else math.inf
        gap = max(0.0, float(info.mip_gap)) if has_point else math.inf
        bound = float(info.mip_dual_bound)
        if status in (
            highspy.HighsModelStatus.kInfeasible,
            highspy.HighsModelStatus.kObjectiveBound,
        ):
            bound = math.inf  # nothing below the cutoff, or nothing at all
        return MilpResult(
            name, stages, objective, bound, gap, elapsed, len(self.m.lb), len(self.m.row_lo)
        )

    def _decode(self, x: np.ndarray) -> tuple[StageAssignment, ...]:
        """Read binaries as value > 0.5 and counts rounded, never ``> 0``."""
        bits = self.t.bits
        if self.units is None:
            stages = []
            for j in self.devices:
                layer_bits: list[int] = []
                for k in self.kinds:  # highest precision first
                    layer_bits += [bits[k]] * round(x[self._v("n", j, k)])
                if layer_bits:
                    stages.append(StageAssignment(j, tuple(layer_bits)))
            return tuple(stages)
        if self.layerwise:
            counts = [
                (j, tuple(round(x[self._v("n", j, k)]) for k in self.kinds)) for j in self.devices
            ]
            return best_arrangement(self.t, [(j, c) for j, c in counts if sum(c) > 0])
        per_device: dict[int, list[int]] = {}
        for i, size in enumerate(self.units.sizes):
            j, k = next(
                (j, k) for j in self.devices for k in self.kinds if x[self._v("z", i, j, k)] > 0.5
            )
            per_device.setdefault(j, []).extend([bits[k]] * size)
        return tuple(StageAssignment(j, tuple(b)) for j, b in sorted(per_device.items()))

    def _set_warm_start(self, h: highspy.Highs, warm: Sequence[StageAssignment]) -> None:
        """Hand HiGHS the integer part of a known plan; it completes the continuous part."""
        values: dict[int, float] = {i: 0.0 for i, kind in enumerate(self.m.integer) if kind}
        used = [s.position for s in warm]
        layer = 0
        for s in warm:
            j = s.position
            values[self._v("u", j)] = 1.0
            for b in s.layer_bits:
                k = self.t.bits.index(b)
                values[self._v("n", j, k)] = values[self._v("n", j, k)] + 1
                values[self._v("s", j)] = max(
                    values[self._v("s", j)], float(self.t.slow_bits[j, k])
                )
                if self.units is not None and not self.layerwise:
                    values[self._v("z", _unit_of(self.units.sizes, layer), j, k)] = 1.0
                if self.layerwise:
                    for d in range(j, self.t.num_devices - 1):
                        values[self._v("w", layer, d)] = 1.0
                layer += 1
        values[self._v("e", used[0])] = 1.0
        values[self._v("f", used[-1])] = 1.0
        cols = np.array(list(values), dtype=np.int32)
        h.setSolution(len(cols), cols, np.array([values[c] for c in values]))


def best_arrangement(
    tables: CostTables, stage_counts: Sequence[tuple[int, Sequence[int]]]
) -> tuple[StageAssignment, ...]:
    """Within each stage (device position, layers per precision column, in pipeline order),
    the assignment of precisions to its layers of least Σω.

    Each stage is a transportation problem (layers × precisions); its LP has integral
    vertices, so the simplex answer is an exact assignment.
    """
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
    m = _Model()
    for i in range(size):
        for k in kinds:
            m.var(("a", i, k), ub=1.0, cost=float(tables.omega[start + i, k]))
    for i in range(size):
        m.row([(m.index[("a", i, k)], 1.0) for k in kinds], lo=1.0, hi=1.0)
    for k in kinds:
        total = float(counts[k])
        m.row([(m.index[("a", i, k)], 1.0) for i in range(size)], lo=total, hi=total)
    h = highspy.Highs()  # type: ignore[no-untyped-call]
    h.setOptionValue("output_flag", False)
    h.setOptionValue("solver", "simplex")
    m.to_highs(h)
    h.run()
    x = np.array(h.getSolution().col_value)
    return tuple(
        tables.bits[next(k for k in kinds if x[m.index[("a", i, k)]] > 0.5)] for i in range(size)
    )


def _unit_of(sizes: Sequence[int], layer: int) -> int:
    total = 0
    for i, size in enumerate(sizes):
        total += size
        if layer < total:
            return i
    raise ValueError(f"layer {layer} beyond {total} layers")
