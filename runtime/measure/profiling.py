"""Per-layer latency of the runtime's own quantized kernels, measured on one device.

``pqctl profile`` calls :func:`measure_device` once per local device (each GPU and the CPU).
For a model shape it writes a small random-weight checkpoint (``stack_layers`` decoder layers,
embedding, final norm and LM head) and loads stage shards from it through
:func:`runtime.model.shard.load_shard`, so every precision is quantized and run by the same code
that serves: ``runtime.quant.linear``'s layers and the kernel path ``runtime.quant.kernels`` picks.

What one grid point times (seconds; a point is a micro-batch and a prompt length for prefill, a
micro-batch and the attended context for decode)::

    stage      an empty stage: step context (mask, rotary table) and the call itself
    layer      (stack of N layers at bits − empty stage) / N
    embedding  embedding-only stage − empty stage
    head       head-only stage (final norm, LM head on the last position) − empty stage

Decode points attend to a real preallocated KV cache of ``context_len`` positions.

Each time is the shortest over ``repeats`` passes over a precision's grid, each pass calling
every stage :data:`CALLS_PER_PASS` times back to back at each point (:func:`shortest_call`),
and more passes while they span less than the grid's ``spread_s``. On a CPU shared with other
tenants the machine's speed drifts: on a 2-core cloud VM the best of 7 back-to-back calls of
one decode-sized linear ranged over 1.9× in 150 s, and a 5 ms decode call's best time per
10-second window was 1.00-1.21× its best over 4 minutes, 10-20 % above it for 100 s at a
time. Repeats back to back all see one state of the machine; the shortest of samples seconds
apart approaches the uncontended time, which a profile describes. ``bench/costmodel.py``
interleaves profile passes with the runs it compares them with.

A precision whose layers cannot be built or whose kernel raises is reported unavailable with
the reason; nothing of it is timed.

The grid is trimmed to a time budget: per precision and phase the first points of the grid's
order (its corners, enough for the regression forms: 5 prefill and 4 decode points) are always
measured; further points follow, cheapest first, while their estimated cost over all passes
fits the budget; passes after the first run while the budget allows.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, TypeVar

import torch
from safetensors.torch import save_file
from torch import Tensor

from runtime.errors import QuantizationError, StageMemoryError
from runtime.measure.grid import FULL_GRID, MIN_POINTS, QUICK_GRID, GridPoint, Phase, ProfileGrid
from runtime.model.arch import ArchConfig
from runtime.model.shard import StageShard, StageSpec, end_tensors, layer_tensors, load_shard
from runtime.model.stages import compute_dtype

T = TypeVar("T")
Part = Literal["layer", "stage", "embedding", "head"]
_MIN_LATENCY_S = 1e-7
PART_RESOLUTION = 0.2
"""An embedding or head part shorter than this share of the empty stage's time is recorded at
it: the part is a difference of two calls, and below that it is noise (a decode embedding
lookup of a few rows, ~20 µs on a CPU, measured 0-30 µs; zeros made the fits' relative
errors meaningless)."""
CALLS_PER_PASS = 2
"""Back-to-back calls of each stage per point and pass; the shorter counts."""
MAX_PASS_FACTOR = 4
"""At most this many times ``repeats`` passes when passes are quick (``spread_s``)."""


@dataclass(frozen=True, slots=True)
class Timing:
    """One measured time, seconds. ``bits`` is 0 for the parts that have no precision."""

    part: Part
    phase: Phase
    bits: int
    micro_batch: int
    context_len: int
    latency_s: float


@dataclass
class DeviceMeasurement:
    """Everything measured on one device.

    Attributes:
        device: the torch device, e.g. ``"cpu"`` or ``"cuda:0"``.
        timings: layer timings per bits and the stage / embedding / head timings.
        unavailable: bits whose layers could not be built or run, with the reason.
        kernel_paths: per measured bits, the compute paths its linears took.
        trimmed: grid points left out to keep to the time budget.
        elapsed_s: wall time of the measurement, seconds.
    """

    device: str
    timings: list[Timing] = field(default_factory=list)
    unavailable: dict[int, str] = field(default_factory=dict)
    kernel_paths: dict[int, tuple[str, ...]] = field(default_factory=dict)
    trimmed: int = 0
    elapsed_s: float = 0.0


ProgressFn = Callable[[int, int], None]
"""Called with (samples done, samples planned) as the measurement goes; a sample is one point
in one pass, and quick passes add to the plan (``ProfileGrid.spread_s``)."""


def write_random_checkpoint(arch: ArchConfig, layers: int, directory: Path) -> Path:
    """A seeded random-weight checkpoint of ``layers`` decoder layers plus both ends (bf16).

    Linear weights and embeddings ~ N(0, 0.02²), norms 1, biases 0: the shapes
    :func:`runtime.model.shard.layer_tensors` and :func:`runtime.model.shard.end_tensors` name.
    """
    gen = torch.Generator().manual_seed(0)

    class _Untied:  # end_tensors asks which head tensors the checkpoint has
        tensors = {} if arch.tied_embeddings else {"lm_head.weight": None}

    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        shapes |= layer_tensors(arch, layer)
    shapes |= end_tensors(arch, _Untied(), True, True)  # type: ignore[arg-type]
    tensors: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            tensors[name] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def _inputs(arch: ArchConfig, point: GridPoint, ids: bool, device: torch.device) -> Tensor:
    rows = point.context_len if point.phase == "prefill" else 1
    if ids:
        return torch.randint(0, arch.vocab_size, (point.micro_batch, rows), device=device)
    return torch.randn(point.micro_batch, rows, arch.hidden_size, device=device) * 0.5


def _step(shard: StageShard, point: GridPoint, x: Tensor) -> Callable[[], object]:
    """One call of the stage at ``point``, as a worker makes it (context, then forward)."""
    b, n = point.micro_batch, point.context_len
    past = 0 if point.phase == "prefill" else n - 1
    new = n - past
    positions = torch.arange(past, n).expand(b, new)  # [bsz, new tokens]
    key_valid = torch.ones(b, n, dtype=torch.bool)  # [bsz, past + new]

    def call() -> object:
        return shard(x, shard.context((0, b), past, positions, key_valid))

    return call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Stages:
    """The stages built from one random checkpoint on one device."""

    def __init__(
        self, arch: ArchConfig, grid: ProfileGrid, directory: Path, device: torch.device
    ) -> None:
        self.arch, self.grid, self.directory, self.device = arch, grid, directory, device
        self.dtype = compute_dtype(device)  # what a serving stage on this device computes in
        self.slots = max((*grid.prefill_batches, *grid.decode_batches))
        self.max_len = max((*grid.prompt_lens, *grid.contexts))

    def build(
        self, bits: int, group_size: int, first: bool = False, last: bool = False
    ) -> StageShard:
        """A stage of ``stack_layers`` layers at ``bits`` (0: no layers) and the given ends."""
        layers = self.grid.stack_layers if bits else 0
        spec = StageSpec(
            (0, layers), (bits,) * layers, first, last, group_size, self.slots, self.max_len
        )
        return load_shard(self.directory, self.arch, spec, dtype=self.dtype, device=self.device)

    def time_calls(self, calls: Sequence[Callable[[], object]]) -> list[float]:
        """Each call's :func:`shortest_call` time, seconds, in order."""
        return [shortest_call(call, self.device)[0] for call in calls]


