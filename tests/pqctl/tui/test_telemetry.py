"""Device sampling from /proc (fake files here) and the text renderers behind the sparklines
and bars."""

from __future__ import annotations

from pathlib import Path

from rich.style import Style

from pqctl.tui.telemetry import NOT_AVAILABLE, CpuSampler, HostSampler
from pqctl.tui.widgets.figures import bar, human_bytes, human_rate, spark

MEMINFO = "MemTotal:       16384000 kB\nMemFree:         1000 kB\nMemAvailable:    4096000 kB\n"


def _stat(user: int, idle: int) -> str:
    return f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n"


def test_cpu_utilisation_from_proc_stat_deltas(tmp_path: Path) -> None:
    stat, meminfo = tmp_path / "stat", tmp_path / "meminfo"
    meminfo.write_text(MEMINFO)
    stat.write_text(_stat(100, 900))
    sampler = CpuSampler(stat, meminfo)
    first = sampler.sample()
    assert first.utilisation_percent is None  # no interval yet
    assert first.memory_total_bytes == 16384000 * 1024
    assert first.memory_used_bytes == (16384000 - 4096000) * 1024
    stat.write_text(_stat(175, 925))  # 75 busy of 100 jiffies
    assert sampler.sample().utilisation_percent == 75.0


def test_unreadable_proc_gives_not_available(tmp_path: Path) -> None:
    sampler = CpuSampler(tmp_path / "missing", tmp_path / "missing")
    assert sampler.sample() == NOT_AVAILABLE
    assert sampler.sample() == NOT_AVAILABLE


def test_only_this_hosts_devices_are_sampled() -> None:
    sampler = HostSampler(
        ["here/cpu", "here/cuda:1", "there/cuda:0", "there/cpu"], local_names={"here"}
    )
    assert sampler.local == {"here/cpu": -1, "here/cuda:1": 1}
    samples = sampler.sample()  # no NVIDIA driver here: the GPU reports nothing
    assert set(samples) == {"here/cpu", "here/cuda:1"}
    assert samples["here/cpu"].memory_total_bytes
    sampler.close()


def test_sparkline_scales_pads_and_leaves_gaps() -> None:
    assert spark([0.0, 50.0, 100.0], 5, 100.0) == "  ▁▅█"
    assert spark([1.0, None, 2.0], 3) == "▅ █"
    assert spark([], 4) == "    "
    assert spark(list(range(20)), 4) == spark([16, 17, 18, 19], 4)


def test_bars_and_units() -> None:
    full, empty = Style(color="green"), Style(color="grey50")
    assert bar(0.5, 8, full, empty).plain == "████░░░░"
    assert bar(None, 3, full, empty).plain == "···"
    assert bar(7.0, 2, full, empty).plain == "██"
    assert human_bytes(3 * 1024**3) == "3.0G" and human_bytes(5 * 1024**2) == "5M"
    assert human_bytes(None) == "N/A"
    assert [human_rate(v) for v in (None, 12.34, 845, 12345, 2.5e6)] == [
        "–",
        "12.3",
        "845",
        "12.3k",
        "2.5M",
    ]
