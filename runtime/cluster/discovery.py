"""Local GPU discovery through NVML, with a clean fallback when there is no NVIDIA driver.

Only facts NVML reports are returned; mapping a GPU name to datasheet figures is the
planner's business (``planner.catalogue``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One NVIDIA GPU as NVML reports it (bytes, percent, MHz)."""

    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    compute_capability: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class GpuDiscovery:
    """The GPUs found, or why none could be read (``reason`` is empty when NVML worked)."""

    gpus: tuple[GpuInfo, ...]
    driver_version: str = ""
    reason: str = ""


def _optional(call: Any, *args: Any) -> Any:
    """NVML fields that old drivers or some GPUs do not support come back as None."""
    import pynvml

    try:
        return call(*args)
    except pynvml.NVMLError:
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _gpu(index: int) -> GpuInfo:
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    capability = _optional(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
    return GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=_text(_optional(pynvml.nvmlDeviceGetUUID, handle) or ""),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        compute_capability=tuple(capability) if capability else None,
    )


def discover_gpus() -> GpuDiscovery:
    """Every NVIDIA GPU of this host; an empty result with a reason when NVML is absent."""
    try:
        import pynvml
    except ImportError:
        return GpuDiscovery((), reason="nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuDiscovery((), reason=f"no NVIDIA driver ({_text(exc)})")
    try:
        count = pynvml.nvmlDeviceGetCount()
        driver = _text(_optional(pynvml.nvmlSystemGetDriverVersion) or "")
        return GpuDiscovery(tuple(_gpu(i) for i in range(count)), driver_version=driver)
    except pynvml.NVMLError as exc:
        return GpuDiscovery((), reason=f"NVML failed ({_text(exc)})")
    finally:
        pynvml.nvmlShutdown()
