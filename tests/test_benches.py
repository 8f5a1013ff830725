"""The benchmark scripts run end to end: each one's ``--quick`` (a smoke-size run of its whole
path, well under a minute on a 2-core CPU) as ``python bench/<name>.py`` is run, in a fresh
process from the project root, and prints its result line; and no bench module shadows a
module that a bench (or a library it imports) would import, since ``bench/`` comes first on
``sys.path`` when a bench runs as a script (``bench/kernels.py`` once hid the ``kernels``
package that transformers imports)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

RESULT_LINES = {
    "plan_search": r"slowest search [\d.]+ s",
    "quant_kernels": r"time ÷ 16-bit, decode of 1 row: 8-bit [\d.]+×",
    "shard_loading": r"middle stage peak above base, 4-bit / 16-bit: [\d.]+",
    "serving": r"16-bit, 2 stages +\d+/\d+ +[\d.]+ +[\d.]+ +[\d.]+",
    "costmodel": r"MAPE: prefill [\d.]+ %, decode [\d.]+ %",
    "quality": r"ratio 1 % plan / 16-bit: [\d.]+×",
    "replan": r"re-plan ÷ plan, \d+ devices: [\d.]+×",
    "fuzz": r"crashes 0; a valid request afterwards: served",
    "load": r"lost 0 of \d+; fairness, interleaved p99 under a flood ÷ alone: [\d.]+×",
}
"""Every bench script, and a pattern its ``--quick`` output must contain: the line with its
result (a ratio, an error), printed only once the whole run has worked."""

QUICK_TIMEOUT_S = 240
"""Bound on one ``--quick`` run: several times what it takes on a 2-core CPU, and under
pytest's per-test timeout, so a hang fails with the bench's output."""


def _bench_modules() -> list[str]:
    """Module names under ``bench/``: its ``.py`` files and packages."""
    files = [p.stem for p in BENCH.glob("*.py")]
    packages = [p.name for p in BENCH.iterdir() if (p / "__init__.py").is_file()]
    return sorted(files + packages)


def _importable(names: list[str]) -> list[str]:
    """Those of ``names`` that a fresh interpreter in the project root (this virtualenv, the
    project's packages, the standard library; ``bench/`` not on the path) would import."""
    code = (
        "import importlib.util, json, sys\n"
        "names = json.loads(sys.argv[1])\n"
        "builtin = set(sys.stdlib_module_names) | set(sys.builtin_module_names)\n"
        "print(json.dumps([n for n in names\n"
        "                  if n in builtin or importlib.util.find_spec(n) is not None]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(names)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found: list[str] = json.loads(out.stdout)
    return found


def test_every_bench_script_is_run_here() -> None:
    scripts = {name for name in _bench_modules() if not name.startswith("_")}
    assert scripts == set(RESULT_LINES)


def test_no_bench_module_shadows_an_importable_module() -> None:
    # the check itself: a package that transformers imports, a project package, the stdlib
    assert _importable(["kernels", "planner", "tests", "json"]) == [
        "kernels",
        "planner",
        "tests",
        "json",
    ]
    assert _importable(_bench_modules()) == []


@pytest.mark.multiproc
@pytest.mark.parametrize("name", sorted(RESULT_LINES))
def test_bench_quick_run_prints_its_result(name: str, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PQCTL_CONFIG_DIR=str(tmp_path / "config"),
        PQCTL_STATE_DIR=str(tmp_path / "state"),
        PQCTL_PROFILE_DIR=str(tmp_path / "profiles"),
        PQCTL_STATS_DIR=str(tmp_path / "stats"),
    )
    # its own session, so that a run past the bound goes with every process it started
    process = subprocess.Popen(
        [sys.executable, f"bench/{name}.py", "--quick"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=QUICK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_session(process.pid)
        stdout, stderr = process.communicate(timeout=30)
        pytest.fail(
            f"bench/{name}.py --quick ran past {QUICK_TIMEOUT_S} s\n{stdout}\n{stderr[-4000:]}"
        )
    finally:
        _kill_session(process.pid)  # anything it left behind
    assert process.returncode == 0, f"exit {process.returncode}\n{stdout}\n{stderr[-4000:]}"
    assert re.search(RESULT_LINES[name], stdout), f"no result line in:\n{stdout}"


def _kill_session(leader: int) -> None:
    """SIGKILL every process left in the process group that ``leader`` started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader, signal.SIGKILL)
