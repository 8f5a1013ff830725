"""Planning for the dashboard: the cluster is resolved once, then every "what if" re-plans.

Resolving this host measures its CPU (about a second), so :class:`PlanningSession` keeps the
resolved cluster and the models it has read, and builds each new problem from them the way
:func:`pqctl.plan_inputs.build_problem` does. The search itself runs in a child process
(:mod:`pqctl.tui.solver_process`), so that a cancelled one stops using the CPU at once.
Everything here blocks: the dashboard calls it from a thread worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from planner.cost_model import default_group_size
from planner.model_spec import ModelSpec
from planner.plan import Plan
from planner.problem import PlanningProblem
from planner.profiles import LatencyProfile, load_profiles
from planner.search import ProgressFn, SearchOptions
from pqctl.plan_inputs import (
    PlanRequest,
    PplTarget,
    ResolvedCluster,
    figures_source,
    problem_on,
    record_ppl_target,
    resolve_calibration,
    resolve_cluster,
    resolve_model,
)
from pqctl.tui.solver_process import SolverProcess
from runtime.model.assets import BUILTIN_MODEL_NAME


@dataclass(frozen=True, slots=True)
class SolvedPlan:
    """A plan and what the dashboard shows beside it.

    Attributes:
        plan: the validated plan (its notes include the cluster's notes).
        sources: per device key, "profile" or "datasheet" (where its latency figures come from).
        elapsed_s: wall time of building the problem and searching, seconds.
    """

    plan: Plan
    sources: dict[str, str]
    elapsed_s: float


class PlanningSession:
    """One cluster (a file, or this host) and the models planned on it; thread-safe."""

    def __init__(
        self,
        cluster_file: Path | None = None,
        profile_dir: Path | None = None,
        ray: str | None = None,
    ) -> None:
        self.cluster_file, self.ray = cluster_file, ray
        self.profile_dir = profile_dir
        self._lock = threading.Lock()
        self._resolved: ResolvedCluster | None = None
        self._models: dict[str, ModelSpec] = {}
        self._profiles: list[LatencyProfile] | None = None
        self.solver = SolverProcess()

    def close(self) -> None:
        """Stop the solver process (a later solve starts a new one)."""
        self.solver.close()

    def resolved(self) -> ResolvedCluster:
        """The cluster (resolved on first use; measuring this host takes about a second).

        Raises:
            PlannerError: the cluster file is unreadable or breaks the format.
        """
        with self._lock:
            if self._resolved is None:
                self._resolved = resolve_cluster(self.cluster_file, self.ray)
            return self._resolved

    def default_model(self) -> str:
        """The model the cluster file suggests, else the built-in one."""
        return self.resolved().model or BUILTIN_MODEL_NAME

    def model(self, name: str | None) -> ModelSpec:
        """The model's shape, read once per name."""
        key = name or self.default_model()
        with self._lock:
            if key not in self._models:
                self._models[key] = resolve_model(key)
            return self._models[key]

    def profiles(self) -> list[LatencyProfile]:
        with self._lock:
            if self._profiles is None:
                self._profiles = load_profiles(self.profile_dir)
            return self._profiles

    def problem(self, request: PlanRequest) -> tuple[PlanningProblem, PplTarget | None, list[str]]:
        """The planning problem of ``request`` on this session's cluster, its perplexity target
        and notes on the quality indicator (:func:`pqctl.plan_inputs.problem_on`).

        Raises:
            PlannerError: a bad model, workload, quality target or excluded device.
        """
        return problem_on(request, self.resolved(), self.model(request.model), self.profiles())

    def has_ppl_mapping(self, model: str | None = None) -> bool:
        """Whether calibration with a perplexity mapping exists for ``model`` (then the quality
        target can be a perplexity increase)."""
        spec = self.model(model)
        calibration = resolve_calibration(spec, None, default_group_size(spec))
        return calibration is not None and calibration.mapping is not None

    def sources(self, model: str | None = None) -> dict[str, str]:
        """Per device of the whole cluster: "profile" or "datasheet" for ``model``."""
        problem, _, _ = self.problem(PlanRequest(model=model))
        return figures_source(problem)

    def solve(
        self,
        request: PlanRequest,
        options: SearchOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
    ) -> SolvedPlan:
        """Build the problem and search it in the solver process (blocks until the plan, an
        error, or shortly after ``cancel`` is set).

        Raises:
            PlannerError: bad input, or no feasible plan (InfeasiblePlanError says why);
                SolveCancelledError once ``cancel`` is set.
            SolverProcessError: the solver process died.
        """
        started = time.perf_counter()
        problem, target, notes = self.problem(request)
        options = options or SearchOptions(time_limit_s=30.0)
        plan = self.solver.solve(problem, options, progress, cancel)
        plan = record_ppl_target(plan, target)
        plan = replace(plan, notes=plan.notes + self.resolved().notes + tuple(notes))
        return SolvedPlan(plan, figures_source(problem), time.perf_counter() - started)


class SolveJob:
    """One search on a daemon thread, so that the dashboard never waits for it, not even at
    exit; :meth:`cancel` stops it (its process stops computing within a second). Read
    ``result`` or ``error`` once ``done`` is set."""

    def __init__(
        self, session: PlanningSession, request: PlanRequest, progress: ProgressFn | None = None
    ) -> None:
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.result: SolvedPlan | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(session, request, progress), name="pqctl-solve", daemon=True
        )
        self._thread.start()

    def _run(
        self, session: PlanningSession, request: PlanRequest, progress: ProgressFn | None
    ) -> None:
        try:
            self.result = session.solve(request, progress=progress, cancel=self.cancelled)
        except BaseException as exc:  # handed to the waiting worker, which reports it
            self.error = exc
        finally:
            self.done.set()

    def cancel(self) -> None:
        """Stop the search: it ends with SolveCancelledError shortly."""
        self.cancelled.set()
