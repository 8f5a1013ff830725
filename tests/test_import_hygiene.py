"""The layering DESIGN.md promises, checked in a fresh interpreter: the planner runs on a
laptop without torch, zmq or the interface libraries; the runtime never needs the interface."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    found = pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}.")
    return [package, *sorted(m.name for m in found)]


def _loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(' '.join(w for w in {watched!r} if w in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.split()


def test_planner_imports_without_heavy_or_interface_libraries() -> None:
    assert {"planner.plan", "planner.milp", "planner.search"} <= set(_modules("planner"))
    watched = ["torch", "zmq", "textual", "typer", "rich", "transformers", "runtime", "pqctl"]
    assert _loaded_after_import(_modules("planner"), watched) == []


def test_runtime_imports_without_interface_libraries() -> None:
    modules = _modules("runtime")
    assert len(modules) > 1
    watched = ["textual", "typer", "rich", "pqctl", "themes"]
    assert _loaded_after_import(modules, watched) == []


def test_client_side_modules_import_without_torch_or_transformers() -> None:
    """A client (and the status monitor) needs only pyzmq and msgpack, never the model stack."""
    modules = [
        "runtime.client",
        "runtime.protocol",
        "runtime.deployment",
        "runtime.monitor",
        "runtime.textstream",
    ]
    for module in modules:  # one fresh interpreter each, so none hides another's imports
        assert _loaded_after_import([module], ["torch", "transformers"]) == [], module
