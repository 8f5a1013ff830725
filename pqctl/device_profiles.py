"""``pqctl profile``: measure this host's devices and write latency profiles the planner reads.

The measurement is :mod:`runtime.measure.profiling` (one decoder layer per precision through the
runtime's own kernels) and :mod:`runtime.measure.hop_timing` (one activation hop over ZeroMQ); this
module picks the devices, names their types as the planner does, turns the timings into
:class:`planner.profiles.LatencyProfile` files and reports each fit's held-out error.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from planner.catalogue import find_device_type
from planner.cost_model import default_group_size
from planner.errors import WorkloadError
from planner.model_spec import EXAMPLES_DIR, ModelSpec
from planner.profiles import (
    END_PARTS,
    EndSample,
    LatencyProfile,
    LatencySample,
    ShapeKey,
    TransferFit,
    held_out_error,
    save_profile,
    shape_key,
)
from pqctl.plan_inputs import resolve_model
from runtime.cluster.discovery import discover_gpus
from runtime.measure.hop_timing import activation_frame_sizes, measure_hop
from runtime.measure.profiling import (
    DeviceMeasurement,
    ProfileGrid,
    measure_device,
)
from runtime.model.arch import ArchConfig, arch_from_config
from runtime.model.assets import BUILTIN_MODEL_NAME, builtin_model_dir

CPU_TYPE_NAME = "cpu"
"""The device type the planner gives this host's CPU (``planner.catalogue.cpu_device_type``)."""

Progress = Callable[[str, int, int], None]
"""Called with (device label, samples done, samples planned)."""


@dataclass(frozen=True, slots=True)
class DeviceTarget:
    """A device to measure: its torch name and the device type the planner knows it by."""

    torch_device: str
    device_type: str


@dataclass(frozen=True, slots=True)
class FitError:
    """Held-out error of one fit: leave-one-out mean absolute percentage error (a fraction)."""

    device_type: str
    what: str  # "16 bits", "head" ...
    phase: str
    samples: int
    held_out_mape: float | None


@dataclass(frozen=True)
class ProfileOutcome:
    """One device's profile, where it was written and how well it fits."""

    target: DeviceTarget
    path: Path
    profile: LatencyProfile
    measurement: DeviceMeasurement
    fit_errors: tuple[FitError, ...]


def parse_devices(text: str) -> list[DeviceTarget]:
    """``cpu``, ``cuda:N`` or ``all`` (every GPU torch sees, then the CPU).

    Raises:
        WorkloadError: an unknown device, or a GPU this host does not have (names --device).
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if text == "all":
        return [*(gpu_target(i) for i in range(gpus)), DeviceTarget("cpu", CPU_TYPE_NAME)]
    if text == "cpu":
        return [DeviceTarget("cpu", CPU_TYPE_NAME)]
    match = re.fullmatch(r"cuda:(\d+)", text)
    if match is None:
        raise WorkloadError(f'--device: "{text}" is not cpu, cuda:N or all')
    index = int(match.group(1))
    if index >= gpus:
        seen = f"{gpus} CUDA device(s)" if gpus else "no CUDA device"
        raise WorkloadError(f"--device: {text} does not exist; torch sees {seen}")
    return [gpu_target(index)]


def gpu_target(index: int) -> DeviceTarget:
    """GPU ``index`` under its catalogue name (what ``pqctl plan --local`` calls it), else
    the name torch reports."""
    found = {g.index: g for g in discover_gpus().gpus}
    name = found[index].name if index in found else torch.cuda.get_device_name(index)
    known = find_device_type(name)
    return DeviceTarget(f"cuda:{index}", known.name if known is not None else name)


def resolve_arch(model: str | None) -> tuple[ModelSpec, ArchConfig]:
    """The model's shape for the planner and its architecture for the runtime.

    Raises:
        ModelConfigError: the config cannot be found or read (from the planner).
        UnsupportedArchitectureError: the runtime has no stage for the family.
    """
    spec = resolve_model(model)
    path = Path(model) if model is not None else None
    if path is None or model == BUILTIN_MODEL_NAME:
        config = builtin_model_dir() / "config.json"
    elif path.is_dir():
        config = path / "config.json"
    elif path.is_file():
        config = path
    elif (EXAMPLES_DIR / str(model) / "config.json").is_file():
        config = EXAMPLES_DIR / str(model) / "config.json"
    else:
        raise WorkloadError(
            f"--model: {model}: profiling needs a local config.json (no weights): give a "
            "checkpoint directory, a config.json or an example name"
        )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WorkloadError(f"--model: cannot read {config} ({exc})") from exc
    return spec, arch_from_config(data, str(config))


def profile_file_name(device_type: str, shape: ShapeKey) -> str:
    """One file per device type and model shape, e.g. ``cpu--llama-h192-f512-a6-kv3-d32.json``."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device_type).strip("-") or "device"
    return (
        f"{slug}--{shape.family}-h{shape.hidden_size}-f{shape.intermediate_size}"
        f"-a{shape.num_heads}-kv{shape.num_kv_heads}-d{shape.head_dim}.json"
    )


