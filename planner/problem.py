"""A planning problem and its cost tables for one device order and micro-batch choice.

:class:`PlanningProblem` gathers every input of a search. :func:`build_tables` evaluates the
cost model once per (order, prefill micro-batch, decode micro-batch) into dense numpy tables
that both the MILP and the simulator read, so the two can never disagree.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from planner import cost_model as cm
from planner.cluster import ClusterSpec, DeviceSpec, LinkSpec
from planner.errors import WorkloadError
from planner.indicator import BITS_COLUMN, QualityIndicator
from planner.model_spec import ModelSpec
from planner.plan import ALL_BITS, Workload
from planner.profiles import LatencyProfile, find_profile, shape_key


@dataclass(frozen=True)
class PlanningProblem:
    """Everything a search needs.

    Attributes:
        model: the model's shape.
        cluster: devices and links.
        workload: batch, prompt and generation lengths.
        indicator: normalised ω table (1 = every layer at 2 bits).
        bits: precisions the planner may choose, highest first.
        quality_budget: hard cap on Σω (None: no cap).
        theta_s: seconds of batch latency one unit of Σω is worth in the objective.
        group_size: quantization group size (inputs per scale/zero).
        profiles: measured latency profiles; the datasheet roofline covers the rest.
        forbidden: (device key, bits) pairs the operator excludes.
    """

    model: ModelSpec
    cluster: ClusterSpec
    workload: Workload
    indicator: QualityIndicator
    bits: tuple[int, ...] = ALL_BITS
    quality_budget: float | None = None
    theta_s: float = 0.0
    group_size: int = 128
    profiles: tuple[LatencyProfile, ...] = ()
    forbidden: frozenset[tuple[str, int]] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        check_workload(self.workload)
        if self.indicator.num_layers != self.model.num_layers:
            raise WorkloadError(
                f"the quality indicator covers {self.indicator.num_layers} layers but the model "
                f"has {self.model.num_layers}"
            )
        if not self.bits or any(b not in ALL_BITS for b in self.bits):
            raise WorkloadError(f"--bits: choose from {', '.join(map(str, ALL_BITS))}")
        if self.quality_budget is not None and not 0 <= self.quality_budget <= 1:
            raise WorkloadError(f"--quality: {self.quality_budget} is outside [0, 1]")
        if self.theta_s < 0:
            raise WorkloadError(f"--theta: {self.theta_s} must not be negative")

    def profile_for(self, device: DeviceSpec) -> LatencyProfile | None:
        """The measured profile of the device's type for this model, if any."""
        return find_profile(self.profiles, device.type.name, shape_key(self.model))

    def micro_batch_choices(self) -> list[tuple[int, int]]:
        """(prefill, decode) micro-batch sizes: decode sizes divide the batch, prefill sizes
        divide the decode size (prefill chunks merge into decode micro-batches)."""
        batch = self.workload.global_batch
        return [(p, d) for d in _divisors(batch) for p in _divisors(d)]


