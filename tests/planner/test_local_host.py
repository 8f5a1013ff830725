"""Tests of planner/local_host.py: the local CPU measured quickly, the one-host cluster."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from planner.catalogue import CATALOGUE
from planner.cluster import GIB
from planner.local_host import (
    available_memory_bytes,
    cpu_has_native_bf16,
    local_cluster,
    measure_fp32_tflops,
    measure_local_cpu,
    measure_memory_bandwidth_gb_s,
    usable_cores,
)


def test_measure_local_cpu_is_quick_and_positive() -> None:
    start = time.perf_counter()
    cpu = measure_local_cpu()
    assert time.perf_counter() - start < 1.5  # the budget is 1 s; slack for a busy CI machine
    assert (cpu.name, cpu.kind) == ("cpu", "cpu")
    assert cpu.memory_bytes > 0 and cpu.usable_memory_bytes > 0
    assert cpu.memory_bandwidth_gb_s > 0.1
    assert cpu.fp32_tflops > 1e-4
    assert cpu.fp16_tflops == cpu.fp32_tflops


def test_small_measurements_are_positive() -> None:
    assert measure_memory_bandwidth_gb_s(buffer_bytes=1 << 20, repeats=1) > 0
    for threads in (1, 3):  # each reads its share; more readers than the default is fine
        assert measure_memory_bandwidth_gb_s(buffer_bytes=1 << 20, repeats=1, threads=threads) > 0
    assert measure_fp32_tflops(repeats=1) > 0
    assert usable_cores() >= 1


def test_available_memory_prefers_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:    8192 kB\n")
    assert available_memory_bytes(meminfo) == 8192 * 1024
    meminfo.write_text("MemTotal:       16384 kB\n")
    assert available_memory_bytes(meminfo) == 16384 * 1024


def test_available_memory_falls_back_to_sysconf(tmp_path: Path) -> None:
    assert available_memory_bytes(tmp_path / "missing") > 0
    garbled = tmp_path / "garbled"
    garbled.write_text("MemAvailable: lots\n")
    assert available_memory_bytes(garbled) > 0


@pytest.mark.parametrize(
    ("flags", "native"),
    [
        ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", True),
        ("fpu avx512f amx_bf16 amx_tile amx_int8", True),
        ("fpu sse2 avx2 fma avx512f avx512bw", False),
    ],
)
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n")
    assert cpu_has_native_bf16(cpuinfo) is native


def test_native_bf16_is_false_without_cpu_flags(tmp_path: Path) -> None:
    assert cpu_has_native_bf16(tmp_path / "missing") is False
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_has_native_bf16(arm) is False


def test_the_measured_cpu_takes_the_flags_width() -> None:
    cpu = measure_local_cpu()
    assert cpu.dense_weight_bytes == (2 if cpu_has_native_bf16() else 4)
    assert cpu.activation_bytes == 4


def test_local_cluster_without_gpus_is_the_cpu() -> None:
    cluster = local_cluster("box")
    assert cluster.name == "local"
    assert [h.name for h in cluster.hosts] == ["box"]
    (device,) = cluster.devices
    assert (device.key, device.index, device.type.kind) == ("box/cpu", -1, "cpu")
    assert device.type.memory_bytes > 0 and device.type.fp32_tflops > 0


def test_local_cluster_with_gpus_leaves_the_cpu_out() -> None:
    gpus = (CATALOGUE["RTX4090"], CATALOGUE["RTX3090"])
    cluster = local_cluster("rig", gpus)
    assert [(d.key, d.type.name) for d in cluster.devices] == [
        ("rig/cuda:0", "RTX4090"),
        ("rig/cuda:1", "RTX3090"),
    ]
    link = cluster.link(cluster.devices[0], cluster.devices[1])
    assert link.bandwidth_gb_s == pytest.approx(24.0)


def test_local_cluster_takes_a_given_cpu_and_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "here")
    cluster = local_cluster(cpu=CATALOGUE["cpu"])
    assert cluster.devices[0].key == "here/cpu"
    assert cluster.devices[0].type.memory_bytes == 64 * GIB
