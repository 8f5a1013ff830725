"""Planning for the dashboard: the cluster is resolved once, then every "what if" re-plans.

Resolving this host measures its CPU (about a second), so :class:`PlanningSession` keeps the
resolved cluster and the models it has read, and builds each new problem from them the way
:func:`pqctl.planning.build_problem` does. Everything here blocks: the dashboard calls it from a
thread worker.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from planner.cost_model import default_group_size
from planner.errors import WorkloadError
from planner.make_plan import make_plan
from planner.model_spec import ModelSpec
from planner.plan import Plan
from planner.problem import PlanningProblem
from planner.profiles import LatencyProfile, load_profiles
from planner.search import ProgressFn, SearchOptions
from pqctl.planning import (
    PlanRequest,
    ResolvedCluster,
    figures_source,
    resolve_cluster,
    resolve_indicator,
    resolve_model,
    resolve_workload,
)
from runtime.assets import BUILTIN_MODEL_NAME


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

    def __init__(self, cluster_file: Path | None = None, profile_dir: Path | None = None) -> None:
        self.cluster_file = cluster_file
        self.profile_dir = profile_dir
        self._lock = threading.Lock()
        self._resolved: ResolvedCluster | None = None
        self._models: dict[str, ModelSpec] = {}
        self._profiles: list[LatencyProfile] | None = None

    def resolved(self) -> ResolvedCluster:
        """The cluster (resolved on first use; measuring this host takes about a second).

        Raises:
            PlannerError: the cluster file is unreadable or breaks the format.
        """
        with self._lock:
            if self._resolved is None:
                self._resolved = resolve_cluster(self.cluster_file)
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

    def problem(self, request: PlanRequest) -> PlanningProblem:
        """The planning problem of ``request`` on this session's cluster.

        Raises:
            PlannerError: a bad model, workload, quality target or excluded device.
        """
        resolved = self.resolved()
        model = self.model(request.model)
        group_size = default_group_size(model) if request.group_size is None else request.group_size
        keys = {d.key for d in resolved.cluster.devices}
        unknown = [k for k in request.exclude if k not in keys]
        if unknown:
            raise WorkloadError(f'no device "{unknown[0]}"; devices: {", ".join(sorted(keys))}')
        if len(set(request.exclude)) >= len(keys):
            raise WorkloadError("every device is excluded: include at least one (x on Cluster)")
        return PlanningProblem(
            model=model,
            cluster=resolved.cluster.without(request.exclude),
            workload=resolve_workload(request, resolved.workload),
            indicator=resolve_indicator(model, request.stats_file, group_size),
            bits=tuple(sorted(set(request.bits), reverse=True)),
            quality_budget=request.quality,
            theta_s=request.theta_s,
            group_size=group_size,
            profiles=tuple(self.profiles()),
        )

    def sources(self, model: str | None = None) -> dict[str, str]:
        """Per device of the whole cluster: "profile" or "datasheet" for ``model``."""
        problem = self.problem(PlanRequest(model=model))
        return figures_source(problem)

    def solve(
        self,
        request: PlanRequest,
        options: SearchOptions | None = None,
        progress: ProgressFn | None = None,
    ) -> SolvedPlan:
        """Build the problem and search it (blocks; cannot be interrupted mid-MILP).

        Raises:
            PlannerError: bad input, or no feasible plan (InfeasiblePlanError says why).
        """
        started = time.perf_counter()
        problem = self.problem(request)
        plan = make_plan(problem, options or SearchOptions(time_limit_s=30.0), progress)
        plan = replace(plan, notes=plan.notes + self.resolved().notes)
        return SolvedPlan(plan, figures_source(problem), time.perf_counter() - started)


class SolveJob:
    """One search on a daemon thread, so that an abandoned search (HiGHS cannot be interrupted
    mid-MILP) never holds up the dashboard, not even its exit. Read ``result`` or ``error``
    once ``done`` is set."""

    def __init__(
        self, session: PlanningSession, request: PlanRequest, progress: ProgressFn | None = None
    ) -> None:
        self.done = threading.Event()
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
            self.result = session.solve(request, progress=progress)
        except BaseException as exc:  # handed to the waiting worker, which reports it
            self.error = exc
        finally:
            self.done.set()