def check_workload(workload: Workload) -> None:
    """Raise WorkloadError naming the option when the workload is out of range."""
    for option, value in (
        ("--batch", workload.global_batch),
        ("--prompt-len", workload.prompt_len),
        ("--max-new", workload.max_new_tokens),
        ("--expected-new", workload.expected_new_tokens),
    ):
        if value <= 0:
            raise WorkloadError(f"{option}: must be a positive integer, got {value}")
    if workload.expected_new_tokens > workload.max_new_tokens:
        raise WorkloadError(
            f"--expected-new: {workload.expected_new_tokens} exceeds --max-new "
            f"{workload.max_new_tokens}"
        )


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass(frozen=True)
class CostTables:
    """Costs of one device order at one micro-batch choice.

    Index j is the position in ``devices``, column k the precision ``bits[k]``. Times are
    seconds per micro-batch, memory in bytes. ``inf`` latency marks a precision the device
    cannot run.
    """

    devices: tuple[DeviceSpec, ...]
    bits: tuple[int, ...]
    prefill_micro_batch: int
    decode_micro_batch: int
    prefill_micro_batches: int
    decode_micro_batches: int
    decode_steps: int
    tokens_generated: int
    layer_prefill_s: np.ndarray
    layer_decode_s: np.ndarray
    layer_memory_bytes: np.ndarray
    slow_bits: np.ndarray
    capacity_bytes: np.ndarray
    activation_bytes: np.ndarray
    dequant_scratch_bytes: np.ndarray
    embedding_bytes: np.ndarray
    head_bytes: np.ndarray
    tied_saving_bytes: np.ndarray
    embed_prefill_s: np.ndarray
    embed_decode_s: np.ndarray
    head_prefill_s: np.ndarray
    head_decode_s: np.ndarray
    stage_prefill_s: np.ndarray
    stage_decode_s: np.ndarray
    hop_prefill_s: np.ndarray
    hop_decode_s: np.ndarray
    token_return_s: np.ndarray
    omega: np.ndarray
    theta_s: float
    quality_budget: float | None

    @property
    def num_devices(self) -> int:
        """Devices in the order."""
        return len(self.devices)

    @property
    def num_layers(self) -> int:
        """Decoder layers."""
        return int(self.omega.shape[0])

    def reordered(self, order: Sequence[int]) -> CostTables:
        """The same costs for the devices at positions ``order`` of this table, in that order
        (a subset leaves the others out)."""
        idx = np.array(order, dtype=int)
        rows = {name: getattr(self, name)[idx] for name in _PER_DEVICE}
        pairs = {name: getattr(self, name)[np.ix_(idx, idx)] for name in _PER_PAIR}
        return replace(self, devices=tuple(self.devices[j] for j in order), **rows, **pairs)

    def in_time_unit(self, unit_s: float) -> CostTables:
        """The same tables with every time (and θ) measured in units of ``unit_s`` seconds
        (the MILPs solve in units that keep their figures near 1)."""
        scaled = {name: getattr(self, name) / unit_s for name in _TIMES}
        return replace(self, theta_s=self.theta_s / unit_s, **scaled)

    def allowed(self, j: int, k: int) -> bool:
        """Whether device j may run precision ``bits[k]``."""
        return math.isfinite(self.layer_prefill_s[j, k]) and math.isfinite(
            self.layer_decode_s[j, k]
        )


_PER_DEVICE = (
    "layer_prefill_s",
    "layer_decode_s",
    "layer_memory_bytes",
    "slow_bits",
    "capacity_bytes",
    "activation_bytes",
    "dequant_scratch_bytes",
    "embedding_bytes",
    "head_bytes",
    "tied_saving_bytes",
    "embed_prefill_s",
    "embed_decode_s",
    "head_prefill_s",
    "head_decode_s",
    "stage_prefill_s",
    "stage_decode_s",
)
_PER_PAIR = ("hop_prefill_s", "hop_decode_s", "token_return_s")
_TIMES = tuple(name for name in (*_PER_DEVICE, *_PER_PAIR) if name.endswith("_s"))


def build_tables(
    problem: PlanningProblem,
    devices: Sequence[DeviceSpec],
    prefill_micro_batch: int,
    decode_micro_batch: int,
) -> CostTables:
    """Evaluate the cost model for ``devices`` in this order at these micro-batch sizes.

    Devices of one type on one host (with the same forbidden precisions) cost the same, so the
    cost model runs once per such class and the tables repeat its rows."""
    classes: dict[tuple[object, ...], int] = {}
    first: list[DeviceSpec] = []  # one device of each class
    index = []
    for d in devices:
        forbidden = frozenset(b for b in problem.bits if (d.key, b) in problem.forbidden)
        key = (d.host, d.type, forbidden)
        if key not in classes:
            classes[key] = len(first)
            first.append(d)
        index.append(classes[key])
    one_each = _tables_of(problem, first, prefill_micro_batch, decode_micro_batch)
    return replace(one_each.reordered(index), devices=tuple(devices))


