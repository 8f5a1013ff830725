"""The local host as a cluster: its CPU measured in well under a second, or given GPUs.

GPU discovery (NVML) belongs to the runtime; callers pass the GPUs' device types in. The CPU
figures are measured with numpy: every usable core summing its share of one array at once for
memory bandwidth (a decode step reads its weights so) and a float32 matmul through the BLAS numpy
links for fp32 throughput. Whether the CPU has native bf16 dot products (which decides the width
the runtime stores 16-bit weights at) is read from the CPU flags in ``/proc/cpuinfo``.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from planner.catalogue import cpu_device_type
from planner.cluster import GIB, ClusterSpec, DeviceSpec, DeviceType, HostSpec

_MEMINFO = Path("/proc/meminfo")
_CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_tile"})
"""CPU flags meaning native bf16 dot products: the flags behind torch's
``torch.cpu._is_avx512_bf16_supported`` / ``_is_amx_tile_supported`` probes, which
``runtime.quant.kernels.dense_weight_dtype`` uses to store 16-bit weights as bf16."""
PACKED_KERNEL_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_bf16", "avx512vbmi"})
"""CPU flags pqctl's 2- and 3-bit kernels need (bf16 dot products and byte permutations)."""
_FALLBACK_MEMORY_BYTES = 4 * GIB
_READ_BUFFER_BYTES = 128 * 1024**2


