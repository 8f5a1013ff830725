"""The MILP with the device order left to the solver: which devices run, which one holds the
embedding and which the LM head, and in which order the hosts follow one another.

The pipelines searched keep the devices of a host together (a hidden state leaves a host once)
and the devices of one type on a host together. The stage times and memory of the module
:mod:`planner.milp` do not depend on the order; only the hops, the return of the token ids and
which devices hold the ends do. So one instance covers every order (no enumeration).

Sets and symbols as in :mod:`planner.milp`, plus
    H   hosts;  J_h its devices;   E_h = Σ_{j∈J_h} e_j,  F_h = Σ_{j∈J_h} f_j
    ip_h, id_h, ir_h    cheapest hop (prefill, decode) and token return between two
                        devices of h (inf when h has one device)
    ap[g,h], ad[g,h], ar[g,h]   cheapest hop / return from a device of g to one of h

Variables
    v_h ∈ {0,1}   h runs a stage;   m_h ∈ {0,1}  h runs two stages or more
    δ ∈ {0,1}     one device runs the whole model
    ρ ≥ 0         the return of the token ids
    a[g,h] ∈ {0,1}, o_h ∈ [0, |H| − 1]   h follows g (only when the links differ)

Constraints
    ends        e_j ≤ u_j, f_j ≤ u_j;  Σ e = Σ f = 1;  e_j + f_j ≤ 1 + δ;
                Σ_j u_j ≤ 1 + (|J| − 1)(1 − δ)
    hosts       v_h ≥ u_j (j ∈ J_h);  v_h ≤ Σ_{J_h} u_j;  Σ_{J_h} u_j − v_h ≤ (|J_h| − 1) m_h
    contiguous  Σ_g v_g ≤ 1 + (|H| − 1)(2 − E_h − F_h)   (both ends on h: h is the only host)
    return      ρ ≥ ir_h (E_h + F_h + m_h − 2)
    hops        a host's k used devices make k − 1 hops inside it; every used host but the
                first is entered once:
      alike links (every ap, ad, ar within LINKS_ALIKE_WITHIN of the cheapest; each charged
                the cheapest of its kind: c^p, c^d, r)
                Σ hops^p = Σ_h ip_h (Σ_{J_h} u_j − v_h) + c^p Σ_h (v_h − E_h);  ρ ≥ r (v_h − E_h)
                P* ≥ ip_h m_h;  P* ≥ c^p (v_h − E_h);  R ≥ m_d id_h m_h;  R ≥ m_d c^d (v_h − E_h)
      links that differ (a path over the used hosts)
                Σ_g a[g,h] = v_h − E_h;  Σ_h a[g,h] = v_g − F_g;  o_h ≥ o_g + 1 − |H| (1 − a[g,h])
                Σ hops^p = Σ_h ip_h (Σ_{J_h} u_j − v_h) + Σ ap[g,h] a[g,h]
                ρ ≥ ar[g,h] (F_g + E_h − 1)
                P* ≥ ap[g,h] a[g,h];  R ≥ m_d ad[g,h] a[g,h]
                R ≥ m_d ρ
    symmetry    identical devices of a host, and identical hosts (same devices, same links):
                used ones first; the embedding on the first, the LM head on the first or (after
                the embedding) the second; between two middle devices of a type, the earlier
                holds at least as many layers.

A host's devices of different types are charged their cheapest pair, and alike links their
cheapest; where that differs from the hop the decoded order makes, the simulator's figure of the
decoded plan is higher than the MILP's, the MILP's optimum stays a lower bound, and the search
reports the difference as gap, never hides it. With alike links every host is the same to the
MILP, so hosts with the same devices are interchangeable whatever their measured links.

Decoding: the first device's host first, the last device's host last, the hosts between them
along the cheapest next link; on a host, the first device first, the last device last, and the
devices of one type together.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from planner.cluster import DeviceSpec
from planner.highs_model import Solved, SolveOptions
from planner.milp import PipelineFormulation, QualityForm, Terms
from planner.problem import CostTables

_SAME = 1e-9
LINKS_ALIKE_WITHIN = 0.10
"""Links between hosts whose costs all lie within this fraction of the cheapest are treated
as alike (a measured cluster's links differ by noise): the MILP charges every inter-host hop
the cheapest one, a lower bound, and the decoded plan is scored on its real links."""


@dataclass(frozen=True, slots=True)
class Placement:
    """A decoded solution: the pipeline order (used devices first, as positions of the
    tables' devices) and each used device's layers per precision column."""

    order: tuple[int, ...]
    counts: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class PlacementResult:
    """One solve: the HiGHS run and the decoded placement (None without a point)."""

    solved: Solved
    placement: Placement | None


class PlacementMilp(PipelineFormulation):
    """The formulation of the module docstring for the devices of ``tables`` (any order)."""

    free_order = True

    def __init__(self, tables: CostTables, quality: QualityForm) -> None:
        if quality == "per-layer":
            raise ValueError("the per-layer form needs a fixed device order (PartitionMilp)")
        super().__init__(tables, quality)
        self.hosts = _groups([d.host for d in tables.devices])
        self.classes = _groups([d.class_key for d in tables.devices])
        self.host_of = {j: h for h, members in enumerate(self.hosts) for j in members}
        self.class_of = {j: c for c, members in enumerate(self.classes) for j in members}
        self.intra = {p: self._cheapest_inside(p) for p in ("prefill", "decode", "return")}
        self.arc = {p: self._cheapest_between(p) for p in ("prefill", "decode", "return")}
        self.links_alike = all(_alike(self.arc[p]) for p in self.arc)
        self._build()

    # ---------------------------------------------------------------- host-level costs

    def _pair_costs(self, phase: str) -> np.ndarray:
        t = self.t
        return {"prefill": t.hop_prefill_s, "decode": t.hop_decode_s, "return": t.token_return_s}[
            phase
        ]

    def _cheapest_inside(self, phase: str) -> list[float]:
        costs = self._pair_costs(phase)
        return [
            min((float(costs[a, b]) for a in js for b in js if a != b), default=math.inf)
            for js in self.hosts
        ]

    def _cheapest_between(self, phase: str) -> np.ndarray:
        costs, count = self._pair_costs(phase), len(self.hosts)
        arc = np.full((count, count), math.inf)
        for g, h in itertools.permutations(range(count), 2):
            arc[g, h] = min(float(costs[a, b]) for a in self.hosts[g] for b in self.hosts[h])
        return arc

    def _cheapest_into(self, phase: str, h: int) -> float:
        """Cheapest way into h from another host; with alike links, the cheapest of all."""
        arc = self.arc[phase]
        if self.links_alike:
            return float(np.min(arc))
        return float(min(arc[g, h] for g in range(len(self.hosts)) if g != h))

    # ---------------------------------------------------------------- the order

    def _host_sum(self, name: str, h: int) -> Terms:
        return [(self._v(name, j), 1.0) for j in self.hosts[h]]

    def _entered(self, h: int) -> Terms:
        """v_h − E_h: host h runs a stage and is not the first."""
        return [(self._v("v", h), 1.0)] + [(c, -1.0) for c, _ in self._host_sum("e", h)]

    def _add_order(self) -> None:
        m, hosts = self.m, range(len(self.hosts))
        num = self.t.num_devices
        m.var(("single",), ub=1.0, integer=True)
        m.var(("rho",))
        for h in hosts:
            m.var(("v", h), ub=1.0, integer=True)
            m.var(("m", h), ub=1.0 if len(self.hosts[h]) > 1 else 0.0, integer=True)
        m.row([(self._v("e", j), 1.0) for j in self.devices], lo=1.0, hi=1.0)
        m.row([(self._v("f", j), 1.0) for j in self.devices], lo=1.0, hi=1.0)
        single = self._v("single")
        for j in self.devices:
            m.row([(self._v("e", j), 1.0), (self._v("f", j), 1.0), (single, -1.0)], hi=1.0)
        m.row([(self._v("u", j), 1.0) for j in self.devices] + [(single, num - 1.0)], hi=num)
        for h in hosts:
            self._add_host(h)
        if self.links_alike:
            self._add_alike_links()
        else:
            self._add_host_path()
        rnd, md = self._v("R"), float(self.t.decode_micro_batches)
        m.row([(rnd, 1.0), (self._v("rho"), -md)], lo=0.0)
        self._break_symmetry()

    def _add_host(self, h: int) -> None:
        m, v, size = self.m, self._v("v", h), len(self.hosts[h])
        used = self._host_sum("u", h)
        for j in self.hosts[h]:
            m.row([(v, 1.0), (self._v("u", j), -1.0)], lo=0.0)
        m.row([*used, (v, -1.0)], lo=0.0)
        m.row([*used, (v, -1.0), (self._v("m", h), 1.0 - size)], hi=0.0)
        ends = self._host_sum("e", h) + self._host_sum("f", h)
        others = [(self._v("v", g), 1.0) for g in range(len(self.hosts))]
        spread = float(len(self.hosts) - 1)
        m.row(others + [(c, spread) for c, _ in ends], hi=1.0 + 2 * spread)
        returned = self.intra["return"][h]
        if math.isfinite(returned):  # both ends on h, two stages or more: a return inside h
            both = [(c, -returned) for c, _ in ends] + [(self._v("m", h), -returned)]
            m.row([(self._v("rho"), 1.0), *both], lo=-2 * returned)
        pmax, rnd, md = self._v("Pmax"), self._v("R"), float(self.t.decode_micro_batches)
        for var, phase, scale in ((pmax, "prefill", 1.0), (rnd, "decode", md)):
            cost = self.intra[phase][h]
            if math.isfinite(cost):
                m.row([(var, 1.0), (self._v("m", h), -scale * cost)], lo=0.0)

    def _add_alike_links(self) -> None:
        m, hosts = self.m, range(len(self.hosts))
        if len(self.hosts) < 2:
            return
        pmax, rnd, md = self._v("Pmax"), self._v("R"), float(self.t.decode_micro_batches)
        for h in hosts:
            for var, phase, scale in ((pmax, "prefill", 1.0), (rnd, "decode", md)):
                cost = scale * self._cheapest_into(phase, h)
                m.row([(var, 1.0)] + [(c, -cost * x) for c, x in self._entered(h)], lo=0.0)
        back = self._cheapest_into("return", 0)
        for h in hosts:  # a host entered from another: the ends are on different hosts
            m.row([(self._v("rho"), 1.0)] + [(c, -back * x) for c, x in self._entered(h)], lo=0.0)

    def _add_host_path(self) -> None:
        m, count = self.m, len(self.hosts)
        pmax, rnd, md = self._v("Pmax"), self._v("R"), float(self.t.decode_micro_batches)
        for h in range(count):
            m.var(("o", h), ub=float(count - 1))
        for g, h in itertools.permutations(range(count), 2):
            a = m.var(("a", g, h), ub=1.0, integer=True)
            m.row(
                [(self._v("o", h), 1.0), (self._v("o", g), -1.0), (a, -float(count))],
                lo=1.0 - count,
            )
            m.row([(pmax, 1.0), (a, -float(self.arc["prefill"][g, h]))], lo=0.0)
            m.row([(rnd, 1.0), (a, -md * float(self.arc["decode"][g, h]))], lo=0.0)
            back = float(self.arc["return"][g, h])
            ends = [(c, -back) for c, _ in self._host_sum("f", g) + self._host_sum("e", h)]
            m.row([(self._v("rho"), 1.0), *ends], lo=-back)
        for h in range(count):
            into = [(self._v("a", g, h), 1.0) for g in range(count) if g != h]
            m.row(into + [(c, -x) for c, x in self._entered(h)], lo=0.0, hi=0.0)
            out = [(self._v("a", h, g), 1.0) for g in range(count) if g != h]
            left = [(self._v("v", h), -1.0)] + [(c, 1.0) for c, _ in self._host_sum("f", h)]
            m.row(out + left, lo=0.0, hi=0.0)

    def _hop_terms(self, phase: Literal["prefill", "decode"]) -> Terms:
        terms: Terms = []
        for h, members in enumerate(self.hosts):
            cost = self.intra[phase][h]
            if math.isfinite(cost):
                terms += [(self._v("u", j), cost) for j in members] + [(self._v("v", h), -cost)]
        if len(self.hosts) < 2:
            return terms
        if self.links_alike:
            for h in range(len(self.hosts)):
                cost = self._cheapest_into(phase, h)
                terms += [(c, cost * x) for c, x in self._entered(h)]
            return terms
        arc = self.arc[phase]
        return terms + [
            (self._v("a", g, h), float(arc[g, h]))
            for g, h in itertools.permutations(range(len(self.hosts)), 2)
        ]

    def _return_terms(self) -> Terms:
        return [(self._v("rho"), 1.0)]

    # ---------------------------------------------------------------- symmetry

    def _break_symmetry(self) -> None:
        for members in self.classes:
            self._order_alike([[j] for j in members], counts=True)
        for group in self._identical_hosts():
            self._order_alike([self.hosts[h] for h in group], counts=False)

    def _order_alike(self, units: Sequence[Sequence[int]], counts: bool) -> None:
        """Interchangeable units (devices, or hosts as device lists), canonical order: used
        first; the embedding on the first; the LM head on the first or, after the embedding,
        the second; middle devices by falling layer count."""
        m, big = self.m, float(self.num_layers)

        def total(unit: Sequence[int], name: str) -> Terms:
            return [(self._v(name, j), 1.0) for j in unit]

        for i, unit in enumerate(units):
            for j in unit:
                if i >= 1:
                    m.ub[self._v("e", j)] = 0.0
                if i >= 2:
                    m.ub[self._v("f", j)] = 0.0
            if i + 1 >= len(units):
                continue
            nxt = units[i + 1]
            if counts:
                m.row(total(unit, "u") + [(c, -1.0) for c, _ in total(nxt, "u")], lo=0.0)
                loose = total(unit, "e") + total(unit, "f") if i == 0 else total(unit, "f")
                layers = [t for j in unit for t in self._layer_total(j)]
                later = [(c, -v) for j in nxt for c, v in self._layer_total(j)]
                slack = [(c, big) for c, _ in loose] if i <= 1 else []
                m.row(layers + later + slack, lo=0.0)
            else:
                first, second = self.host_of[unit[0]], self.host_of[nxt[0]]
                m.row([(self._v("v", first), 1.0), (self._v("v", second), -1.0)], lo=0.0)
        if len(units) >= 2:
            m.row(total(units[1], "f") + [(c, -1.0) for c, _ in total(units[0], "e")], hi=0.0)

    def _identical_hosts(self) -> list[list[int]]:
        """Groups of hosts with the same devices (type by type) and the same links."""
        groups: list[list[int]] = []
        for h, members in enumerate(self.hosts):
            kinds = [self.t.devices[j].type for j in members]
            for group in groups:
                g = group[0]
                same_links = self.links_alike or self._same_links(g, h)
                if [self.t.devices[j].type for j in self.hosts[g]] == kinds and same_links:
                    group.append(h)
                    break
            else:
                groups.append([h])
        return [g for g in groups if len(g) > 1]

    def _same_links(self, g: int, h: int) -> bool:
        for arc in self.arc.values():
            for x in range(len(self.hosts)):
                if x in (g, h):
                    continue
                if not (_close(arc[x, g], arc[x, h]) and _close(arc[g, x], arc[h, x])):
                    return False
            if not _close(arc[g, h], arc[h, g]):
                return False
        return True

    # ---------------------------------------------------------------- solving

    def solve(self, options: SolveOptions) -> PlacementResult:
        """Solve with HiGHS; never raises on infeasibility (the status says it)."""
        solved = self._run(options)
        placement = self._decode(solved.point) if solved.point is not None else None
        return PlacementResult(solved, placement)

    def _decode(self, x: np.ndarray) -> Placement:
        used = [j for j in self.devices if x[self._v("u", j)] > 0.5]
        first = next(j for j in self.devices if x[self._v("e", j)] > 0.5)
        last = next(j for j in self.devices if x[self._v("f", j)] > 0.5)
        hosts = self._host_order(x, self.host_of[first], self.host_of[last], used)
        order: list[int] = []
        for h in hosts:
            order += self._inside([j for j in self.hosts[h] if j in used], first, last)
        order += [j for j in self.devices if j not in order]
        counts = tuple(self._counts(x, j) for j in order[: len(used)])
        return Placement(tuple(order), counts)

    def _host_order(self, x: np.ndarray, first: int, last: int, used: Sequence[int]) -> list[int]:
        running = sorted({self.host_of[j] for j in used})
        if self.links_alike or len(running) == 1:
            middle = [h for h in running if h not in (first, last)]
            return [first, *self._nearest_first(first, middle)] + ([last] if last != first else [])
        order = [first]
        while order[-1] != last:
            here = order[-1]
            order.append(next(h for h in running if h != here and x[self._v("a", here, h)] > 0.5))
        return order

    def _nearest_first(self, start: int, hosts: list[int]) -> list[int]:
        """``hosts`` as a path from ``start``, each step to the nearest host left (the MILP
        charged every link alike; their real costs may differ a little)."""
        path, here, left = [], start, list(hosts)
        while left:
            here = min(left, key=lambda h: (self.arc["prefill"][here, h], h))
            left.remove(here)
            path.append(here)
        return path

    def _inside(self, used: list[int], first: int, last: int) -> list[int]:
        """A host's used devices: the first device first, the last last, types together (the
        first device's type leading, the last device's type closing)."""
        head = [first] if first in used else []
        tail = [last] if last in used and last != first else []
        lead, close = self.class_of[first], self.class_of[last]

        def rank(j: int) -> tuple[bool, bool, int, int]:
            kind = self.class_of[j]
            return (not (head and kind == lead), bool(tail) and kind == close, kind, j)

        middle = sorted((j for j in used if j not in head + tail), key=rank)
        return head + middle + tail


def _groups(keys: Sequence[object]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance."""
    groups: dict[object, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _close(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= _SAME * max(abs(a), abs(b), 1e-12)


def _alike(arc: np.ndarray) -> bool:
    values = [float(v) for v in arc.flat if math.isfinite(v)]
    return not values or max(values) <= min(values) * (1 + LINKS_ALIKE_WITHIN) + 1e-15


def devices_in(tables: CostTables, placement: Placement) -> tuple[DeviceSpec, ...]:
    """The devices of ``tables`` in the placement's order."""
    return tuple(tables.devices[j] for j in placement.order)