def _tables_of(
    problem: PlanningProblem,
    devices: Sequence[DeviceSpec],
    prefill_micro_batch: int,
    decode_micro_batch: int,
) -> CostTables:
    model, workload, bits = problem.model, problem.workload, problem.bits
    n, nb = len(devices), len(bits)
    pre_pt = cm.prefill_point(prefill_micro_batch, workload.prompt_len)
    dec_pt = cm.decode_point(decode_micro_batch, workload.prompt_len, workload.expected_new_tokens)
    lp, ld = np.full((n, nb), math.inf), np.full((n, nb), math.inf)
    mem, slow = np.zeros((n, nb)), np.zeros((n, nb), dtype=bool)
    dp = [(d, problem.profile_for(d)) for d in devices]  # each device with its profile
    for j, device in enumerate(devices):
        profile = problem.profile_for(device)
        for k, b in enumerate(bits):
            if (device.key, b) in problem.forbidden:
                continue
            lp[j, k] = cm.layer_latency_s(
                model, device.type, b, pre_pt, problem.group_size, profile
            )
            ld[j, k] = cm.layer_latency_s(
                model, device.type, b, dec_pt, problem.group_size, profile
            )
            mem[j, k] = cm.layer_memory_bytes(
                model,
                device.type,
                b,
                workload.global_batch,
                workload.max_context,
                problem.group_size,
            )
            slow[j, k] = b != 16 and b not in device.type.fast_kernel_bits
    return CostTables(
        devices=tuple(devices),
        bits=bits,
        prefill_micro_batch=prefill_micro_batch,
        decode_micro_batch=decode_micro_batch,
        prefill_micro_batches=workload.global_batch // prefill_micro_batch,
        decode_micro_batches=workload.global_batch // decode_micro_batch,
        decode_steps=workload.decode_steps,
        tokens_generated=workload.global_batch * workload.expected_new_tokens,
        layer_prefill_s=lp,
        layer_decode_s=ld,
        layer_memory_bytes=mem,
        slow_bits=slow,
        capacity_bytes=np.array([d.type.usable_memory_bytes for d in devices], dtype=float),
        activation_bytes=np.array(
            [
                cm.activation_peak_bytes(
                    model,
                    d.type,
                    prefill_micro_batch,
                    decode_micro_batch,
                    workload.prompt_len,
                    workload.max_context,
                )
                for d in devices
            ],
            dtype=float,
        ),
        dequant_scratch_bytes=np.array(
            [float(cm.dequant_scratch_bytes(model, d.type.dense_weight_bytes)) for d in devices]
        ),
        embedding_bytes=_weights_per_device(devices, model, lambda d: cm.embedding_bytes(model, d)),
        head_bytes=_weights_per_device(
            devices,
            model,
            lambda d: cm.head_bytes(model, max(prefill_micro_batch, decode_micro_batch), d),
        ),
        tied_saving_bytes=_weights_per_device(
            devices, model, lambda d: cm.tied_saving_bytes(model, d)
        ),
        embed_prefill_s=np.array([cm.embedding_latency_s(model, d.type, pre_pt, p) for d, p in dp]),
        embed_decode_s=np.array([cm.embedding_latency_s(model, d.type, dec_pt, p) for d, p in dp]),
        head_prefill_s=np.array([cm.head_latency_s(model, d.type, pre_pt, p) for d, p in dp]),
        head_decode_s=np.array([cm.head_latency_s(model, d.type, dec_pt, p) for d, p in dp]),
        stage_prefill_s=np.array([cm.stage_overhead_s(pre_pt, p) for _, p in dp]),
        stage_decode_s=np.array([cm.stage_overhead_s(dec_pt, p) for _, p in dp]),
        hop_prefill_s=_hops(problem, devices, pre_pt),
        hop_decode_s=_hops(problem, devices, dec_pt),
        token_return_s=np.array(
            [
                [
                    cm.token_return_latency_s(problem.cluster.link(a, b), decode_micro_batch)
                    for b in devices
                ]
                for a in devices
            ]
        ),
        omega=problem.indicator.omega[:, [BITS_COLUMN[b] for b in bits]],
        theta_s=problem.theta_s,
        quality_budget=problem.quality_budget,
    )


def _weights_per_device(
    devices: Sequence[DeviceSpec], model: ModelSpec, bytes_of: Callable[[int], int]
) -> np.ndarray:
    """A per-device byte count from the width of the device's 16-bit weights
    (:func:`planner.cost_model.weight16_bytes`): the runtime holds the embedding tables and
    the LM head as it holds 16-bit linears (a bf16 checkpoint's in bf16 on a CPU with native
    bf16, else in the compute dtype)."""
    return np.array([float(bytes_of(cm.weight16_bytes(model, d.type))) for d in devices])


def _hops(
    problem: PlanningProblem, devices: Sequence[DeviceSpec], point: cm.OperatingPoint
) -> np.ndarray:
    """hop[j, k]: sending a micro-batch's hidden states from device j to device k."""
    return np.array(
        [
            [
                cm.hop_latency_s(
                    problem.cluster.link(a, b), problem.model, point, a.type.activation_bytes
                )
                for b in devices
            ]
            for a in devices
        ]
    )


def _link(problem: PlanningProblem, a: DeviceSpec, b: DeviceSpec) -> LinkSpec:
    """The path a → b; between devices of one host, the hop the sender's profile measured."""
    link = problem.cluster.link(a, b)
    if a.host != b.host:
        return link
    return cm.measured_link(link, problem.profile_for(a), a.type.kind == "gpu")
