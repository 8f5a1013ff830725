"""Live figures of a host's devices: CPU busy share and RAM from /proc, NVIDIA GPUs through NVML
(None where a figure cannot be read, never zero), and :class:`NodeTelemetry`, which samples a
Ray node's devices once a second on that node for a dashboard elsewhere.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_PROC_STAT = Path("/proc/stat")
_PROC_MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """One reading of a device; None where the device cannot report the figure.

    Attributes:
        utilisation_percent: share of the last interval the device was busy, 0-100.
        memory_used_bytes: memory in use, bytes.
        memory_total_bytes: memory installed, bytes.
    """

    utilisation_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None


NOT_AVAILABLE = DeviceSample()


class CpuSampler:
    """Whole-host CPU busy share (from /proc/stat deltas) and RAM in use (/proc/meminfo)."""

    def __init__(self, stat: Path = _PROC_STAT, meminfo: Path = _PROC_MEMINFO) -> None:
        self.stat, self.meminfo = stat, meminfo
        self._previous: tuple[int, int] | None = None

    def _times(self) -> tuple[int, int] | None:
        """(busy, total) jiffies since boot, or None when /proc/stat is unreadable."""
        try:
            first = self.stat.read_text().splitlines()[0].split()
            values = [int(v) for v in first[1:9]]
        except (OSError, IndexError, ValueError):
            return None
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        total = sum(values)
        return total - idle, total

    def utilisation_percent(self) -> float | None:
        """Busy share since the previous call (None on the first call)."""
        now = self._times()
        before, self._previous = self._previous, now
        if now is None or before is None or now[1] <= before[1]:
            return None
        return 100.0 * (now[0] - before[0]) / (now[1] - before[1])

    def memory_bytes(self) -> tuple[int | None, int | None]:
        """(used, total) RAM in bytes: used = MemTotal - MemAvailable."""
        try:
            fields = {}
            for line in self.meminfo.read_text().splitlines():
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    fields[key] = int(parts[0]) * 1024
        except (OSError, ValueError):
            return None, None
        total, available = fields.get("MemTotal"), fields.get("MemAvailable")
        if total is None or available is None:
            return None, total
        return total - available, total

    def sample(self) -> DeviceSample:
        used, total = self.memory_bytes()
        return DeviceSample(self.utilisation_percent(), used, total)


class NvmlSampler:
    """Utilisation and memory of this host's NVIDIA GPUs; inert without a driver."""

    def __init__(self) -> None:
        self._nvml: Any = None
        self.reason = ""

    def open(self) -> str:
        """Initialise NVML; the reason it is unavailable ("" when it works)."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
        except Exception as exc:  # pynvml.NVMLError and its many subclasses
            self.reason = f"no NVIDIA driver ({exc})"
        else:
            self._nvml = pynvml
        return self.reason

    def sample(self, index: int) -> DeviceSample:
        nvml = self._nvml
        if nvml is None:
            return NOT_AVAILABLE
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        except nvml.NVMLError:
            return NOT_AVAILABLE
        try:
            utilisation: float | None = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:
            utilisation = None
        return DeviceSample(utilisation, int(memory.used), int(memory.total))

    def close(self) -> None:
        if self._nvml is not None:
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
            self._nvml = None


Reading = tuple[float | None, int | None, int | None]
"""A sample as plain data (utilisation %, memory used, memory total), for Ray to carry."""


class NodeTelemetry:
    """On one node (a Ray actor): its CPU (index -1) and the GPUs at ``gpu_indices`` sampled
    every ``interval_s`` on a thread; :meth:`latest` returns the last reading of each."""

    def __init__(self, gpu_indices: Sequence[int], cpu: bool, interval_s: float = 1.0) -> None:
        self.indices = [*gpu_indices, *([-1] if cpu else [])]
        self.interval_s = interval_s
        self.readings: dict[int, Reading] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cpu, gpus = CpuSampler(), NvmlSampler()
        if any(i >= 0 for i in self.indices):
            gpus.open()
        try:
            while not self._stop.is_set():
                for index in self.indices:
                    s = cpu.sample() if index < 0 else gpus.sample(index)
                    self.readings[index] = (
                        s.utilisation_percent,
                        s.memory_used_bytes,
                        s.memory_total_bytes,
                    )
                self._stop.wait(self.interval_s)
        finally:
            gpus.close()

    def latest(self) -> dict[int, Reading]:
        return dict(self.readings)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
