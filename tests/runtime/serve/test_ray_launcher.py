"""What a stage actor does on its node before it starts a worker (no Ray cluster needed: the
constructor is plain Python that Ray runs there)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from runtime.serve.launcher import StageLaunch
from runtime.serve.ray_launcher import RayLaunchError, StageActor


def test_a_model_path_missing_on_the_node_is_refused_naming_it_before_any_file_is_written(
    tmp_path: Path,
) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'pqctl[ray]')")
    before = set(Path(tempfile.gettempdir()).glob("pqctl-stage-*"))
    launch = StageLaunch(
        plan=tmp_path / "plan.json",
        stage=1,
        control="tcp://127.0.0.1:9",
        checkpoint=tmp_path / "no-such-model",
    )
    with pytest.raises(RayLaunchError, match="no-such-model does not exist on this host"):
        StageActor(launch, "{}", {"server.key_secret": b"secret"}, None)
    assert set(Path(tempfile.gettempdir()).glob("pqctl-stage-*")) == before
