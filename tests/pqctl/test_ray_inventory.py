"""Building the planner's cluster from what Ray nodes report (no Ray needed)."""

from __future__ import annotations

import tomllib

from planner.catalogue import find_device_type
from planner.cluster_file import cluster_toml, parse_cluster_file
from pqctl.ray_inventory import NodeReport, cluster_from_reports
from runtime.cluster.discovery import GpuInfo
from runtime.cluster.ray_nodes import LinkFit, RayNode

GIB = 1024**3


def node(host: str, ip: str) -> RayNode:
    return RayNode(f"id-{host}", host, host, ip, {"CPU": 8.0})


def gpu(index: int, name: str, memory: int) -> GpuInfo:
    return GpuInfo(index, name, f"GPU-{index}", memory, 0, (8, 0))


def test_known_gpus_keep_nvml_memory_unknown_ones_are_planned_with_a_note() -> None:
    a100_memory = 42_505_273_344  # what NVML reports for an A100-40G, not 40 GiB
    odd = 25_393_692_672
    reports = [
        NodeReport((gpu(0, "NVIDIA A100-SXM4-40GB", a100_memory),), "", "550.54", None),
        NodeReport((gpu(0, "NVIDIA Fancy X9", odd), gpu(1, "Tesla T4", 16 * GIB)), "", "", None),
    ]
    links = {frozenset(("a", "b")): LinkFit(50e-6, 3.0, ())}
    cluster, notes = cluster_from_reports(
        [node("a", "10.0.0.1"), node("b", "10.0.0.2")], reports, links
    )
    assert [d.key for d in cluster.devices] == ["a/cuda:0", "b/cuda:0", "b/cuda:1"]
    assert [h.address for h in cluster.hosts] == ["10.0.0.1", "10.0.0.2"]
    a100, fancy, t4 = (d.type for d in cluster.devices)
    assert a100.name == "A100-40G" and a100.memory_bytes == a100_memory
    assert fancy.name == "NVIDIA Fancy X9" and fancy.memory_bytes == odd
    reference = find_device_type("T4")
    assert reference is not None and fancy.fp16_tflops == reference.fp16_tflops
    assert t4.name == "T4"
    (note,) = notes
    assert 'b: GPU 0 "NVIDIA Fancy X9" is not in the catalogue' in note and "23.6 GiB" in note
    link = cluster.links[frozenset(("a", "b"))]
    assert (link.latency_s, link.bandwidth_gb_s) == (50e-6, 3.0)
    text = cluster_toml(cluster)  # and it saves as a cluster file that loads back equal
    loaded = parse_cluster_file(tomllib.loads(text), "saved.toml", text=text).cluster
    assert loaded == cluster
