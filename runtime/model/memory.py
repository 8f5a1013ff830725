"""Free memory of a device, bytes: the last check before a stage loads; handing memory the C
allocator keeps after a large temporary is freed back to the system; and host weights in
transparent huge pages."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free bytes, or the host's available RAM."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def host_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable from /proc/meminfo, else physical pages × page size."""
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim  # type: ignore[no-any-return]


def release_freed_host_memory() -> None:
    """Return the host memory the C allocator holds in free blocks to the system.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so later
    temporaries of that size come from its heaps, and freed heap blocks below a live one are
    kept: a loader that frees one large temporary per weight would keep most of them resident.
    Calling this after each such temporary keeps the process at what it holds. A no-op where
    the C library has no ``malloc_trim``.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


HUGE_PAGE = 2 << 20
"""Bytes of a transparent huge page on x86-64 and most aarch64 kernels."""

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@functools.cache
def huge_pages_available(setting: Path = THP_SETTING) -> bool:
    """Whether memory advised with ``MADV_HUGEPAGE`` can get transparent huge pages: Linux with
    the kernel's setting ``always`` or ``madvise`` (not ``never``, not another OS)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        chosen = setting.read_text(encoding="ascii")
    except OSError:
        return False
    return "[always]" in chosen or "[madvise]" in chosen


def huge_page_zeros(shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """A zero-filled host tensor whose 2 MiB-aligned whole pages are advised for transparent
    huge pages (where :func:`huge_pages_available`; else ``torch.zeros``).

    A decode step reads every weight once: with 4 KiB pages each row of a bf16 2048-wide
    weight is its own page and its own TLB miss. The tensor starts on a huge-page boundary; the
    part past its last whole huge page stays in small pages, so nothing beyond its bytes (rounded
    to 4 KiB) becomes resident. The memory is an anonymous mapping the tensor keeps alive.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.zeros(tuple(shape), dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive; touches nothing
    start = -raw.data_ptr() % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return raw[start : start + nbytes].view(dtype).view(tuple(shape))


def onto_huge_pages(module: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move ``module``'s host parameters and buffers of at least ``min_bytes`` into memory
    advised for huge pages (:func:`huge_page_zeros`), one at a time; return the bytes moved.

    Only contiguous tensors that span their whole storage move; tensors sharing one storage
    (a tied embedding and LM head) keep sharing its copy. The same values, at new addresses:
    each tensor object keeps its identity (``.data`` is replaced), so modules holding it see the
    copy. Tensors on other devices stay; a no-op where huge pages are not available.
    """
    if not huge_pages_available():
        return 0
    moved: dict[int, Tensor] = {}  # old storage address -> its copy
    total = 0
    for sub in module.modules():
        for tensor in [*sub._parameters.values(), *sub._buffers.values()]:
            if tensor is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
                continue
            storage = tensor.untyped_storage()
            if tensor.nbytes < min_bytes or storage.nbytes() != tensor.nbytes:
                continue
            key = storage.data_ptr()
            if key not in moved:
                copy = huge_page_zeros(tensor.shape, tensor.dtype)
                copy.copy_(tensor.detach())
                moved[key] = copy
                total += tensor.nbytes
            with torch.no_grad():
                tensor.data = moved[key]
    if total:
        release_freed_host_memory()  # the small-page originals
    return total
