"""Every message the dashboard's workers and views exchange.

Workers post these from threads (``post_message`` is thread-safe); telemetry messages define
``can_replace`` so that a burst collapses to the newest reading.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from textual.message import Message

from planner.plan import Plan
from pqctl.plan_inputs import ResolvedCluster
from pqctl.tui.launch import Launched
from pqctl.tui.telemetry import DeviceSample


@dataclass
class ClusterResolved(Message):
    """The cluster is known (or could not be read: ``error``)."""

    resolved: ResolvedCluster | None
    sources: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    ppl_target: bool = False  # the default model has calibration with a perplexity mapping


@dataclass
class DeviceSamples(Message):
    """A reading of every device of this host, by device key."""

    samples: dict[str, DeviceSample]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DeviceSamples)


@dataclass
class ExclusionChanged(Message):
    """The operator included or excluded a device from planning."""

    excluded: frozenset[str]


@dataclass
class SolveProgress(Message):
    """``done`` of ``total`` MILPs of solve number ``generation`` are finished."""

    generation: int
    done: int
    total: int

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SolveProgress) and message.generation == self.generation


@dataclass
class PlanReady(Message):
    """A plan to show: solved (``sources`` known) or loaded from a file."""

    plan: Plan
    sources: dict[str, str]
    origin: str
    """"solved in 0.41 s", "loaded from plan.json"..."""


@dataclass
class SolveFinished(Message):
    """Solve number ``generation`` ended: a plan, or the error that stopped it."""

    generation: int
    plan: Plan | None = None
    sources: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0
    error_title: str = ""
    error: str = ""


@dataclass
class DeploymentStarted(Message):
    """The gateway of the dashboard's deployment is up (its stages may still be loading)."""

    launched: Launched


@dataclass
class DeploymentFailed(Message):
    """Launching failed, or the deployment died."""

    error: str


@dataclass
class DeploymentStopped(Message):
    """The dashboard's deployment is gone (``clean``: it shut down on request)."""

    clean: bool


@dataclass
class DeploymentSnapshot(Message):
    """The latest gateway status and per-stage metrics (``exit_code``: the gateway exited)."""

    status: dict[str, Any] | None
    metrics: dict[int, dict[str, Any]]
    exit_code: int | None = None

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DeploymentSnapshot) and message.exit_code is None


@dataclass
class TokensArrived(Message):
    """Streamed text of prompt ``index`` of send number ``request``."""

    request: int
    text: str
    index: int = 0


@dataclass
class GenerationEnded(Message):
    """Prompt ``index`` of send number ``request`` finished (``usage`` and ``finish_reason``)
    or failed (``error``)."""

    request: int
    finish_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    index: int = 0


@dataclass
class EndpointChanged(Message):
    """The dashboard's deployment started serving at ``endpoint`` (None: it stopped)."""

    endpoint: str | None
    name: str = ""
    max_new_tokens: int = 0
