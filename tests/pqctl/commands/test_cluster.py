"""`pqctl cluster` and `pqctl plan --ray` as a user runs them: real processes, and for ``--ray``
a real 3-node Ray cluster in a network namespace of its own (``tests.ray_cluster``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from planner.cluster_file import load_cluster_file
from planner.plan import Plan
from tests.ray_cluster import RayNamespace

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[3]
PQCTL = [sys.executable, "-m", "pqctl"]


def pqctl(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PQCTL, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **env},
        cwd=ROOT,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def in_cluster(ray_cluster: RayNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**ray_cluster.env, "COLUMNS": "200"}
    return ray_cluster.run([*PQCTL, *args], timeout_s=180, cwd=ROOT, env=env)


def test_cluster_over_ray_lists_every_node_its_cpu_and_the_measured_links(
    ray_cluster: RayNamespace, tmp_path: Path
) -> None:
    saved = tmp_path / "cluster.toml"
    done = in_cluster(ray_cluster, "cluster", "--ray", ray_cluster.address, "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["source"] == f"Ray cluster at {ray_cluster.address}"
    assert [h["name"] for h in found["hosts"]] == ["hostA", "hostB", "hostC"]
    for host in found["hosts"]:
        assert host["address"] == "127.0.0.1"
        (device,) = host["devices"]
        assert device["key"] == f"{host['name']}/cpu" and device["kind"] == "cpu"
        assert device["usable_memory_bytes"] > 0
    pairs = [tuple(link["hosts"]) for link in found["links"]]
    assert pairs == [("hostA", "hostB"), ("hostA", "hostC"), ("hostB", "hostC")]
    for link in found["links"]:
        assert link["bandwidth_gbit_s"] > 0.5  # loopback between processes: gigabits at least
        assert 0 < link["latency_us"] < 50_000
    assert len(found["notes"]) == 3 and all("no GPU" in n for n in found["notes"])
    assert "probing 3 Ray nodes" in done.stderr

    done = in_cluster(ray_cluster, "cluster", "--ray", ray_cluster.address, "--save", str(saved))
    assert done.returncode == 0, done.stderr
    assert "Links between hosts" in done.stdout and "hostA ↔ hostB" in done.stdout
    loaded = load_cluster_file(saved).cluster
    assert [h.name for h in loaded.hosts] == ["hostA", "hostB", "hostC"]
    assert [d.key for d in loaded.devices] == ["hostA/cpu", "hostB/cpu", "hostC/cpu"]
    assert len(loaded.links) == 3


def test_plan_over_ray_plans_for_the_nodes_ray_sees_and_the_saved_file_plans_alike(
    ray_cluster: RayNamespace, tmp_path: Path
) -> None:
    plan_file, saved = tmp_path / "plan.json", tmp_path / "cluster.toml"
    done = in_cluster(
        ray_cluster, "plan", "--ray", ray_cluster.address, "-o", str(plan_file), "--json"
    )
    assert done.returncode == 0, done.stderr
    plan = Plan.load(plan_file)
    hosts = {s.device.host for s in plan.stages}
    assert hosts and hosts <= {"hostA", "hostB", "hostC"}
    assert plan.model.source == "bard-tiny"
    done = in_cluster(ray_cluster, "cluster", "--ray", ray_cluster.address, "--save", str(saved))
    assert done.returncode == 0, done.stderr
    big = in_cluster(ray_cluster, "plan", "--ray", ray_cluster.address, "-m", "opt-30b",
                     "--bits", "8", "--json")  # fmt: skip
    assert big.returncode == 0, big.stderr  # 30 GB of 8-bit weights: more than one host's RAM
    assert len({s.device.host for s in Plan.from_json(big.stdout).stages}) >= 2
    offline = pqctl("plan", "--cluster", str(saved), "--json")  # no Ray needed any more
    assert offline.returncode == 0, offline.stderr
    assert {s.device.host for s in Plan.from_json(offline.stdout).stages} <= hosts | {
        "hostA",
        "hostB",
        "hostC",
    }


def test_a_ray_address_where_nothing_listens_fails_fast_naming_it() -> None:
    started = time.monotonic()
    done = pqctl("cluster", "--ray", "127.0.0.1:9")
    assert done.returncode == 2
    assert "Ray is not reachable at 127.0.0.1:9" in done.stderr
    assert time.monotonic() - started < 30
    done = pqctl("plan", "--ray", "127.0.0.1:9")
    assert done.returncode == 2 and "127.0.0.1:9" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cluster", "--ray", "not-an-address"], '"not-an-address" is not HOST:PORT'),
        (["plan", "--ray", "10.0.0.1:6379", "--local"], "exclude each other"),
    ],
)
def test_bad_ray_options_exit_2_naming_the_option(args: list[str], message: str) -> None:
    done = pqctl(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


def test_ray_auto_without_an_address_says_how_to_give_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(tmp_path)  # no head was started with this temp dir
    done = subprocess.run(
        [*PQCTL, "cluster", "--ray", "auto"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "RAY_ADDRESS is not set" in done.stderr and "--ray HOST:6379" in done.stderr


def test_ray_not_installed_says_how_to_install_it(tmp_path: Path) -> None:
    shadow = tmp_path / "ray"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    done = pqctl("cluster", "--ray", "127.0.0.1:6379", PYTHONPATH=path)
    assert done.returncode == 2
    assert "pip install 'pqctl[ray]'" in done.stderr


def test_cluster_without_ray_is_this_host_and_saves_a_file_that_plans(tmp_path: Path) -> None:
    saved = tmp_path / "here.toml"
    done = pqctl("cluster", "--json", "--save", str(saved))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["source"] == "this host" and len(found["hosts"]) == 1
    assert found["links"] == []
    assert load_cluster_file(saved).cluster.devices
    planned = pqctl("plan", "--cluster", str(saved), "--json")
    assert planned.returncode == 0, planned.stderr


def test_ray_auto_finds_the_head_in_ray_address(ray_cluster: RayNamespace) -> None:
    env = {**ray_cluster.env, "COLUMNS": "200", "RAY_ADDRESS": ray_cluster.address}
    done = ray_cluster.run([*PQCTL, "cluster", "--ray", "auto", "--json"], cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["source"] == f"Ray cluster at {ray_cluster.address}"


def test_profile_over_ray_measures_one_device_of_each_type_and_plan_uses_it(
    ray_cluster: RayNamespace, tmp_path: Path
) -> None:
    """Three CPU nodes are one device type: one node is profiled, the file is written here, and
    a plan over Ray with those profiles predicts from them (not from the datasheet)."""
    profiles = tmp_path / "profiles"
    done = in_cluster(
        ray_cluster, "profile", "--ray", ray_cluster.address, "--bits", "16,8",
        "--time-budget", "20", "--threads", "1", "-o", str(profiles), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["device_type"] == "cpu" and row["device"] == "cpu"
    assert row["host"] in {"hostA", "hostB", "hostC"}
    assert Path(row["path"]).parent == profiles and Path(row["path"]).is_file()
    predicted = []
    for directory in (profiles, tmp_path / "none"):
        planned = in_cluster(
            ray_cluster, "plan", "--ray", ray_cluster.address, "--profiles", str(directory),
            "--json",
        )  # fmt: skip
        assert planned.returncode == 0, planned.stderr
        predicted.append(Plan.from_json(planned.stdout).prediction.prefill_s)
    assert predicted[0] != predicted[1]


def test_profile_over_ray_refuses_a_device_choice() -> None:
    done = pqctl("profile", "--ray", "127.0.0.1:9", "--device", "cpu")
    assert done.returncode == 2 and "--device and --ray exclude each other" in done.stderr