def usable_cores() -> int:
    """Logical cores this process may run on (its CPU affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def available_memory_bytes(meminfo: Path = _MEMINFO) -> int:
    """RAM available to a new process, bytes.

    Reads ``MemAvailable`` from ``/proc/meminfo``, else ``MemTotal``, else the physical memory
    ``os.sysconf`` reports, else assumes a conservative 4 GiB.

    Args:
        meminfo: the meminfo file to read (a parameter for tests).

    Returns:
        The available memory, bytes.
    """
    try:
        fields = dict(_meminfo_entry(line) for line in meminfo.read_text().splitlines())
    except (OSError, ValueError):
        fields = {}
    for key in ("MemAvailable", "MemTotal"):
        if fields.get(key, 0) > 0:
            return fields[key]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return _FALLBACK_MEMORY_BYTES


def _meminfo_entry(line: str) -> tuple[str, int]:
    """``"MemTotal:  1024 kB"`` -> ``("MemTotal", 1048576)``: the value in bytes."""
    key, _, rest = line.partition(":")
    parts = rest.split()
    scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
    return key.strip(), int(parts[0]) * scale if parts else 0


def _cpu_flags(cpuinfo: Path) -> frozenset[str]:
    """The first ``flags`` line of ``cpuinfo``; empty where the file is missing or unreadable."""
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: Path = _CPUINFO) -> bool:
    """Whether this CPU multiplies bf16 natively: any of :data:`NATIVE_BF16_FLAGS` among the
    ``flags`` of ``/proc/cpuinfo``.

    The same rule as ``runtime.quant.kernels.dense_weight_dtype`` (which asks torch), read without
    torch. Where the file is missing or unreadable (not Linux) the answer is False, so 16-bit
    weights are counted at 4 bytes: never less memory than the runtime uses there.

    Args:
        cpuinfo: the cpuinfo file to read (a parameter for tests).

    Returns:
        True when the first ``flags`` line names one of the flags.
    """
    return not NATIVE_BF16_FLAGS.isdisjoint(_cpu_flags(cpuinfo))


def cpu_has_packed_kernels(cpuinfo: Path = _CPUINFO) -> bool:
    """Whether this host's stages read 2- and 3-bit weights as packed, through pqctl's native
    kernels (``runtime.quant.native``: ``native-int3``/``native-int2``): the CPU has all of
    :data:`PACKED_KERNEL_FLAGS`, a C compiler is found as the runtime looks for one (``$CC``,
    ``gcc``, ``cc``) and ``PQCTL_NATIVE_KERNELS`` is not ``0``. Else those precisions dequantize
    per call there, 20-30× slower than 16 bits in decode.

    Args:
        cpuinfo: the cpuinfo file to read (a parameter for tests).
    """
    if os.environ.get("PQCTL_NATIVE_KERNELS", "1").strip() == "0":
        return False
    compilers = (os.environ.get("CC"), "gcc", "cc")
    if not any(c and shutil.which(c) for c in compilers):
        return False
    return PACKED_KERNEL_FLAGS.issubset(_cpu_flags(cpuinfo))


def _best_time_s(action: Callable[[], object], repeats: int) -> float:
    """Shortest wall time of ``repeats`` calls of ``action`` after one warm-up call, seconds."""
    action()
    best_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        best_s = min(best_s, time.perf_counter() - start)
    return max(best_s, 1e-9)


def measure_memory_bandwidth_gb_s(
    buffer_bytes: int = _READ_BUFFER_BYTES, repeats: int = 3, threads: int | None = None
) -> float:
    """DRAM read bandwidth, best of ``repeats``, GB/s: ``threads`` threads (default
    :func:`usable_cores`) each summing its share of one buffer, all at once, as a stage's decode
    step reads its weights on every core (numpy's sum releases the GIL).

    An array copy, the earlier measure (read + write counted), read 21-23 GB/s on a 2-core Zen 4
    EPYC where this reads 50 and a 16-bit decode step's linears 30-39: the cost model priced that
    host's decode at twice its time.

    Args:
        buffer_bytes: size of the buffer, bytes (large enough to miss the caches).
        repeats: timed reads.
        threads: readers at once.

    Returns:
        Bytes read per second, GB/s.
    """
    buffer = np.ones(max(1, buffer_bytes // 8), dtype=np.float64)  # its pages touched here
    parts = np.array_split(buffer, max(1, threads or usable_cores()))
    with ThreadPoolExecutor(len(parts)) as pool:
        elapsed_s = _best_time_s(lambda: list(pool.map(np.sum, parts)), repeats)
    return buffer.nbytes / elapsed_s / 1e9


def measure_fp32_tflops(repeats: int = 3) -> float:
    """Dense float32 matmul throughput of numpy's BLAS, best of ``repeats``, TFLOPS.

    A 512 × 512 product is timed first; a fast BLAS (under 5 ms for it) is then measured on
    1024 × 1024, so a slow reference BLAS still finishes quickly.

    Args:
        repeats: timed products per size.

    Returns:
        2·n³ FLOP per product over the best time, TFLOPS.
    """
    tflops = 0.0
    for size in (512, 1024):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        elapsed_s = _best_time_s(partial(np.matmul, a, b), repeats)
        tflops = 2 * size**3 / elapsed_s / 1e12
        if elapsed_s > 5e-3:
            break
    return tflops


def measure_local_cpu() -> DeviceType:
    """The local CPU as a device type: cores, available RAM, measured bandwidth and fp32 rate,
    whether 16-bit weights are stored as bf16 (:func:`cpu_has_native_bf16`) and whether 2 and 3
    bits have fast kernels (:func:`cpu_has_packed_kernels`).

    Takes well under a second (a 128 MiB buffer copied and a few matmuls, best of 3 each).

    Returns:
        A ``"cpu"`` device type (see :func:`planner.catalogue.cpu_device_type`).
    """
    return cpu_device_type(
        cores=usable_cores(),
        memory_bytes=available_memory_bytes(),
        memory_bandwidth_gb_s=measure_memory_bandwidth_gb_s(),
        fp32_tflops=measure_fp32_tflops(),
        native_bf16=cpu_has_native_bf16(),
        packed_kernels=cpu_has_packed_kernels(),
    )


def local_cluster(
    host_name: str | None = None,
    gpus: Sequence[DeviceType] = (),
    *,
    cpu: DeviceType | None = None,
) -> ClusterSpec:
    """A one-host cluster named ``"local"``: the given GPUs, or else the measured CPU.

    When GPUs are given the CPU is left out: a GPU is one to two orders of magnitude faster, and
    a CPU stage would slow the whole pipeline down.

    Args:
        host_name: the host's name; default ``socket.gethostname()``.
        gpus: device types of the host's GPUs in CUDA ordinal order (indices 0, 1, ...).
        cpu: the CPU's device type when there are no GPUs; default :func:`measure_local_cpu`.

    Returns:
        The cluster (GPUs at indices 0.., or the CPU at index -1).
    """
    host = host_name or socket.gethostname() or "localhost"
    if gpus:
        devices = tuple(DeviceSpec(host=host, index=i, type=gpu) for i, gpu in enumerate(gpus))
    else:
        cpu_type = cpu if cpu is not None else measure_local_cpu()
        devices = (DeviceSpec(host=host, index=-1, type=cpu_type),)
    return ClusterSpec(name="local", hosts=(HostSpec(name=host),), devices=devices)
