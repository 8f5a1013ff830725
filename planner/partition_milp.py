"""The formulation of :mod:`planner.milp` over the devices in a fixed order, in all three
quality forms: count, free assignment (optionally with every stage's size fixed), and per layer
(units of single layers or groups, with contiguity on cumulative positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from planner.arrangement import best_arrangement
from planner.highs_model import SolveOptions
from planner.milp import MilpResult, PipelineFormulation, QualityForm, Terms
from planner.problem import CostTables
from planner.simulator import StageAssignment


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
            if j + 1 < t.num_devices and self.interchangeable[j] and not self.stage_sizes:
                self._break_symmetry(j)  # fixed sizes tell identical devices apart already
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
        return MilpResult(solved, stages)

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