def shortest_call(call: Callable[[], T], device: torch.device) -> tuple[float, T]:
    """The shorter of :data:`CALLS_PER_PASS` back-to-back timings of ``call`` (seconds, the
    device synchronised around each) and the last call's result.

    Back to back, as a serving stage calls its layers micro-batch after micro-batch: the
    second call finds in the caches what of the stage's weights fit there (all of a small
    model's: bard-tiny's 8-layer stack is 14 MiB of fp32 weights), as serving does."""
    best = math.inf
    for _ in range(CALLS_PER_PASS):
        _sync(device)
        start = time.perf_counter()
        result = call()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


_KERNEL_FAILURES = (RuntimeError, NotImplementedError, QuantizationError)
"""What a missing or failing kernel raises: torch's errors, or the quantizer's refusal."""


class _Session:
    """One device's measurement: the empty and end stages, the budget, the results."""

    def __init__(
        self,
        stages: _Stages,
        group_size: int,
        budget_s: float | None,
        progress: ProgressFn | None,
    ) -> None:
        self.stages, self.group_size = stages, group_size
        self.budget_s, self.progress = budget_s, progress
        self.start = time.perf_counter()
        self.empty = stages.build(0, group_size)
        self.first = stages.build(0, group_size, first=True)
        self.last = stages.build(0, group_size, last=True)
        self.ends_done: set[GridPoint] = set()
        self.cost_s: dict[GridPoint, float] = {}  # wall time each measured point took
        self.result = DeviceMeasurement(str(stages.device))
        self.done = self.planned = 0

    def tick(self, planned: int = 0) -> None:
        self.planned += planned
        if self.progress is not None:
            self.progress(self.done, self.planned)

    def measure_bits(self, bits: int, points: Sequence[GridPoint], share_s: float) -> None:
        """``repeats`` passes over the points at ``bits``: the first measures every mandatory
        point and the others whose cost, times the passes, fits ``share_s`` seconds; the later
        passes repeat what the first measured while the share allows (always one pass)."""
        started = time.perf_counter()
        passes = self.stages.grid.repeats
        try:
            shard = self.stages.build(bits, self.group_size)
            warm = points[0]
            _step(shard, warm, _inputs(self.stages.arch, warm, False, self.stages.device))()
        except _KERNEL_FAILURES as exc:
            self.result.unavailable[bits] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            self.done += len(points) * passes
            self.tick()
            return
        paths = {p for ps in shard.kernel_paths().values() for p in ps}
        self.result.kernel_paths[bits] = tuple(sorted(paths))
        mandatory = _mandatory(points)
        ends = {p for p in points if p not in self.ends_done}
        samples: dict[GridPoint, list[list[float]]] = {}
        first_pass = time.perf_counter()
        for point in points:
            spent = time.perf_counter() - started
            if point not in mandatory and spent + self.estimate_s(point) > share_s / passes:
                self.result.trimmed += 1
                self.done += passes
            else:
                samples[point] = [self.sample(shard, point, point in ends)]
                self.done += 1
            self.tick()
        pass_s = sum(self.cost_s[p] for p in samples)
        grid, done = self.stages.grid, 1
        most = passes if grid.spread_s <= 0 else MAX_PASS_FACTOR * passes
        while done < most:
            now = time.perf_counter()
            spread = done >= passes and now - first_pass >= grid.spread_s
            if spread or now - started + pass_s > share_s:
                break
            if done >= passes:
                self.tick(planned=len(samples))  # an extra pass: the planned ones were quick
            for point in samples:
                samples[point].append(self.sample(shard, point, point in ends))
                self.done += 1
                self.tick()
            done += 1
        self.done += max(passes - done, 0) * len(samples)
        self.tick()
        for point, runs in samples.items():
            self.record(bits, point, [min(run[k] for run in runs) for k in range(len(runs[0]))])
        self.ends_done.update(ends & samples.keys())
        del shard

    def estimate_s(self, point: GridPoint) -> float:
        """Wall time one pass over ``point`` will take, scaled from the nearest measured
        point."""
        same = [p for p in self.cost_s if p.phase == point.phase]
        if not same:
            return 0.0
        ref = min(same, key=lambda p: abs(math.log(p.work / point.work)))
        return self.cost_s[ref] * point.work / ref.work

    def sample(self, shard: StageShard, point: GridPoint, with_ends: bool) -> list[float]:
        """One pass's times at ``point``: the empty stage, the stack, and with ``with_ends``
        the embedding-only and head-only stages, seconds."""
        arch, device = self.stages.arch, self.stages.device
        started = time.perf_counter()
        hidden = _inputs(arch, point, False, device)
        calls = [_step(self.empty, point, hidden), _step(shard, point, hidden)]
        if with_ends:
            ids = _inputs(arch, point, True, device)
            calls += [_step(self.first, point, ids), _step(self.last, point, hidden)]
        times = self.stages.time_calls(calls)
        self.cost_s[point] = time.perf_counter() - started
        return times

    def record(self, bits: int, point: GridPoint, times: list[float]) -> None:
        """The timings of ``point`` from its shortest times per call (:meth:`sample`'s order)."""
        empty_s, phase = times[0], point.phase
        per_layer = (times[1] - empty_s) / self.stages.grid.stack_layers
        add = self.result.timings.append
        add(Timing("layer", phase, bits, point.micro_batch, point.context_len, _pos(per_layer)))
        if len(times) > 2:
            parts: tuple[tuple[Part, float], ...] = (
                ("stage", empty_s), ("embedding", times[2] - empty_s), ("head", times[3] - empty_s)
            )  # fmt: skip
            resolution_s = PART_RESOLUTION * empty_s
            for part, t in parts:
                t = max(t, resolution_s)
                add(Timing(part, phase, 0, point.micro_batch, point.context_len, _pos(t)))


