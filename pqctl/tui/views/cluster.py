"""Cluster view: every host and device, live memory and utilisation, exclusion from planning."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from textual.worker import get_current_worker

from planner.cluster import ClusterSpec, DeviceSpec
from pqctl.plan_inputs import ResolvedCluster
from pqctl.tui.messages import DeviceSamples, ExclusionChanged
from pqctl.tui.telemetry import DeviceSample, HostSampler, RaySampler
from pqctl.tui.widgets.figures import bar, count, human_bytes, level_style, markup_escape, spark
from pqctl.tui.widgets.theme_styles import theme_style

HISTORY = 60
SAMPLE_INTERVAL_S = 1.0
COLUMNS = (  # label, key; most telling first
    ("device", "device"),
    ("role", "role"),
    ("type", "type"),
    ("memory", "memory"),
    ("util", "util"),
    ("mem", "mem_trend"),
    ("bits", "bits"),
    ("figures", "figures"),
)
NARROW = ("device", "role", "type", "memory", "util")
"""The columns shown when all of them do not fit (80 columns): the precisions and the figures'
source of the selected device are in the detail line below the table, whatever the width."""
SPARK_WIDTH = 6
ROLE_WIDTH = 8
"""The role column's fixed width: its widest values ("stage 12", "excluded") fit. Measured
widths follow content only once the table is idle, which a busy dashboard may not be for a
while (a real terminal once showed "stag" for a minute)."""


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
        self.shown: tuple[str, ...] = tuple(key for _, key in COLUMNS)

    def compose(self) -> ComposeResult:
        yield Static("resolving the cluster…", id="cluster-title")
        table: DataTable[object] = DataTable(id="devices", cursor_type="row", zebra_stripes=True)
        self._add_columns(table)
        yield table
        yield Static("", id="device-detail")

    def _add_columns(self, table: DataTable[object]) -> None:
        for label, key in COLUMNS:  # the role ("stage 12", "excluded") never waits for a resize
            if key in self.shown:
                table.add_column(label, key=key, width=ROLE_WIDTH if key == "role" else None)

    def on_resize(self) -> None:
        self._fit_columns()

    def _fit_columns(self) -> None:
        """Every column where they all fit the view's width, else the NARROW ones (the table
        is rebuilt when that changes)."""
        wanted = tuple(key for _, key in COLUMNS)
        if self._table_width(wanted) > self.size.width:
            wanted = NARROW
        if wanted == self.shown:
            return
        self.shown = wanted
        table = self.query_one("#devices", DataTable)
        row = table.cursor_row
        table.clear(columns=True)
        self._add_columns(table)
        for device in self.devices:
            cells = self._cells(device)
            table.add_row(*(cells[key] for key in self.shown), key=device.key)
        if self.devices:
            table.move_cursor(row=min(row, len(self.devices) - 1))

    def _table_width(self, keys: tuple[str, ...]) -> int:
        """Cells a table of these columns takes: widest cell or label, padding, scroll bar."""
        widths = {key: len(label) for label, key in COLUMNS}
        widths["role"] = ROLE_WIDTH
        for device in self.devices:
            for key, cell in self._cells(device).items():
                width = cell.cell_len if isinstance(cell, Text) else len(str(cell))
                widths[key] = max(widths[key], width)
        return sum(widths[key] + 2 for key in keys) + 6  # scroll bar, and room for samples

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
        notes = "".join(f"\n[$warning]{markup_escape(n)}[/]" for n in resolved.notes)
        self.query_one("#cluster-title", Static).update(
            f"[b]{markup_escape(cluster.name)}[/] from {markup_escape(resolved.source)} · "
            f"{count(hosts, 'host')} · {count(len(cluster.devices), 'device')} · x excludes a "
            f"device{_links_line(cluster)}{notes}"
        )
        table = self.query_one("#devices", DataTable)
        table.clear()
        for device in cluster.devices:
            self.util_history[device.key] = deque(maxlen=HISTORY)
            self.memory_history[device.key] = deque(maxlen=HISTORY)
            cells = self._cells(device)
            table.add_row(*(cells[key] for key in self.shown), key=device.key)
        self._fit_columns()
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
            cells = self._cells(device)
            for column in self.shown:
                table.update_cell(device.key, column, cells[column], update_width=True)
        self._show_detail()

    def _cells(self, device: DeviceSpec) -> dict[str, object]:
        """The row of ``device``, by column key."""
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
        return {
            "device": name,
            "role": role,
            "type": Text(device.type.name, style=muted),
            "memory": self._memory_cell(device, sample),
            "util": util_text,
            "mem_trend": Text(
                spark(list(mem), SPARK_WIDTH, 1.0), style=theme_style(self.app, "secondary")
            ),
            "bits": " ".join(str(b) for b in sorted(device.type.supported_bits, reverse=True)),
            "figures": self.sources.get(key, "datasheet"),
        }

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
        memory = f"{t.memory_bytes / 2**30:,.1f} GiB, usable {t.usable_memory_bytes / 2**30:,.1f}"
        self.query_one("#device-detail", Static).update(
            f"[b]{markup_escape(d.key)}[/] {markup_escape(t.name)} ({t.kind}): {memory} · "
            f"{t.memory_bandwidth_gb_s:,.0f} GB/s · fp16 {t.fp16_tflops:.4g} TFLOPS · "
            f"runs {bits} bits (fast kernels {fast})"
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
                f"{markup_escape(a)}↔{markup_escape(b)} {link.bandwidth_gb_s * 8:,.1f} Gbit/s "
                f"{link.latency_s * 1e6:,.0f} µs"
            )
    return "\nlinks: " + " · ".join(parts) if parts else ""
