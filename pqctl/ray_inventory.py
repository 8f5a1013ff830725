"""A Ray cluster's inventory as the planner's cluster: every alive node's NVIDIA GPUs (NVML, read
on that node by a pinned task) or else its CPU (measured there), and the link between every two
hosts (a ZeroMQ ping-pong between two pinned actors), as the same ``ClusterSpec`` a cluster file
gives. Ray's side is :mod:`runtime.cluster.ray_nodes`; the mapping of what NVML reports onto the
catalogue is the planner's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from planner.catalogue import find_device_type
from planner.cluster import GIB, ClusterSpec, DeviceSpec, DeviceType, HostSpec, LinkSpec
from planner.local_host import measure_local_cpu
from runtime.cluster.discovery import GpuInfo, discover_gpus
from runtime.cluster.ray_nodes import (
    LinkFit,
    RayNode,
    alive_nodes,
    connected,
    measure_links,
    run_on_each,
)

UNKNOWN_GPU_FIGURES_FROM = "T4"
"""A GPU the catalogue does not know is planned with its NVML memory and this type's speed
figures (the slowest catalogued datacenter GPU: a plan never counts on speed it may lack)."""


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What a node's probe found: its GPUs (or why none could be read) and, without GPUs, its
    CPU as a device type."""

    gpus: tuple[GpuInfo, ...]
    gpu_reason: str
    driver_version: str
    cpu: DeviceType | None


def probe_node() -> NodeReport:
    """Runs on the node: NVML discovery, and the CPU measured as on one host when there is no
    GPU."""
    found = discover_gpus()
    cpu = measure_local_cpu() if not found.gpus else None
    return NodeReport(found.gpus, found.reason, found.driver_version, cpu)


def probe_nodes(
    resolved: str, say: Callable[[str], None]
) -> tuple[list[RayNode], list[NodeReport]]:
    """Every alive node of the connected cluster and what its probe found."""
    nodes = alive_nodes()
    say(f"probing {len(nodes)} Ray node{'s' * (len(nodes) != 1)} at {resolved}")
    return nodes, run_on_each(nodes, probe_node)


@dataclass(frozen=True)
class Inventory:
    """A Ray cluster as planned: its address, nodes, what each reported, the fitted links, the
    cluster built from them and notes for the operator."""

    address: str
    nodes: tuple[RayNode, ...]
    reports: tuple[NodeReport, ...]
    links: Mapping[frozenset[str], LinkFit]
    cluster: ClusterSpec
    notes: tuple[str, ...]


def ray_inventory(address: str, progress: Callable[[str], None] | None = None) -> Inventory:
    """Connect to the Ray cluster at ``address`` (or ``auto``), probe every alive node and
    measure the links; raises ``RayClusterError`` naming the address or node that failed."""
    say = progress or (lambda _: None)
    with connected(address) as resolved:
        nodes, reports = probe_nodes(resolved, say)
        links = measure_links(nodes, progress=say) if len(nodes) > 1 else {}
    cluster, notes = cluster_from_reports(nodes, reports, links)
    return Inventory(resolved, tuple(nodes), tuple(reports), links, cluster, tuple(notes))


def cluster_from_reports(
    nodes: Sequence[RayNode],
    reports: Sequence[NodeReport],
    links: Mapping[frozenset[str], LinkFit],
    name: str = "ray",
) -> tuple[ClusterSpec, list[str]]:
    """The cluster: a host per node (named as :mod:`runtime.cluster.ray_nodes` names them), its
    GPUs as catalogue types with NVML's memory, or its CPU; links as fitted."""
    hosts: list[HostSpec] = []
    devices: list[DeviceSpec] = []
    notes: list[str] = []
    for node, report in zip(nodes, reports, strict=True):
        hosts.append(HostSpec(node.host, node.ip))
        devices += [
            DeviceSpec(node.host, g.index, _gpu_type(node.host, g, notes)) for g in report.gpus
        ]
        if report.cpu is not None:
            devices.append(DeviceSpec(node.host, -1, report.cpu))
            notes.append(f"{node.host}: no GPU ({report.gpu_reason}); its CPU is planned")
    fitted = {pair: LinkSpec(f.bandwidth_gb_s, f.latency_s) for pair, f in links.items()}
    cluster = ClusterSpec(name, tuple(hosts), tuple(devices), links=fitted)
    return cluster, notes


def _gpu_type(host: str, gpu: GpuInfo, notes: list[str]) -> DeviceType:
    known = find_device_type(gpu.name)
    if known is not None:
        return replace(known, memory_bytes=gpu.memory_total_bytes)
    base = find_device_type(UNKNOWN_GPU_FIGURES_FROM)
    assert base is not None
    notes.append(
        f'{host}: GPU {gpu.index} "{gpu.name}" is not in the catalogue; planned with its NVML '
        f"memory ({gpu.memory_total_bytes / GIB:.1f} GiB) and {UNKNOWN_GPU_FIGURES_FROM} speed "
        "figures (measure it with pqctl profile --ray, or give its figures in a cluster file)"
    )
    return replace(base, name=gpu.name.strip(), memory_bytes=gpu.memory_total_bytes)
