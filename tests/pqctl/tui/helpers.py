"""Shared helpers of the dashboard tests: bounded waits and fixture paths."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from textual.pilot import Pilot

ROOT = Path(__file__).resolve().parents[3]
HOME_LAB = ROOT / "examples" / "clusters" / "mixed-home-lab.toml"
"""A declared heterogeneous cluster: RTX 4090 + 2×RTX 3090 + a CPU server (OPT-30b)."""
PLAN_FILE = Path(__file__).parent / "data" / "home-lab-plan.json"
"""A saved plan of HOME_LAB (mixed 8/4-bit stages): a stable picture for snapshots."""


async def wait_for(
    pilot: Pilot[object], condition: Callable[[], object], timeout_s: float, what: str
) -> None:
    """Let the app run until ``condition()`` is true; fail naming ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