def to_profile(
    device_type: str,
    shape: ShapeKey,
    measured: DeviceMeasurement,
    transfer: Sequence[tuple[int, float]] = (),
    notes: dict[str, Any] | None = None,
) -> LatencyProfile:
    """The planner's profile of one device's measurement."""
    layers = [
        LatencySample(t.phase, t.bits, t.micro_batch, t.context_len, t.latency_s)
        for t in measured.timings
        if t.part == "layer"
    ]
    ends = [
        EndSample(t.part, t.phase, t.micro_batch, t.context_len, t.latency_s)
        for t in measured.timings
        if t.part in END_PARTS
    ]
    fit = TransferFit.from_samples(transfer) if len(transfer) >= 2 else None
    return LatencyProfile.from_samples(
        device_type,
        shape,
        layers,
        measured.unavailable,
        end_samples=ends,
        transfer=fit,
        notes=notes,
    )


def fit_errors(profile: LatencyProfile) -> list[FitError]:
    """Held-out error of every (phase, bits) and (part, phase) fit of ``profile``."""
    out = []
    for phase, bits in sorted(profile.fits, key=lambda k: (k[1] * -1, k[0] != "prefill")):
        group = [s for s in profile.samples if (s.phase, s.bits) == (phase, bits)]
        err = held_out_error(phase, group)
        out.append(FitError(profile.device_type, f"{bits} bits", phase, len(group), err))
    for part, phase in profile.end_fits:
        ends = [
            e.as_layer_sample() for e in profile.end_samples if (e.part, e.phase) == (part, phase)
        ]
        err = held_out_error(phase, ends)
        out.append(FitError(profile.device_type, part, phase, len(ends), err))
    return out


def _notes(
    measured: DeviceMeasurement, grid: ProfileGrid, errors: list[FitError]
) -> dict[str, Any]:
    return {
        "fit_error": [
            {
                "what": e.what,
                "phase": e.phase,
                "samples": e.samples,
                "held_out_mape": e.held_out_mape,
            }
            for e in errors
        ],
        "measured": {
            "device": measured.device,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "kernel_paths": {str(b): list(p) for b, p in measured.kernel_paths.items()},
            "unavailable": {str(b): why for b, why in measured.unavailable.items()},
            "repeats": grid.repeats,
            "stack_layers": grid.stack_layers,
            "points_trimmed": measured.trimmed,
            "elapsed_s": round(measured.elapsed_s, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    }


@dataclass(frozen=True)
class ProfileRequest:
    """What ``pqctl profile`` was asked for."""

    model: str | None
    devices: str
    bits: tuple[int, ...]
    grid: ProfileGrid
    budget_s: float | None
    output_dir: Path
    group_size: int | None = None
    transfer: bool = True
    threads: int | None = None


def run_profile(request: ProfileRequest, progress: Progress | None = None) -> list[ProfileOutcome]:
    """Measure every requested device and write one profile file each.

    The activation hop is timed first (well under a second); what is left of the time budget
    is shared among the devices.
    """
    spec, arch = resolve_arch(request.model)
    targets = parse_devices(request.devices)
    request.output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    if request.threads is not None:
        torch.set_num_threads(request.threads)
    try:
        return _measure_all(request, spec, arch, targets, start, progress)
    finally:
        torch.set_num_threads(threads)


def _measure_all(
    request: ProfileRequest,
    spec: ModelSpec,
    arch: ArchConfig,
    targets: Sequence[DeviceTarget],
    start: float,
    progress: Progress | None,
) -> list[ProfileOutcome]:
    group_size = request.group_size or default_group_size(spec)
    shape = shape_key(spec)
    outcomes = []
    transfer = measure_hop(activation_frame_sizes(arch.hidden_size)) if request.transfer else []
    for k, target in enumerate(targets):
        budget = None
        if request.budget_s is not None:
            left = request.budget_s - (time.perf_counter() - start)
            budget = max(left, 0.0) / (len(targets) - k)

        def report(done: int, total: int, label: str = target.torch_device) -> None:
            if progress is not None:
                progress(label, done, total)

        measured = measure_device(
            arch, target.torch_device, request.bits, request.grid,
            group_size=group_size, budget_s=budget, progress=report,
        )  # fmt: skip
        profile = to_profile(target.device_type, shape, measured, transfer)
        errors = fit_errors(profile)
        profile = replace(profile, notes=_notes(measured, request.grid, errors))
        path = request.output_dir / profile_file_name(target.device_type, shape)
        save_profile(profile, path)
        outcomes.append(ProfileOutcome(target, path, profile, measured, tuple(errors)))
    return outcomes
