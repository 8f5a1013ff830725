"""The hardware: device types (datasheet figures), concrete devices, hosts and links.

Units live in the names: bytes, GB/s (10^9 bytes per second), TFLOPS (10^12 FLOP/s), seconds.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from planner.plan import DeviceRef

GIB = 1024**3


@dataclass(frozen=True, slots=True)
class DeviceType:
    """Datasheet figures of one kind of device.

    Attributes:
        name: catalogue name, e.g. ``"V100-32G"`` or ``"cpu"``.
        kind: ``"gpu"`` or ``"cpu"``.
        memory_bytes: device memory (host RAM for a CPU), bytes.
        memory_bandwidth_gb_s: peak DRAM bandwidth, GB/s.
        fp16_tflops: dense fp16/bf16 matrix throughput (tensor cores where present), TFLOPS.
        fp32_tflops: dense fp32 throughput, TFLOPS.
        int8_tops: dense int8 matrix throughput, TOPS (0 when absent).
        supported_bits: weight precisions that can run on this device at all.
        fast_kernel_bits: precisions with a kernel that reads packed weights and dequantizes in
            registers; the others are dequantized into a temporary 16-bit copy per call.
        peer_bandwidth_gb_s: transfer bandwidth to another device of the same host (PCIe or
            NVLink), GB/s.
        runtime_reserve_bytes: memory the runtime needs before any weight (CUDA context,
            allocator slack, or the process baseline on a CPU), bytes.
        usable_memory_fraction: share of ``memory_bytes`` the planner may fill.
        activation_bytes: bytes per element of the device's compute dtype (2 = fp16/bf16,
            4 = fp32): activations, KV cache, biases, norms, embeddings and the LM head are
            held at this width.
        launch_overhead_s: fixed cost per operator call (kernel launch or dispatch), seconds.
        dequant_gelem_s: on-the-fly dequantization rate for precisions without a fast
            kernel, 10^9 weight elements per second.
        dense_weight_bytes: bytes per weight of the per-call dequantized copies of low-bit
            layers, and of 16-bit layers whose checkpoint dtype the device computes in
            (``planner.cost_model.weight16_bytes``). Equal to ``activation_bytes`` except on a
            CPU with native bf16 dot products, where the runtime uses bf16 (2) while computing
            in fp32 (4). Leaving it 0 at
            construction means ``activation_bytes``; a built device type always holds the width.
    """

    name: str
    kind: Literal["gpu", "cpu"]
    memory_bytes: int
    memory_bandwidth_gb_s: float
    fp16_tflops: float
    fp32_tflops: float
    int8_tops: float
    supported_bits: frozenset[int]
    fast_kernel_bits: frozenset[int]
    peer_bandwidth_gb_s: float
    runtime_reserve_bytes: int
    usable_memory_fraction: float = 0.95
    activation_bytes: int = 2
    launch_overhead_s: float = 5e-6
    dequant_gelem_s: float = 50.0
    dense_weight_bytes: int = 0

    def __post_init__(self) -> None:
        if self.dense_weight_bytes == 0:
            object.__setattr__(self, "dense_weight_bytes", self.activation_bytes)
        if self.dense_weight_bytes not in (2, 4):
            raise ValueError(
                f"dense_weight_bytes must be 2 (fp16/bf16) or 4 (fp32), "
                f"got {self.dense_weight_bytes}"
            )

    @property
    def usable_memory_bytes(self) -> int:
        """Memory the planner may fill with weights, KV cache and activations, bytes."""
        return max(
            0, int(self.memory_bytes * self.usable_memory_fraction) - self.runtime_reserve_bytes
        )


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A concrete device: where it is and what it is."""

    host: str
    index: int
    type: DeviceType

    @property
    def ref(self) -> DeviceRef:
        """The plan's reference to this device."""
        return DeviceRef(host=self.host, index=self.index, device_type=self.type.name)

    @property
    def key(self) -> str:
        """Stable textual id, e.g. ``node-a/cuda:0``."""
        return self.ref.key

    @property
    def class_key(self) -> tuple[str, DeviceType]:
        """Devices with equal class keys are interchangeable in a pipeline."""
        return (self.host, self.type)


