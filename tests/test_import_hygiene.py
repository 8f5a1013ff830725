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


def _python(code: str) -> str:
    """What a fresh interpreter running ``code`` in the project root prints."""
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


def _loaded_after_import(modules: list[str], watched: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(' '.join(w for w in {watched!r} if w in sys.modules))\n"
    )
    return _python(code).split()


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
        "runtime.serve.client",
        "runtime.serve.protocol",
        "runtime.serve.deployment",
        "runtime.serve.monitor",
        "runtime.serve.textstream",
    ]
    for module in modules:  # one fresh interpreter each, so none hides another's imports
        assert _loaded_after_import([module], ["torch", "transformers"]) == [], module


def test_python_client_loads_only_pyzmq_msgpack_and_its_own_modules() -> None:
    """``runtime.serve.client`` can ship alone: of the project it loads only the client's own
    modules, and of installed packages only pyzmq and msgpack."""
    code = (
        "import sys, sysconfig\n"
        "before = set(sys.modules)  # what site's .pth files loaded at start-up\n"
        "import runtime.serve.client\n"
        "site = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}\n"
        "new = {n: m for n, m in sys.modules.items() if n not in before}\n"
        "ours = sorted(n for n in new if n.split('.')[0] in ('runtime', 'planner'))\n"
        "installed = sorted({n.split('.')[0] for n, m in new.items()\n"
        "    if any(str(getattr(m, '__file__', '') or '').startswith(p) for p in site)})\n"
        "print(' '.join(ours)); print(' '.join(installed))\n"
    )
    ours, installed = (line.split() for line in _python(code).splitlines())
    assert ours == [
        "runtime",
        "runtime.serve",
        "runtime.serve.client",
        "runtime.serve.deployment",
        "runtime.serve.keys",
        "runtime.serve.protocol",
    ]
    assert set(installed) <= {"zmq", "msgpack"}, installed


def test_quick_commands_never_import_torch_or_transformers(tmp_path: Path) -> None:
    """``pqctl --help``, plan, show, generate, stop and status start in a fraction of a second:
    run as users run them (``python -X importtime -m pqctl …``), none loads torch or
    transformers (-X importtime lists every module a process imports). Their output into a
    pipe keeps its width: the plan's table is not cut at 80 columns."""
    import os

    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env = {**env, "PQCTL_STATE_DIR": str(state), "PQCTL_PROFILE_DIR": str(tmp_path / "profiles")}
    plan_file = tmp_path / "plan.json"
    cluster = ROOT / "examples" / "clusters" / "cluster-07.toml"
    commands = [
        ["--help"],
        ["plan", "--cluster", str(cluster), "-o", str(plan_file)],
        ["show", str(plan_file)],
        ["plan", "--local", "-o", str(tmp_path / "local.json")],
        ["status", "--json"],
        ["generate", "--name", "absent", "hello"],
        ["stop", "--name", "absent"],
    ]
    for args in commands:
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "pqctl", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        imported = {
            line.rsplit("|", 1)[-1].strip()
            for line in run.stderr.splitlines()
            if line.startswith("import time:")
        }
        assert "typer" in imported, (args, run.stderr[-2000:])  # importtime did report
        heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "transformers"))
        assert heavy == [], (args, heavy[:5])
        assert run.returncode in (0, 5), (args, run.returncode, run.stderr[-2000:])
        if args[0] == "plan" and "--cluster" in args:  # a pipe: nothing cut at 80 columns
            assert "│ 2 │ a100-node/cuda:1 │ A100-40G │" in run.stdout, run.stdout
            assert "memory-proportional" in run.stdout and "…" not in run.stdout
