"""Cluster view: every host and device, live memory and utilisation, exclusion from planning."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.markup import escape
from textual.widgets import DataTable, Static
from textual.worker import get_current_worker

from planner.cluster import ClusterSpec, DeviceSpec
from pqctl.plan_inputs import ResolvedCluster
from pqctl.tui.messages import DeviceSamples, ExclusionChanged
from pqctl.tui.telemetry import DeviceSample, HostSampler, RaySampler
from pqctl.tui.widgets.figures import bar, human_bytes, level_style, spark
from pqctl.tui.widgets.theme_styles import theme_style

HISTORY = 60
SAMPLE_INTERVAL_S = 1.0
COLUMNS = (  # most telling first: at 80 columns the last ones scroll out of view
    ("device", "device"),
    ("role", "role"),
    ("type", "type"),
    ("memory", "memory"),
    ("util", "util"),
    ("mem", "mem_trend"),
    ("bits", "bits"),
    ("figures", "figures"),
)
SPARK_WIDTH = 6
ROLE_WIDTH = 8
"""The role column's fixed width: its widest values ("stage 12", "excluded") fit. Measured
widths follow content only once the table is idle, which a busy dashboard may not be for a
while (a real terminal once showed "stag" for a minute)."""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class ClusterView(Vertical):
    """The devices of the cluster; ``x`` excludes the selected one from planning."""

    DEFAULT_CSS = """
    ClusterView #cluster-title { height: auto; padding: 0 1; }
    ClusterView DataTable { height: 1fr; }
    ClusterView #device-detail { height: auto; max-height: 4; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.resolved: ResolvedCluster | None = None
        self.sources: dict[str, str] = {}
        self.excluded: set[str] = set()
        self.stage_of: dict[str, int] = {}
        self.samples: dict[str, DeviceSample] = {}
        self.util_history: dict[str, deque[float | None]] = {}
        self.memory_history: dict[str, deque[float | None]] = {}

    def compose(self) -> ComposeResult:
        yield Static("resolving the cluster…", id="cluster-title")
        table: DataTable[object] = DataTable(id="devices", cursor_type="row", zebra_stripes=True)
        for label, key in COLUMNS:  # the role ("stage 12", "excluded") never waits for a resize
            table.add_column(label, key=key, width=ROLE_WIDTH if key == "role" else None)
        yield table
        yield Static("", id="device-detail")

    def on_mount(self) -> None:
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self._refresh_rows())

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        return self.resolved.cluster.devices if self.resolved else ()

    # ----------------------------------------------------------------- inputs
    def show_cluster(self, resolved: ResolvedCluster, sources: dict[str, str]) -> None:
        """Fill the table with the cluster's devices and start sampling the local ones."""
        self.resolved, self.sources = resolved, sources
        cluster = resolved.cluster
        hosts = len({d.host for d in cluster.devices})
        notes = "".join(f"\n[$warning]{escape(n)}[/]" for n in resolved.notes)
        self.query_one("#cluster-title", Static).update(
            f"[b]{escape(cluster.name)}[/] from {escape(resolved.source)} · "
            f"{_count(hosts, 'host')} · {_count(len(cluster.devices), 'device')} · x excludes a "
            f"device{_links_line(cluster)}{notes}"
        )
        table = self.query_one("#devices", DataTable)
        table.clear()
        for device in cluster.devices:
            self.util_history[device.key] = deque(maxlen=HISTORY)
            self.memory_history[device.key] = deque(maxlen=HISTORY)
            table.add_row(*self._cells(device), key=device.key)
        self._show_detail()
        self.sample_devices([d.key for d in cluster.devices])

    def show_samples(self, samples: dict[str, DeviceSample]) -> None:
        self.samples = samples
        for key, sample in samples.items():
            total = sample.memory_total_bytes
            used = sample.memory_used_bytes
            self.util_history.setdefault(key, deque(maxlen=HISTORY)).append(
                sample.utilisation_percent
            )
            self.memory_history.setdefault(key, deque(maxlen=HISTORY)).append(
                used / total if used is not None and total else None
            )
        self._refresh_rows(samples)

    def set_plan_devices(self, stage_of: dict[str, int]) -> None:
        """Which stage each device runs in the current plan."""
        self.stage_of = stage_of
        self._refresh_rows()

    # ----------------------------------------------------------------- rendering
    def _refresh_rows(self, keys: Iterable[str] | None = None) -> None:
        table = self.query_one("#devices", DataTable)
        wanted = set(keys) if keys is not None else None
        for device in self.devices:
            if wanted is not None and device.key not in wanted:
                continue
            for (_, column), cell in zip(COLUMNS, self._cells(device), strict=True):
                table.update_cell(device.key, column, cell, update_width=True)
        self._show_detail()

    def _cells(self, device: DeviceSpec) -> list[object]:
        key = device.key
        excluded = key in self.excluded
        muted = theme_style(self.app, "text-muted")
        sample = self.samples.get(key)
        name = Text(key, style=muted if excluded else theme_style(self.app, "foreground"))
        if excluded:
            role = Text("excluded", style=theme_style(self.app, "warning", bold=True))
        elif key in self.stage_of:
            role = Text(f"stage {self.stage_of[key]}", style=theme_style(self.app, "success"))
        else:
            role = Text("idle" if self.stage_of else "", style=muted)
        util = self.util_history.get(key, ())
        mem = self.memory_history.get(key, ())
        last_util = sample.utilisation_percent if sample else None
        util_text = Text(
            spark(list(util), SPARK_WIDTH, 100.0), style=theme_style(self.app, "primary")
        )
        util_text.append(f" {last_util:3.0f}%" if last_util is not None else " N/A", style=muted)
        return [
            name,
            role,
            Text(device.type.name, style=muted),
            self._memory_cell(device, sample),
            util_text,
            Text(spark(list(mem), SPARK_WIDTH, 1.0), style=theme_style(self.app, "secondary")),
            " ".join(str(b) for b in sorted(device.type.supported_bits, reverse=True)),
            self.sources.get(key, "datasheet"),
        ]

    def _memory_cell(self, device: DeviceSpec, sample: DeviceSample | None) -> Text:
        total = sample.memory_total_bytes if sample and sample.memory_total_bytes else None
        used = sample.memory_used_bytes if sample else None
        total = total or device.type.memory_bytes
        fraction = used / total if used is not None and total else None
        ok, high, critical = (theme_style(self.app, v) for v in ("success", "warning", "error"))
        style = level_style(fraction, ok, high, critical)
        text = bar(fraction, 6, style, theme_style(self.app, "text-disabled"))
        text.append(f" {human_bytes(used)}/{human_bytes(total)}")
        return text

    def _show_detail(self) -> None:
        table = self.query_one("#devices", DataTable)
        devices = self.devices
        if not devices or table.cursor_row >= len(devices):
            return
        d = devices[table.cursor_row]
        t = d.type
        fast = "/".join(str(b) for b in sorted(t.fast_kernel_bits, reverse=True)) or "none"
        bits = "/".join(str(b) for b in sorted(t.supported_bits, reverse=True))
        self.query_one("#device-detail", Static).update(
            f"[b]{escape(d.key)}[/] {escape(t.name)} ({t.kind}): {t.memory_bytes / 2**30:,.1f} "
            f"GiB, usable {t.usable_memory_bytes / 2**30:,.1f} · {t.memory_bandwidth_gb_s:,.0f} "
            f"GB/s · fp16 {t.fp16_tflops:.4g} TFLOPS · runs {bits} bits (fast kernels {fast})"
            f" · latency figures: {self.sources.get(d.key, 'datasheet')}"
            + (" · [$warning]excluded from planning[/]" if d.key in self.excluded else "")
        )

    def on_data_table_row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        self._show_detail()

    # ----------------------------------------------------------------- actions
    def action_toggle_exclude(self) -> None:
        devices = self.devices
        table = self.query_one("#devices", DataTable)
        if not devices or table.cursor_row >= len(devices):
            return
        self.toggle_exclude(devices[table.cursor_row].key)

    def toggle_exclude(self, key: str) -> None:
        """Exclude ``key`` from planning, or include it again."""
        if key in self.excluded:
            self.excluded.discard(key)
        elif len(self.excluded) + 1 >= len(self.devices):
            self.app.notify("at least one device must stay in the plan", severity="warning")
            return
        else:
            self.excluded.add(key)
        self._refresh_rows([key])
        self.post_message(ExclusionChanged(frozenset(self.excluded)))

    # ----------------------------------------------------------------- telemetry
    @work(thread=True, exclusive=True, group="telemetry")
    def sample_devices(self, keys: list[str]) -> None:
        """Sample this host's devices every second until cancelled (NVML and /proc block)."""
        worker = get_current_worker()
        ray = getattr(self.app, "ray", None)
        if ray is not None:
            try:
                sampler: HostSampler | RaySampler = RaySampler(ray, self.devices)
            except Exception as exc:  # Ray went away since the inventory: figures stay N/A
                self.app.call_from_thread(
                    self.app.notify, f"no live figures over Ray: {exc}", severity="warning"
                )
                return
        else:
            sampler = HostSampler(keys)
        if not sampler.local:
            sampler.close()
            return  # no device of this host: nothing to sample (other hosts show N/A)
        try:
            while not worker.is_cancelled:
                self.post_message(DeviceSamples(sampler.sample()))
                deadline = time.monotonic() + SAMPLE_INTERVAL_S
                while not worker.is_cancelled and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            sampler.close()

    def on_device_samples(self, message: DeviceSamples) -> None:
        message.stop()
        self.show_samples(message.samples)


def _links_line(cluster: ClusterSpec) -> str:
    """The links between hosts (bandwidth, latency), on a line of their own; "" for one host."""
    names = list(dict.fromkeys(d.host for d in cluster.devices))
    parts = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            link = cluster.between(a, b)
            parts.append(
                f"{escape(a)}↔{escape(b)} {link.bandwidth_gb_s * 8:,.1f} Gbit/s "
                f"{link.latency_s * 1e6:,.0f} µs"
            )
    return "\nlinks: " + " · ".join(parts) if parts else ""
