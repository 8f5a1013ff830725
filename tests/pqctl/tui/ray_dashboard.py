"""The dashboard over a Ray cluster, driven by Textual's pilot: run inside the cluster's network
namespace as ``python -m tests.pqctl.tui.ray_dashboard ADDRESS`` (by
``test_ray_dashboard.py``); prints ``ok`` and exits 0 when every check holds, else the failure."""

from __future__ import annotations

import asyncio
import sys
import traceback

from rich.text import Text
from textual.widgets import DataTable

from pqctl.tui.app import PqctlApp
from tests.pqctl.tui.helpers import wait_for


async def check(address: str) -> None:
    app = PqctlApp(ray=address)
    async with app.run_test(size=(160, 40)) as pilot:
        await wait_for(pilot, lambda: app.cluster_view.resolved is not None, 90, "inventory")
        table = app.query_one("#devices", DataTable)
        keys = [str(k.value) for k in table.rows]
        assert keys == ["hostA/cpu", "hostB/cpu", "hostC/cpu"], keys
        title = str(app.query_one("#cluster-title").render())
        assert "Ray cluster at" in title and "3 hosts · 3 devices" in title, title
        assert "hostA↔hostB" in title and "Gbit/s" in title and "µs" in title, title
        history = app.cluster_view.util_history
        for key in keys:  # every host's live figures, from its node's telemetry actor
            await wait_for(pilot, lambda k=key: any(v is not None for v in history[k]), 20, key)
            row = [c.plain if isinstance(c, Text) else str(c) for c in table.get_row(key)]
            assert row[4].endswith("%") and "N/A" not in row[3], row
        await wait_for(pilot, lambda: app.cluster_view.stage_of, 90, "first plan")
        hosts = {key.split("/")[0] for key in app.cluster_view.stage_of}
        assert hosts <= {"hostA", "hostB", "hostC"}, hosts


def main() -> int:
    try:
        asyncio.run(check(sys.argv[1]))
    except Exception:
        traceback.print_exc()
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
