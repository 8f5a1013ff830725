"""The Cluster tab driven by Textual's pilot: devices of a declared cluster, exclusion with a
keystroke re-plans without the device, live figures for this host's CPU."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from pqctl.tui.app import PqctlApp
from tests.pqctl.tui.helpers import HOME_LAB, wait_for


def _row(table: DataTable[object], key: str) -> list[str]:
    return [c.plain if isinstance(c, Text) else str(c) for c in table.get_row(key)]


async def test_lists_every_device_with_type_precisions_and_figures() -> None:
    app = PqctlApp(cluster=HOME_LAB)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.cluster_view.stage_of, 30, "first plan")
        table = app.query_one("#devices", DataTable)
        keys = [str(k.value) for k in table.rows]
        assert keys == [
            "gaming-pc/cuda:0",
            "workstation/cuda:0",
            "workstation/cuda:1",
            "cpu-server/cpu",
        ]
        gpu = _row(table, "gaming-pc/cuda:0")
        assert gpu[2] == "RTX4090"
        assert "24.0G" in gpu[3] and "N/A" in gpu[3]  # another host: capacity, no live figure
        assert gpu[6] == "16 8 4 3 2" and gpu[7] == "datasheet"
        assert gpu[1] == "stage 0"
        assert "3 hosts · 4 devices" in str(app.query_one("#cluster-title").render())
        assert "bits (fast kernels" in str(app.query_one("#device-detail").render())


async def test_excluding_a_device_replans_without_it() -> None:
    app = PqctlApp(cluster=HOME_LAB)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.plan_view.plan is not None, 30, "first plan")
        first = app.plan_view.plan
        assert first is not None
        assert "workstation/cuda:1" in {s.device.key for s in first.stages}
        table = app.query_one("#devices", DataTable)
        table.focus()
        table.move_cursor(row=2)  # workstation/cuda:1
        await pilot.press("x")
        assert _row(table, "workstation/cuda:1")[1] == "excluded"
        await wait_for(pilot, lambda: app.plan_view.plan is not first, 30, "re-plan")
        second = app.plan_view.plan
        assert second is not None
        assert "workstation/cuda:1" not in {s.device.key for s in second.stages}
        assert "excluded" in _row(table, "workstation/cuda:1")[1]

        await pilot.press("x")  # include it again
        await wait_for(pilot, lambda: app.plan_view.plan is not second, 30, "re-plan")
        third = app.plan_view.plan
        assert third is not None
        assert "workstation/cuda:1" in {s.device.key for s in third.stages}


async def test_the_last_device_cannot_be_excluded() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.cluster_view.resolved is not None, 30, "cluster")
        for key in ("gaming-pc/cuda:0", "workstation/cuda:0", "workstation/cuda:1"):
            app.cluster_view.toggle_exclude(key)
        app.cluster_view.toggle_exclude("cpu-server/cpu")
        await pilot.pause()
        assert app.cluster_view.excluded == {
            "gaming-pc/cuda:0",
            "workstation/cuda:0",
            "workstation/cuda:1",
        }
        assert any("at least one device" in n.message for n in app._notifications)


async def test_this_host_shows_live_utilisation_and_memory() -> None:
    app = PqctlApp(auto_solve=False)  # the local host: its CPU, sampled every second
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_for(pilot, lambda: app.cluster_view.resolved is not None, 30, "cluster")
        key = app.cluster_view.devices[0].key
        history = app.cluster_view.util_history
        await wait_for(pilot, lambda: any(v is not None for v in history[key]), 10, "samples")
        row = _row(app.query_one("#devices", DataTable), key)
        assert row[4].endswith("%") and "N/A" not in row[3]
        assert app.cluster_view.memory_history[key][-1] is not None
