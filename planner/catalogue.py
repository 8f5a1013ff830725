"""Device catalogue: datasheet figures of the GPUs pqctl knows, and a CPU template.

Every entry fills every :class:`~planner.cluster.DeviceType` field. Conventions:

- ``memory_bytes`` is the nominal size of the datasheet, read as GiB (a "16 GB" T4 is 16 GiB
  here); what the planner may fill is ``usable_memory_bytes`` (95 % of it, less the reserve).
- ``fp16_tflops`` and ``int8_tops`` are *dense* tensor-core figures (no 2:4 sparsity), with fp32
  accumulation on GeForce parts (what PyTorch uses).
- ``runtime_reserve_bytes``: CUDA context (~0.4-0.5 GiB) plus allocator slack. 1.0 GiB on cards
  of up to 24 GiB (T4, P100, V100-16G, L4, A10G, RTX 3090/4090), 1.5 GiB on larger ones, whose
  bigger batches leave more fragmentation. LLM-PQ used a flat 1930 MB.
- ``peer_bandwidth_gb_s``: effective device-to-device copy rate on one host: PCIe gen3 x16
  ~12 GB/s, gen4 ~24, gen5 ~48; NVLink parts a conservative share of the NVLink peak.
- ``fast_kernel_bits``: weight-only precisions with fused dequantizing kernels. Ampere and
  later, and Turing: 4, 8 and 16 (2 and 3 bits run only through slower generic kernels);
  Volta: 8 and 16; Pascal: 16 only. Every GPU can *run* 2, 3, 4, 8 and 16 bits.
- ``dequant_gelem_s`` (10^9 weight elements/s) scales with memory bandwidth: bandwidth / 2.

Names seen in the wild (NVML's ``"Tesla_V100-SXM2-32GB"``, ``"NVIDIA GeForce RTX 4090"``) map to
catalogue names through :func:`find_device_type`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from planner.cluster import GIB, DeviceType

ALL_WEIGHT_BITS = frozenset({2, 3, 4, 8, 16})
"""Weight precisions every catalogued device can run, bits."""

DEFAULT_CPU_TFLOPS_PER_CORE = 0.05
"""fp32 throughput assumed per CPU core when none is given (realistic AVX2 FMA rate), TFLOPS."""

_AMPERE_FAST_BITS = frozenset({4, 8, 16})
_VOLTA_FAST_BITS = frozenset({8, 16})
_PASCAL_FAST_BITS = frozenset({16})

_PCIE_GEN3_GB_S = 12.0
_PCIE_GEN4_GB_S = 24.0


def default_runtime_reserve_bytes(memory_bytes: int) -> int:
    """Reserve for CUDA context and allocator slack on a GPU of ``memory_bytes``, bytes.

    Args:
        memory_bytes: the GPU's nominal memory, bytes.

    Returns:
        1.0 GiB for GPUs of up to 24 GiB, else 1.5 GiB.
    """
    return GIB if memory_bytes <= 24 * GIB else GIB * 3 // 2


def gpu_device_type(
    name: str,
    memory_gib: float,
    memory_bandwidth_gb_s: float,
    fp16_tflops: float,
    *,
    fp32_tflops: float | None = None,
    int8_tops: float | None = None,
    fast_kernel_bits: frozenset[int] = _AMPERE_FAST_BITS,
    peer_bandwidth_gb_s: float = _PCIE_GEN4_GB_S,
) -> DeviceType:
    """A GPU device type from its main figures; the rest follows the module's conventions.

    Args:
        name: the type's name, e.g. ``"T4"``.
        memory_gib: nominal memory, GiB.
        memory_bandwidth_gb_s: peak DRAM bandwidth, GB/s.
        fp16_tflops: dense fp16 tensor throughput, TFLOPS.
        fp32_tflops: dense fp32 throughput, TFLOPS; default ``fp16_tflops / 4``.
        int8_tops: dense int8 throughput, TOPS; default ``2 * fp16_tflops``.
        fast_kernel_bits: precisions with fused dequantizing kernels, bits.
        peer_bandwidth_gb_s: device-to-device bandwidth on one host, GB/s (default PCIe gen4).

    Returns:
        The device type (kind ``"gpu"``, fp16 activations, every weight precision supported).
    """
    memory_bytes = int(memory_gib * GIB)
    return DeviceType(
        name=name,
        kind="gpu",
        memory_bytes=memory_bytes,
        memory_bandwidth_gb_s=float(memory_bandwidth_gb_s),
        fp16_tflops=float(fp16_tflops),
        fp32_tflops=float(fp16_tflops / 4 if fp32_tflops is None else fp32_tflops),
        int8_tops=float(2 * fp16_tflops if int8_tops is None else int8_tops),
        supported_bits=ALL_WEIGHT_BITS,
        fast_kernel_bits=fast_kernel_bits,
        peer_bandwidth_gb_s=float(peer_bandwidth_gb_s),
        runtime_reserve_bytes=default_runtime_reserve_bytes(memory_bytes),
        usable_memory_fraction=0.95,
        activation_bytes=2,
        launch_overhead_s=5e-6,
        dequant_gelem_s=float(memory_bandwidth_gb_s) / 2,
        dense_weight_bytes=2,
    )


def cpu_device_type(
    cores: int,
    memory_bytes: int,
    memory_bandwidth_gb_s: float,
    fp32_tflops: float,
    *,
    native_bf16: bool = False,
    packed_kernels: bool = False,
) -> DeviceType:
    """The device type of a host's CPU (name and kind ``"cpu"``).

    The runtime computes in fp32 on a CPU (4 activation bytes). fp16/bf16 matmuls are counted at
    the fp32 rate, so ``fp16_tflops`` equals ``fp32_tflops``; int8 weight-only matmuls reach
    about twice the fp32 rate. PyTorch has CPU int8 and int4 weight-only kernels, hence fast
    kernels for 4, 8 and 16 bits; pqctl's native kernels add 2 and 3 where the CPU takes them.
    16-bit weights (and per-call dequantized copies) are stored as bf16 (2 bytes) where the CPU
    has native bf16 dot products, else as fp32 (4 bytes): the rule of
    ``runtime.quant.kernels.dense_weight_dtype``. The runtime reserve is the Python + torch
    process baseline (0.75 GiB) and only 85 % of RAM is planned, as the OS and other processes
    share it.

    Args:
        cores: logical cores the stage process may use (must be positive; the figures below
            already account for them).
        memory_bytes: RAM the process may use, bytes.
        memory_bandwidth_gb_s: DRAM bandwidth, GB/s.
        fp32_tflops: dense fp32 matmul throughput, TFLOPS.
        native_bf16: the CPU has native bf16 dot products (``avx512_bf16`` or AMX; see
            :func:`planner.local_host.cpu_has_native_bf16`).
        packed_kernels: 2 and 3 bits have fast kernels there too (pqctl's native ones, see
            :func:`planner.local_host.cpu_has_packed_kernels`); else they dequantize per call.

    Returns:
        The CPU's device type.

    Raises:
        ValueError: a figure is not positive.
    """
    figures = (cores, memory_bytes, memory_bandwidth_gb_s, fp32_tflops)
    if min(figures) <= 0:
        raise ValueError(f"CPU figures must be positive, got {figures}")
    return DeviceType(
        name="cpu",
        kind="cpu",
        memory_bytes=memory_bytes,
        memory_bandwidth_gb_s=float(memory_bandwidth_gb_s),
        fp16_tflops=float(fp32_tflops),
        fp32_tflops=float(fp32_tflops),
        int8_tops=2.0 * fp32_tflops,
        supported_bits=ALL_WEIGHT_BITS,
        fast_kernel_bits=frozenset({2, 3, 4, 8, 16} if packed_kernels else {4, 8, 16}),
        peer_bandwidth_gb_s=8.0,  # process-to-process copies over loopback
        runtime_reserve_bytes=GIB * 3 // 4,
        usable_memory_fraction=0.85,
        activation_bytes=4,
        launch_overhead_s=20e-6,
        dequant_gelem_s=0.5,
        dense_weight_bytes=2 if native_bf16 else 4,
    )


def _datasheet(
    name: str,
    memory_gib: float,
    memory_bandwidth_gb_s: float,
    fp16_tflops: float,
    fp32_tflops: float,
    int8_tops: float,
    fast_kernel_bits: frozenset[int],
    peer_bandwidth_gb_s: float,
) -> DeviceType:
    """One catalogue row (positional, to keep the table below one line per device)."""
    return gpu_device_type(
        name,
        memory_gib,
        memory_bandwidth_gb_s,
        fp16_tflops,
        fp32_tflops=fp32_tflops,
        int8_tops=int8_tops,
        fast_kernel_bits=fast_kernel_bits,
        peer_bandwidth_gb_s=peer_bandwidth_gb_s,
    )


def _catalogue() -> dict[str, DeviceType]:
    """Build the catalogue entries (sources in the comments)."""
    row = _datasheet
    ampere, volta, pascal = _AMPERE_FAST_BITS, _VOLTA_FAST_BITS, _PASCAL_FAST_BITS
    gen3, gen4 = _PCIE_GEN3_GB_S, _PCIE_GEN4_GB_S
    types = [
        # name, GiB, GB/s, fp16 TFLOPS, fp32 TFLOPS, int8 TOPS, fast bits, peer GB/s
        # NVIDIA T4 datasheet: 16 GB GDDR6 320 GB/s, 65 fp16 / 8.1 fp32 TFLOPS, 130 int8 TOPS.
        row("T4", 16, 320, 65, 8.1, 130, ampere, gen3),
        # NVIDIA Tesla P100 PCIe 12 GB datasheet: 549 GB/s, 18.7 fp16 / 9.3 fp32, no int8 units.
        row("P100-12G", 12, 549, 18.7, 9.3, 0, pascal, gen3),
        # NVIDIA V100 SXM2 datasheet: 900 GB/s, 125 tensor / 15.7 fp32; int8 only via dp4a
        # (4 x fp32 rate, ~62 TOPS); NVLink 2 peak 300 GB/s, 130 GB/s assumed for copies.
        row("V100-16G", 16, 900, 125, 15.7, 62, volta, 130),
        row("V100-32G", 32, 900, 125, 15.7, 62, volta, 130),
        # NVIDIA A100 SXM4 datasheet: 1555 GB/s (40 GB) / 2039 GB/s (80 GB), 312 fp16 tensor,
        # 19.5 fp32, 624 int8 TOPS; NVLink 3 peak 600 GB/s, 200 GB/s assumed.
        row("A100-40G", 40, 1555, 312, 19.5, 624, ampere, 200),
        row("A100-80G", 80, 2039, 312, 19.5, 624, ampere, 200),
        # NVIDIA A800 SXM4 80 GB: A100 silicon, NVLink cut to 400 GB/s peak: 160 GB/s assumed.
        row("A800-80G", 80, 2039, 312, 19.5, 624, ampere, 160),
        # NVIDIA L4 datasheet: 24 GB GDDR6 300 GB/s, 121 fp16 / 30.3 fp32, 242.5 int8 (dense).
        row("L4", 24, 300, 121, 30.3, 242.5, ampere, gen4),
        # AWS A10G (GA102; no NVIDIA datasheet, AWS G5 figures): 24 GB 600 GB/s, 70 fp16
        # tensor, 31.2 fp32, 140 int8 TOPS.
        row("A10G", 24, 600, 70, 31.2, 140, ampere, gen4),
        # NVIDIA Ampere GA102 whitepaper, RTX 3090: 936 GB/s, 71 fp16 tensor (fp32 accumulate),
        # 35.6 fp32, 284 int8 TOPS.
        row("RTX3090", 24, 936, 71, 35.6, 284, ampere, gen4),
        # NVIDIA Ada whitepaper, RTX 4090: 1008 GB/s, 165.2 fp16 tensor (fp32 accumulate),
        # 82.6 fp32, 660.6 int8 TOPS; no P2P, copies are staged through host memory.
        row("RTX4090", 24, 1008, 165.2, 82.6, 660.6, ampere, gen4),
        # NVIDIA H100 SXM5 datasheet: 3350 GB/s, 989 fp16 tensor, 67 fp32, 1979 int8 TOPS
        # (dense); NVLink 4 peak 900 GB/s, 400 GB/s assumed.
        row("H100-80G", 80, 3350, 989, 67, 1979, ampere, 400),
        # NVIDIA H200 SXM datasheet: 141 GB HBM3e 4800 GB/s, compute as H100 SXM5.
        row("H200", 141, 4800, 989, 67, 1979, ampere, 400),
        # Generic CPU template: 16 cores, 64 GiB, 40 GB/s, 0.05 fp32 TFLOPS per core, no
        # native bf16 (fp32 16-bit weights: the larger, safe count). Use cpu_device_type() or
        # planner.local_host.measure_local_cpu() for a real one.
        cpu_device_type(16, 64 * GIB, 40.0, 16 * DEFAULT_CPU_TFLOPS_PER_CORE),
    ]
    return {t.name: t for t in types}


CATALOGUE: Mapping[str, DeviceType] = MappingProxyType(_catalogue())
"""Catalogued device types by name (read-only)."""

_DEFAULT_VARIANT: Mapping[str, str] = MappingProxyType(
    {"V100": "V100-32G", "A100": "A100-40G", "A800": "A800-80G", "H100": "H100-80G"}
)
"""The variant a bare family name (no memory size) means; V100-32G is the paper's."""

