"""Errors the planner raises. Each carries a short ``title`` and a message saying what to do."""

from __future__ import annotations


class PlannerError(Exception):
    """Base class of every error the planner raises on bad input or an unsolvable instance."""

    title = "planning failed"

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


class ClusterFileError(PlannerError):
    """A cluster file is unreadable or breaks the format; the message names file and field."""

    title = "bad cluster file"


class ModelConfigError(PlannerError):
    """A model config is missing, unreadable, of an unsupported family or lacks a field."""

    title = "bad model config"


class ProfileError(PlannerError):
    """A latency profile or statistics file is unreadable or breaks the format."""

    title = "bad profile"


class WorkloadError(PlannerError):
    """The workload or quality target is out of range (names the option)."""

    title = "bad workload"


class InfeasiblePlanError(PlannerError):
    """No plan fits the cluster under the workload and quality target; says why."""

    title = "no feasible plan"


class SolveCancelledError(PlannerError):
    """The search was cancelled (``SearchOptions.cancel`` was set) before it finished."""

    title = "solve cancelled"
