"""The dashboard's Cluster tab over a real 3-node Ray cluster (``tests.ray_cluster``): every
host's devices, the measured links, every host's live figures, a plan over them. The pilot runs
inside the cluster's network namespace (``tests.pqctl.tui.ray_dashboard``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.ray_cluster import RayNamespace

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[3]


def test_cluster_tab_over_a_ray_cluster(ray_cluster: RayNamespace, tmp_path: Path) -> None:
    env = {**ray_cluster.env, "PQCTL_CONFIG_DIR": str(tmp_path / "config")}
    env["PQCTL_STATE_DIR"] = str(tmp_path / "state")
    done = ray_cluster.run(
        [sys.executable, "-m", "tests.pqctl.tui.ray_dashboard", ray_cluster.address],
        timeout_s=240,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), (
        done.stdout[-3000:] + done.stderr[-3000:]
    )