_MEMORY_RE = re.compile(r"(?<![A-Z0-9.])(\d+)\s*(?:GIB|GB|G)(?![A-Z0-9])")
_NOISE_RE = re.compile(r"\b(?:NVIDIA|TESLA|GEFORCE|SXM[2-5]?|PCIE|HBM\d?E?)\b")


def _family_and_memory_gib(name: str) -> tuple[str, int | None]:
    """Split a device name into a normalised family and the memory size it names, if any.

    ``"Tesla_V100-SXM2-32GB"`` -> ``("V100", 32)``; ``"NVIDIA GeForce RTX 4090"`` ->
    ``("RTX4090", None)``.
    """
    text = re.sub(r"[\s_\-/]+", " ", name.upper())
    match = _MEMORY_RE.search(text)
    memory_gib = int(match.group(1)) if match else None
    if match:
        text = text[: match.start()] + " " + text[match.end() :]
    text = _NOISE_RE.sub(" ", text)
    return re.sub(r"[^A-Z0-9]", "", text), memory_gib


def find_device_type(name: str) -> DeviceType | None:
    """The catalogued device type a name means, or None when the catalogue has none.

    Matching ignores case, the words NVIDIA, Tesla, GeForce, SXM2/4/5, PCIe and HBM, spaces,
    underscores and dashes, and reads a memory size written as digits followed by GB/GiB/G.
    A bare family means its default variant (``"V100"`` -> V100-32G, ``"A100"`` -> A100-40G,
    ``"H100"`` -> H100-80G, ``"A800"`` -> A800-80G). A memory size that no variant has gives None.

    Args:
        name: a catalogue name, an alias or a name as NVML reports it.

    Returns:
        The device type, or None.
    """
    family, memory_gib = _family_and_memory_gib(name)
    if not family:
        return None
    candidates = [
        device_type
        for device_type in CATALOGUE.values()
        if _family_and_memory_gib(device_type.name)[0] == family
    ]
    if memory_gib is not None:
        sized = [t for t in candidates if round(t.memory_bytes / GIB) == memory_gib]
        return sized[0] if len(sized) == 1 else None
    if len(candidates) == 1:
        return candidates[0]
    default = _DEFAULT_VARIANT.get(family)
    return CATALOGUE[default] if default is not None else None


def lookup_device_type(name: str) -> DeviceType:
    """Like :func:`find_device_type`, but an unknown name raises.

    Args:
        name: a catalogue name, an alias or a name as NVML reports it.

    Returns:
        The device type.

    Raises:
        KeyError: the catalogue has no such device; the message lists the known types.
    """
    device_type = find_device_type(name)
    if device_type is None:
        known = ", ".join(known_device_types())
        raise KeyError(f"unknown device type {name!r}; known types: {known}")
    return device_type


def known_device_types() -> list[str]:
    """Catalogue names in catalogue order (GPUs, then ``"cpu"``)."""
    return list(CATALOGUE)