@dataclass(frozen=True, slots=True)
class LinkSpec:
    """A point-to-point path: time = latency_s + bytes / (bandwidth_gb_s * 1e9)."""

    bandwidth_gb_s: float
    latency_s: float

    def transfer_s(self, num_bytes: float) -> float:
        """Time to move ``num_bytes`` over the link, seconds."""
        return self.latency_s + num_bytes / (self.bandwidth_gb_s * 1e9)


DEFAULT_INTER_HOST_LINK = LinkSpec(bandwidth_gb_s=10 / 8, latency_s=100e-6)
"""10 Gbit/s Ethernet, 100 µs: used between hosts when the cluster file names no link."""

INTRA_HOST_LATENCY_S = 30e-6
"""Latency of a transfer between two devices of the same host (process to process)."""


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A machine of the cluster; ``address`` is where its agent listens (if any)."""

    name: str
    address: str = ""


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """Hosts, their devices in a stable order, and the links between hosts."""

    name: str
    hosts: tuple[HostSpec, ...]
    devices: tuple[DeviceSpec, ...]
    links: Mapping[frozenset[str], LinkSpec] = field(default_factory=dict)
    default_link: LinkSpec = DEFAULT_INTER_HOST_LINK

    def link(self, a: DeviceSpec, b: DeviceSpec) -> LinkSpec:
        """The path between two devices: peer bandwidth on one host, else the hosts' link."""
        if a.host == b.host:
            bandwidth = min(a.type.peer_bandwidth_gb_s, b.type.peer_bandwidth_gb_s)
            return LinkSpec(bandwidth_gb_s=bandwidth, latency_s=INTRA_HOST_LATENCY_S)
        return self.between(a.host, b.host)

    def between(self, a: str, b: str) -> LinkSpec:
        """The link between hosts ``a`` and ``b``: the one given for the pair, else the
        default."""
        return self.links.get(frozenset((a, b)), self.default_link)

    def without(self, keys: Iterable[str]) -> ClusterSpec:
        """The same cluster with the devices whose keys are given left out."""
        drop = set(keys)
        return replace(self, devices=tuple(d for d in self.devices if d.key not in drop))

    @property
    def total_usable_memory_bytes(self) -> int:
        """Sum of every device's usable memory, bytes."""
        return sum(d.type.usable_memory_bytes for d in self.devices)

    def pipeline_orders(self) -> list[tuple[DeviceSpec, ...]]:
        """The device orders the planner searches: the hosts in every order, and on each host
        its device types (classes) in every order; devices of one type on one host stay
        together, in the cluster's order (they are interchangeable). There are
        :meth:`count_pipeline_orders` of them."""
        hosts: dict[str, list[list[DeviceSpec]]] = {}
        for device in self.devices:
            classes = hosts.setdefault(device.host, [])
            for group in classes:
                if group[0].class_key == device.class_key:
                    group.append(device)
                    break
            else:
                classes.append([device])
        inside = [
            [tuple(d for g in perm for d in g) for perm in itertools.permutations(classes)]
            for classes in hosts.values()
        ]
        return [
            tuple(d for part in parts for d in part)
            for host_order in itertools.permutations(range(len(inside)))
            for parts in itertools.product(*(inside[h] for h in host_order))
        ]

    def count_pipeline_orders(self) -> int:
        """How many orders :meth:`pipeline_orders` gives: |hosts|! × Π (types on a host)!."""
        types: dict[str, set[DeviceType]] = {}
        for device in self.devices:
            types.setdefault(device.host, set()).add(device.type)
        return math.factorial(len(types)) * math.prod(
            math.factorial(len(t)) for t in types.values()
        )
