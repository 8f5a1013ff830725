"""HiGHS plumbing shared by the planner's MILPs: a sparse model built as plain arrays, the
solver settings, and what a solve reports (status, best point, objective, bound, gap).

Every MILP of the planner is built column by column and row by row into :class:`SparseModel`,
then handed to HiGHS in bulk (``addVars``/``addRows`` over numpy arrays), never as Python
expression trees.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import highspy
import numpy as np
from highspy.highs import HighsCallbackEvent

INF = highspy.kHighsInf
GIB = float(1024**3)


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


@dataclass(frozen=True, slots=True)
class SolveOptions:
    """Solver settings: time limit (s), relative MIP gap, incumbent cutoff, log output, and
    ``cancel``: once set, HiGHS stops at its next interrupt check (status "Interrupted by
    user"), through its simplex, IPM and MIP interrupt callbacks."""

    time_limit_s: float = 10.0
    mip_rel_gap: float = 1e-4
    cutoff: float = math.inf
    verbose: bool = False
    cancel: threading.Event | None = None


@dataclass(frozen=True, slots=True)
class Solved:
    """What one HiGHS run left: status name, the point (None without one), objective, dual
    bound (-inf when HiGHS has none, +inf when nothing lies below the cutoff), seconds."""

    status: str
    point: np.ndarray | None
    objective: float
    dual_bound: float
    time_s: float

    @property
    def finished(self) -> bool:
        """The solver proved its answer (optimal within the gap, infeasible, or cut off)."""
        return self.status in ("Optimal", "Infeasible", "Bound on objective reached")


class SparseModel:
    """Columns keyed by domain tuples and sparse rows, collected as plain lists."""

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
        ub: float = INF,
        cost: float = 0.0,
        integer: bool = False,
    ) -> int:
        """Add a column under ``key``; returns its index."""
        self.index[key] = len(self.lb)
        self.lb.append(lb)
        self.ub.append(ub)
        self.cost.append(cost)
        self.integer.append(integer)
        return self.index[key]

    def row(self, terms: Iterable[tuple[int, float]], lo: float = -INF, hi: float = INF) -> None:
        """Add lo ≤ Σ value·column ≤ hi; repeated columns are summed, zeros dropped."""
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

    @property
    def num_rows(self) -> int:
        """Rows added so far."""
        return len(self.row_lo)

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

    def solve(
        self,
        options: SolveOptions,
        integer: Sequence[bool] | None = None,
        warm: Mapping[int, float] | None = None,
        solver: str = "choose",
    ) -> Solved:
        """Run HiGHS on the model (one thread, fixed seed); never raises on infeasibility."""
        h = highspy.Highs()  # type: ignore[no-untyped-call]
        h.setOptionValue("output_flag", options.verbose)
        for name, value in (
            ("time_limit", max(options.time_limit_s, 1e-3)),
            ("mip_rel_gap", options.mip_rel_gap),
            ("mip_abs_gap", 0.0),
            ("threads", 1),
            ("random_seed", 0),
            ("solver", solver),
        ):
            h.setOptionValue(name, value)
        if options.cancel is not None:
            _interrupt_on(h, options.cancel)
        self.to_highs(h, integer)
        if math.isfinite(options.cutoff):
            self._add_cutoff_row(h, options.cutoff)
        if warm:
            cols = np.array(list(warm), dtype=np.int32)
            h.setSolution(len(cols), cols, np.array([warm[c] for c in warm], dtype=float))
        start = time.perf_counter()
        h.run()
        return _solved(h, time.perf_counter() - start, any(integer or self.integer))

    def _add_cutoff_row(self, h: highspy.Highs, cutoff: float) -> None:
        """Objective ≤ cutoff as a row: nothing at or above an incumbent is worth finding.
        (HiGHS's own ``objective_bound`` option does not prune a MILP solved at the root.)"""
        cols = np.array([i for i, c in enumerate(self.cost) if c != 0.0], dtype=np.int32)
        h.addRow(-INF, cutoff, len(cols), cols, np.array([self.cost[i] for i in cols]))

    def relaxation(self) -> Solved:
        """The LP relaxation (every column continuous), by simplex: its point is a vertex."""
        return self.solve(
            SolveOptions(time_limit_s=INF), integer=[False] * len(self.lb), solver="simplex"
        )


def _interrupt_on(h: highspy.Highs, cancel: threading.Event) -> None:
    """Make ``h`` stop at its next interrupt check once ``cancel`` is set."""

    def interrupt(event: HighsCallbackEvent) -> None:
        if cancel.is_set():
            event.interrupt()

    h.cbSimplexInterrupt += interrupt
    h.cbIpmInterrupt += interrupt
    h.cbMipInterrupt += interrupt


def _solved(h: highspy.Highs, elapsed: float, mip: bool) -> Solved:
    status = h.getModelStatus()
    info = h.getInfo()
    has_point = info.primal_solution_status == 2
    objective = float(info.objective_function_value) if has_point else math.inf
    if status in (highspy.HighsModelStatus.kInfeasible, highspy.HighsModelStatus.kObjectiveBound):
        bound = math.inf  # nothing below the cutoff, or nothing at all
    elif not mip:
        bound = objective if status == highspy.HighsModelStatus.kOptimal else -math.inf
    else:
        bound = float(info.mip_dual_bound)
        if not math.isfinite(bound) or bound <= -INF:
            bound = -math.inf
    point = np.array(h.getSolution().col_value) if has_point else None
    return Solved(h.modelStatusToString(status), point, objective, bound, elapsed)
