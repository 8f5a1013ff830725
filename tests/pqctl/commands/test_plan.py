"""`pqctl plan` and `pqctl show` as a user runs them (no TTY), through Typer's runner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.plan import Plan
from pqctl.cli import app

ROOT = Path(__file__).resolve().parents[3]
CLUSTERS = ROOT / "examples" / "clusters"
BAD = ROOT / "tests" / "data" / "clusters"
runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_plan_json_on_a_paper_cluster_is_a_valid_plan() -> None:
    code, out, err = run("plan", "--cluster", str(CLUSTERS / "cluster-03.toml"), "--json")
    assert code == 0, err
    plan = Plan.from_json(out)
    assert plan.model.source == "opt-30b"
    assert plan.workload.global_batch == 32
    assert {s.device.device_type for s in plan.stages} <= {"T4", "V100-32G"}
    assert [b.name for b in plan.baselines] == [
        "uniform",
        "pipeedge",
        "adabits",
        "memory-proportional",
    ]


def test_plan_on_this_host_plans_the_builtin_model(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    code, out, err = run("plan", "--local", "-o", str(target))
    assert code == 0, err
    plan = Plan.load(target)
    assert plan.model.source == "bard-tiny"
    assert plan.model.num_layers == 8
    assert "Pipeline stages" in out and "Baselines" in out
    code, out, _ = run("show", str(target))
    assert code == 0 and "Pipeline stages" in out


def test_edited_invalid_plan_is_rejected_naming_the_field(tmp_path: Path) -> None:
    code, out, _ = run("plan", "--cluster", str(CLUSTERS / "cluster-09.toml"), "--json")
    assert code == 0
    data = json.loads(out)
    data["stages"][1]["layer_range"]["start"] += 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code, _, err = run("show", str(bad))
    assert code == 2
    assert "stages[1].layer_range.start" in err
    assert "ranges must be contiguous" in err


def test_excluding_a_device_changes_the_plan() -> None:
    base = ["plan", "--cluster", str(CLUSTERS / "cluster-05.toml"), "--json"]
    _, full, _ = run(*base)
    code, fewer, err = run(*base, "--exclude", "v100-node/cuda:1")
    assert code == 0, err
    keys = {s.device.key for s in Plan.from_json(fewer).stages}
    assert "v100-node/cuda:1" not in keys
    assert Plan.from_json(fewer).prediction.throughput_tokens_per_s < (
        Plan.from_json(full).prediction.throughput_tokens_per_s
    )


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--cluster", str(BAD / "unknown-type.toml")], 2, "unknown device type"),
        (
            ["--cluster", str(CLUSTERS / "cluster-09.toml"), "--model", "bloom-176b"],
            3,
            "needs 131.9 GiB at 2 bits",
        ),
        (["--bits", "16,5"], 2, '--bits: "16,5" is not a comma-separated list'),
        (["--exclude", "nowhere/cuda:0"], 2, '--exclude: no device "nowhere/cuda:0"'),
        (
            ["--local", "--cluster", str(CLUSTERS / "cluster-01.toml")],
            2,
            "--local, --cluster and --ray exclude each other",
        ),
        (["--quality", "2"], 2, "--quality: 2.0 is outside [0, 1]"),
        (["--batch", "0"], 2, "--batch: must be a positive integer, got 0"),
        (["--model", "no/such-model-here"], 2, "could not fetch its config.json"),
    ],
    ids=[
        "bad-cluster",
        "infeasible",
        "bad-bits",
        "unknown-device",
        "local-and-cluster",
        "quality-range",
        "batch",
        "unknown-model",
    ],
)
def test_bad_input_is_reported_with_an_exit_code(
    args: list[str], code: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got, out, err = run("plan", *args)
    assert got == code
    assert message in " ".join(err.split())
    assert out == ""


def test_plan_json_from_a_process_is_only_json() -> None:
    """Standard output of the real process (file descriptor 1, where C libraries such as HiGHS
    print) carries the plan and nothing else."""
    cluster = str(CLUSTERS / "cluster-03.toml")
    out = subprocess.run(
        [sys.executable, "-m", "pqctl", "plan", "--cluster", cluster, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert Plan.from_json(out.stdout).stages


def sixteen_hosts(tmp_path: Path) -> Path:
    """A cluster file of 16 hosts × 4 GPUs of 4 types, racks of 4 hosts joined by 25 Gbit/s
    (100 Gbit/s inside a rack)."""
    types = ["T4", "V100-32G", "A100-40G", "A100-80G"]
    lines = ['name = "sixteen"', "[defaults]", "bandwidth_gbit_s = 25", "latency_us = 30"]
    for h in range(16):
        lines += ["[[hosts]]", f'name = "node-{h:02d}"']
        lines += [f'devices = [{{ type = "{types[h % 4]}", count = 4 }}]']
    for a in range(16):
        for b in range(a + 1, 16):
            if a // 4 == b // 4:
                lines += ["[[links]]", f'hosts = ["node-{a:02d}", "node-{b:02d}"]']
                lines += ["bandwidth_gbit_s = 100", "latency_us = 10"]
    path = tmp_path / "sixteen.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pqctl", "plan", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def test_plan_over_sixteen_hosts_says_how_orders_were_searched(tmp_path: Path) -> None:
    out = plan_process(
        "--cluster",
        str(sixteen_hosts(tmp_path)),
        "-m",
        "llama-3.1-70b",
        "--json",
        "--time-limit",
        "60",
        "--gap",
        "0.001",
    )
    assert out.returncode == 0, out.stderr
    plan = Plan.from_json(out.stdout)
    solver = json.loads(out.stdout)["solver"]
    assert solver["order_search"].startswith("in the MILP")
    assert "16 hosts kept contiguous" in solver["order_search_note"]
    assert plan.solver.status in ("optimal", "feasible", "time limit")
    assert plan.solver.mip_gap is not None and plan.solver.time_s <= 66
    hosts = [s.device.host for s in plan.stages]
    runs = [h for k, h in enumerate(hosts) if k == 0 or hosts[k - 1] != h]
    assert len(runs) == len(set(runs))  # each host's stages follow one another


def test_plan_out_of_time_says_it_has_no_bound(tmp_path: Path) -> None:
    args = [
        "--cluster",
        str(sixteen_hosts(tmp_path)),
        "-m",
        "llama-3.1-70b",
        "--time-limit",
        "1e-6",
    ]
    out = plan_process(*args, "--json")
    assert out.returncode == 0, out.stderr
    solver = json.loads(out.stdout)["solver"]
    assert solver["status"] == "time limit, no bound"
    assert solver["mip_gap"] is None
    assert solver["order_search_exhaustive"] is False
    text = plan_process(*args)
    assert text.returncode == 0, text.stderr
    assert "solver: time limit, no bound (nothing bounds how far from optimal it is)" in text.stdout
