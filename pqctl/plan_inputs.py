"""Turning command-line choices into a planning problem: model, cluster, workload, quality.

Shared by the CLI and the dashboard, so both resolve defaults the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from planner.catalogue import find_device_type
from planner.cluster import ClusterSpec, DeviceType
from planner.cluster_file import load_cluster_file
from planner.cost_model import default_group_size
from planner.errors import PlannerError, WorkloadError
from planner.indicator import QualityIndicator, prior_indicator
from planner.local_host import local_cluster
from planner.model_spec import ModelSpec, load_model_spec
from planner.plan import ALL_BITS, Plan, Workload
from planner.problem import PlanningProblem
from planner.profiles import LatencyProfile, load_profiles
from planner.quality_target import Calibration, PplMapping, default_stats_path, load_calibration
from runtime.cluster.discovery import discover_gpus
from runtime.model.assets import BUILTIN_MODEL_NAME, builtin_model_dir

DEFAULT_WORKLOAD = {"batch": 8, "prompt_len": 128, "max_new": 64}
"""Workload used when neither the options nor the cluster file give one."""


@dataclass(frozen=True)
class PlanRequest:
    """What the operator asked for; None means "use the default"."""

    model: str | None = None
    cluster_file: Path | None = None
    ray: str | None = None
    batch: int | None = None
    prompt_len: int | None = None
    max_new: int | None = None
    expected_new: int | None = None
    quality: float | None = 0.05
    max_ppl_increase: float | None = None
    theta_s: float = 0.0
    bits: tuple[int, ...] = ALL_BITS
    group_size: int | None = None
    stats_file: Path | None = None
    profile_dir: Path | None = None
    exclude: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class ResolvedCluster:
    """A cluster, where it came from, and the model/workload its file suggests."""

    cluster: ClusterSpec
    source: str
    model: str | None
    workload: Mapping[str, int]
    notes: tuple[str, ...] = ()
    ppl_target: PplTarget | None = None


@dataclass(frozen=True)
class PplTarget:
    """A perplexity target and the calibrated mapping that turned it into an ω budget."""

    max_increase: float
    mapping: PplMapping


def resolve_model(name: str | None) -> ModelSpec:
    """The model to plan: a path, hub id or example name; the built-in model by default."""
    if name is None or name == BUILTIN_MODEL_NAME:
        return replace(load_model_spec(builtin_model_dir()), source=BUILTIN_MODEL_NAME)
    return load_model_spec(name)


def local_gpu_types() -> tuple[list[DeviceType], list[str]]:
    """Catalogue types of this host's NVIDIA GPUs (with their real memory), and notes."""
    found = discover_gpus()
    if found.reason:
        return [], [f"no GPU: {found.reason}; planning on the CPU"]
    types, notes = [], []
    for gpu in found.gpus:
        known = find_device_type(gpu.name)
        if known is None:
            notes.append(
                f'GPU {gpu.index} "{gpu.name}" is not in the catalogue; skipped '
                "(describe it in a cluster file with explicit figures)"
            )
            continue
        types.append(replace(known, memory_bytes=gpu.memory_total_bytes))
    return types, notes


class RayInventoryError(PlannerError):
    """The Ray cluster could not be inventoried (Ray missing, not reachable, a node silent)."""

    title = "Ray cluster"


