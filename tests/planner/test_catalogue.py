"""Tests of planner/catalogue.py: datasheet entries, alias lookup, the CPU device type."""

from __future__ import annotations

import dataclasses

import pytest

from planner.catalogue import (
    ALL_WEIGHT_BITS,
    CATALOGUE,
    cpu_device_type,
    find_device_type,
    gpu_device_type,
    known_device_types,
    lookup_device_type,
)
from planner.cluster import GIB, DeviceType

REQUIRED = (
    "T4", "P100-12G", "V100-16G", "V100-32G", "A100-40G", "A100-80G", "A800-80G",
    "L4", "A10G", "RTX3090", "RTX4090", "H100-80G", "H200", "cpu",
)  # fmt: skip


def test_catalogue_has_every_required_type_under_its_own_name() -> None:
    assert set(REQUIRED) <= set(CATALOGUE)
    assert all(name == device_type.name for name, device_type in CATALOGUE.items())
    assert known_device_types() == list(CATALOGUE)
    assert known_device_types()[-1] == "cpu"


def test_catalogue_is_read_only() -> None:
    with pytest.raises(TypeError):
        CATALOGUE["X"] = CATALOGUE["T4"]  # type: ignore[index]


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "cpu"])
def test_gpu_entries_are_complete_and_plausible(name: str) -> None:
    gpu = CATALOGUE[name]
    assert gpu.kind == "gpu"
    assert gpu.supported_bits == ALL_WEIGHT_BITS
    assert 16 in gpu.fast_kernel_bits <= gpu.supported_bits
    assert gpu.activation_bytes == 2
    assert gpu.launch_overhead_s == pytest.approx(5e-6)
    assert gpu.usable_memory_fraction == pytest.approx(0.95)
    assert gpu.dequant_gelem_s == pytest.approx(gpu.memory_bandwidth_gb_s / 2)
    assert gpu.runtime_reserve_bytes in (GIB, GIB * 3 // 2)
    assert gpu.fp16_tflops >= gpu.fp32_tflops > 0
    assert gpu.memory_bandwidth_gb_s > 0 and gpu.peer_bandwidth_gb_s > 0
    assert 0 < gpu.usable_memory_bytes < gpu.memory_bytes


def test_datasheet_figures_of_the_papers_gpus() -> None:
    t4, p100, v100 = CATALOGUE["T4"], CATALOGUE["P100-12G"], CATALOGUE["V100-32G"]
    assert (t4.memory_bytes, t4.memory_bandwidth_gb_s, t4.fp16_tflops) == (16 * GIB, 320, 65)
    assert t4.runtime_reserve_bytes == GIB
    assert (p100.fp16_tflops, p100.int8_tops, p100.fast_kernel_bits) == (18.7, 0.0, frozenset({16}))
    assert v100.fast_kernel_bits == {8, 16}
    assert v100.runtime_reserve_bytes == GIB * 3 // 2
    assert CATALOGUE["A100-40G"].fast_kernel_bits == {4, 8, 16}
    assert CATALOGUE["T4"].fast_kernel_bits == {4, 8, 16}
    assert CATALOGUE["A800-80G"].peer_bandwidth_gb_s < CATALOGUE["A100-80G"].peer_bandwidth_gb_s


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("t4", "T4"),
        ("Tesla_T4", "T4"),
        ("Tesla T4", "T4"),
        ("V100", "V100-32G"),
        ("A100", "A100-40G"),
        ("H100", "H100-80G"),
        ("A800", "A800-80G"),
        ("v100-16g", "V100-16G"),
        ("Tesla_V100-SXM2-32GB", "V100-32G"),
        ("Tesla V100-PCIE-16GB", "V100-16G"),
        ("Tesla P100-PCIE-12GB", "P100-12G"),
        ("NVIDIA A100-SXM4-80GB", "A100-80G"),
        ("NVIDIA A100-PCIE-40GB", "A100-40G"),
        ("NVIDIA A800-SXM4-80GB", "A800-80G"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("NVIDIA GeForce RTX 3090", "RTX3090"),
        ("NVIDIA H100 80GB HBM3", "H100-80G"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA L4", "L4"),
        ("CPU", "cpu"),
    ],
)
def test_aliases_and_nvml_names_find_the_catalogue_type(name: str, expected: str) -> None:
    found = find_device_type(name)
    assert found is not None
    assert found.name == expected
    assert lookup_device_type(name) is CATALOGUE[expected]


@pytest.mark.parametrize("name", ["", "T5", "Tesla P100-PCIE-16GB", "A100-48G", "NVIDIA A10"])
def test_unknown_names_find_nothing(name: str) -> None:
    assert find_device_type(name) is None


def test_lookup_of_an_unknown_name_raises_a_key_error_listing_the_known_types() -> None:
    with pytest.raises(KeyError, match="unknown device type 'T5'; known types: T4, P100-12G"):
        lookup_device_type("T5")


def test_cpu_device_type_follows_the_cpu_conventions() -> None:
    cpu = cpu_device_type(cores=8, memory_bytes=32 * GIB, memory_bandwidth_gb_s=30.0,
                          fp32_tflops=0.4)  # fmt: skip
    assert (cpu.name, cpu.kind) == ("cpu", "cpu")
    assert cpu.fp16_tflops == cpu.fp32_tflops == 0.4
    assert cpu.int8_tops == pytest.approx(0.8)
    assert cpu.supported_bits == ALL_WEIGHT_BITS
    assert cpu.fast_kernel_bits == {4, 8, 16}
    assert cpu.peer_bandwidth_gb_s == 8.0
    assert cpu.runtime_reserve_bytes == GIB * 3 // 4
    assert (cpu.usable_memory_fraction, cpu.activation_bytes) == (0.85, 4)
    assert (cpu.launch_overhead_s, cpu.dequant_gelem_s) == (20e-6, 0.5)
    assert cpu.dense_weight_bytes == 4  # no native bf16: 16-bit weights stay fp32


def test_a_cpu_with_native_bf16_stores_16_bit_weights_in_2_bytes() -> None:
    cpu = cpu_device_type(cores=8, memory_bytes=32 * GIB, memory_bandwidth_gb_s=30.0,
                          fp32_tflops=0.4, native_bf16=True)  # fmt: skip
    assert (cpu.activation_bytes, cpu.dense_weight_bytes) == (4, 2)
    assert CATALOGUE["cpu"].dense_weight_bytes == 4


def test_gpus_store_16_bit_weights_at_their_compute_width() -> None:
    for device_type in CATALOGUE.values():
        if device_type.kind == "gpu":
            assert device_type.dense_weight_bytes == device_type.activation_bytes == 2


def test_cpu_device_type_rejects_non_positive_figures() -> None:
    with pytest.raises(ValueError, match="CPU figures must be positive"):
        cpu_device_type(cores=0, memory_bytes=GIB, memory_bandwidth_gb_s=1.0, fp32_tflops=1.0)


def test_gpu_device_type_defaults_for_a_custom_gpu() -> None:
    npu = gpu_device_type("custom-npu", 24, 800, 100)
    expected = DeviceType(
        name="custom-npu", kind="gpu", memory_bytes=24 * GIB, memory_bandwidth_gb_s=800,
        fp16_tflops=100, fp32_tflops=25, int8_tops=200, supported_bits=ALL_WEIGHT_BITS,
        fast_kernel_bits=frozenset({4, 8, 16}), peer_bandwidth_gb_s=24.0,
        runtime_reserve_bytes=GIB, usable_memory_fraction=0.95, activation_bytes=2,
        launch_overhead_s=5e-6, dequant_gelem_s=400,
    )  # fmt: skip
    assert npu == expected
    assert gpu_device_type("big", 48, 800, 100).runtime_reserve_bytes == GIB * 3 // 2


def test_device_types_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CATALOGUE["T4"].memory_bytes = 1  # type: ignore[misc]