def _pos(latency_s: float) -> float:
    """A difference of two noisy times, kept positive (the file format needs it)."""
    return max(latency_s, _MIN_LATENCY_S)


def _mandatory(points: Sequence[GridPoint]) -> set[GridPoint]:
    """The first points of each phase that the regression forms need."""
    out: set[GridPoint] = set()
    for phase, need in MIN_POINTS.items():
        out.update([p for p in points if p.phase == phase][:need])
    return out


def measure_device(
    arch: ArchConfig,
    device: str | torch.device,
    bits: Sequence[int],
    grid: ProfileGrid,
    *,
    group_size: int,
    budget_s: float | None = None,
    progress: ProgressFn | None = None,
) -> DeviceMeasurement:
    """Time one decoder layer of ``arch``'s shape at every precision in ``bits`` on ``device``.

    Args:
        arch: the model's architecture (only its shape and family matter; weights are random).
        device: ``"cpu"`` or ``"cuda:N"``.
        bits: precisions to measure.
        grid: the points and repeats (lengths beyond the model's positions are dropped).
        group_size: quantization group size of the 2-4-bit layers.
        budget_s: wall-clock budget of the whole measurement, seconds (None: the whole grid).
            Each precision gets an equal share of what is left; the mandatory points are
            measured even past it.
        progress: called with (samples done, samples planned).

    Returns:
        The timings, the unavailable precisions and what was trimmed.

    Raises:
        StageMemoryError: even the empty stage does not fit ``device``.
    """
    grid = grid.clipped(arch.max_positions)
    grid = replace(grid, stack_layers=max(1, min(grid.stack_layers, arch.num_layers)))
    dev = torch.device(device)
    points = grid.points("prefill") + grid.points("decode")
    order = _mandatory(points)
    ordered = [p for p in points if p in order] + sorted(
        (p for p in points if p not in order), key=lambda p: p.work
    )
    with tempfile.TemporaryDirectory(prefix="pqctl-profile-") as tmp:
        directory = write_random_checkpoint(arch, grid.stack_layers, Path(tmp))
        session = _Session(_Stages(arch, grid, directory, dev), group_size, budget_s, progress)
        session.tick(len(ordered) * len(bits) * grid.repeats)
        for k, b in enumerate(bits):
            left_s = math.inf
            if budget_s is not None:
                left_s = budget_s - (time.perf_counter() - session.start)
            session.measure_bits(b, ordered, max(left_s, 0.0) / (len(bits) - k))
    session.result.elapsed_s = time.perf_counter() - session.start
    return session.result


__all__ = [
    "CALLS_PER_PASS",
    "FULL_GRID",
    "MIN_POINTS",
    "QUICK_GRID",
    "DeviceMeasurement",
    "GridPoint",
    "ProfileGrid",
    "StageMemoryError",
    "Timing",
    "measure_device",
    "shortest_call",
    "write_random_checkpoint",
]