def resolve_cluster(
    cluster_file: Path | None,
    ray: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> ResolvedCluster:
    """The cluster file's cluster, every node of the Ray cluster at ``ray``, or this host (its
    GPUs, else its CPU)."""
    if ray is not None:
        if cluster_file is not None:
            raise RayInventoryError("--ray and --cluster exclude each other")
        from pqctl.ray_inventory import ray_inventory
        from runtime.cluster.ray_nodes import RayClusterError

        try:
            found = ray_inventory(ray, progress)
        except RayClusterError as exc:
            raise RayInventoryError(str(exc)) from exc
        return ResolvedCluster(
            found.cluster, f"Ray cluster at {found.address}", None, {}, found.notes
        )
    if cluster_file is not None:
        loaded = load_cluster_file(cluster_file)
        return ResolvedCluster(loaded.cluster, str(cluster_file), loaded.model, loaded.workload)
    gpus, notes = local_gpu_types()
    return ResolvedCluster(local_cluster(gpus=gpus), "this host", None, {}, tuple(notes))


def resolve_workload(request: PlanRequest, suggested: Mapping[str, int]) -> Workload:
    """Options first, then the cluster file's [workload], then the defaults."""

    def pick(option: int | None, key: str) -> int:
        if option is not None:
            return option
        return int(suggested.get(key, DEFAULT_WORKLOAD.get(key, 0)))

    max_new = pick(request.max_new, "max_new")
    expected = (
        request.expected_new
        if request.expected_new is not None
        else int(suggested.get("expected_new", max_new))
    )
    return Workload(
        pick(request.batch, "batch"), pick(request.prompt_len, "prompt_len"), max_new, expected
    )


SHIPPED_STATS = "calibration.json"
"""Calibration statistics shipped beside the built-in model's weights."""


def find_stats_file(model: ModelSpec, stats_file: Path | None) -> Path | None:
    """``stats_file`` when given; else the model's file in the default statistics directory
    (``pqctl calibrate`` writes it); else, for the built-in model, the shipped one."""
    if stats_file is not None:
        return stats_file
    default = default_stats_path(model.source)
    if default.is_file():
        return default
    shipped = builtin_model_dir() / SHIPPED_STATS
    if model.source == BUILTIN_MODEL_NAME and shipped.is_file():
        return shipped
    return None


def resolve_calibration(
    model: ModelSpec, stats_file: Path | None, group_size: int
) -> Calibration | None:
    """The model's calibration statistics (:func:`find_stats_file`), or None. A file given
    with ``stats_file`` must match ``group_size``; one found by itself is skipped if not."""
    found = find_stats_file(model, stats_file)
    if found is None:
        return None
    calibration = load_calibration(found, model, group_size if stats_file else None)
    return calibration if calibration.group_size == group_size else None


def resolve_indicator(
    model: ModelSpec, stats_file: Path | None, group_size: int
) -> QualityIndicator:
    """Calibration statistics when given or found, else the documented prior."""
    calibration = resolve_calibration(model, stats_file, group_size)
    return prior_indicator(model, group_size) if calibration is None else calibration.indicator


def _quality(
    request: PlanRequest, model: ModelSpec, group_size: int
) -> tuple[QualityIndicator, float | None, PplTarget | None, list[str]]:
    """Indicator, Σω budget, perplexity target and the notes saying where they came from."""
    calibration = resolve_calibration(model, request.stats_file, group_size)
    if calibration is None:
        indicator = prior_indicator(model, group_size)
        notes = [
            "quality indicator: the prior (no calibration statistics for this model and "
            "group size; "
            "run pqctl calibrate)"
        ]
    else:
        indicator = calibration.indicator
        notes = [f"quality indicator: {indicator.name}, from {calibration.path}"]
    if request.max_ppl_increase is None:
        return indicator, request.quality, None, notes
    if calibration is None or calibration.mapping is None:
        where = "no calibration statistics" if calibration is None else "statistics without"
        raise WorkloadError(
            f"--max-ppl-increase: {where} a perplexity mapping for {model.source}; run "
            f"pqctl calibrate --model {model.source} (or pass --stats with a file it wrote)"
        )
    mapping = calibration.mapping
    budget = min(1.0, mapping.omega_budget(request.max_ppl_increase))
    notes.append(
        f"--max-ppl-increase {request.max_ppl_increase:.2%}: Σω ≤ {budget:.4f} under the "
        f"calibrated mapping ln(ppl/ppl16) = {mapping.slope:.4g}·Σω"
    )
    return indicator, budget, PplTarget(request.max_ppl_increase, mapping), notes


def record_ppl_target(plan: Plan, target: PplTarget | None) -> Plan:
    """The plan with its perplexity target and the mapping's prediction recorded."""
    if target is None:
        return plan
    predicted = target.mapping.predicted_increase(plan.quality.omega_sum)
    quality = replace(
        plan.quality, max_ppl_increase=target.max_increase, predicted_ppl_increase=predicted
    )
    return replace(plan, quality=quality)


def _check_excluded(cluster: ClusterSpec, exclude: Sequence[str]) -> ClusterSpec:
    keys = {d.key for d in cluster.devices}
    for key in exclude:
        if key not in keys:
            raise WorkloadError(f'--exclude: no device "{key}"; devices: {", ".join(sorted(keys))}')
    if keys and keys <= set(exclude):
        raise WorkloadError("--exclude: every device is excluded; keep at least one")
    return cluster.without(exclude)


def build_problem(
    request: PlanRequest, progress: Callable[[str], None] | None = None
) -> tuple[PlanningProblem, ResolvedCluster]:
    """Resolve every input of ``request`` into a planning problem (``progress`` hears the
    steps of a Ray inventory)."""
    resolved = resolve_cluster(request.cluster_file, request.ray, progress)
    model = resolve_model(request.model or resolved.model)
    problem, target, notes = problem_on(
        request, resolved, model, load_profiles(request.profile_dir)
    )
    return problem, replace(resolved, notes=resolved.notes + tuple(notes), ppl_target=target)


def problem_on(
    request: PlanRequest,
    resolved: ResolvedCluster,
    model: ModelSpec,
    profiles: Sequence[LatencyProfile],
) -> tuple[PlanningProblem, PplTarget | None, list[str]]:
    """The planning problem of ``request`` on an already resolved cluster and model, its
    perplexity target (if one was asked for) and notes on the quality indicator's source."""
    group_size = default_group_size(model) if request.group_size is None else request.group_size
    if group_size <= 0:
        raise WorkloadError(f"--group-size: must be positive, got {group_size}")
    widths = sorted({op.in_features for op in model.layer_linears()})
    if any(w % group_size for w in widths):
        raise WorkloadError(
            f"--group-size: {group_size} does not divide every layer's input width "
            f"({', '.join(map(str, widths))}); the default is {default_group_size(model)}"
        )
    indicator, budget, target, notes = _quality(request, model, group_size)
    problem = PlanningProblem(
        model=model,
        cluster=_check_excluded(resolved.cluster, request.exclude),
        workload=resolve_workload(request, resolved.workload),
        indicator=indicator,
        bits=tuple(sorted(set(request.bits), reverse=True)),
        quality_budget=budget,
        theta_s=request.theta_s,
        group_size=group_size,
        profiles=tuple(profiles),
    )
    return problem, target, notes


def figures_source(problem: PlanningProblem) -> dict[str, str]:
    """Per device key: "profile" when a measured profile drives its latency, else
    "datasheet"."""
    return {
        d.key: "profile" if problem.profile_for(d) is not None else "datasheet"
        for d in problem.cluster.devices
    }
