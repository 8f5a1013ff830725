from __future__ import annotations

from pathlib import Path

import pytest
import textual.constants


@pytest.fixture(autouse=True)
def dashboard_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Settings, user themes and deployment state live in the test's own directory; no
    animations (pilot waits for them)."""
    monkeypatch.setenv("PQCTL_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("PQCTL_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PQCTL_STATS_DIR", str(tmp_path / "stats"))  # only shipped calibration
    monkeypatch.setenv("PQCTL_PROFILE_DIR", str(tmp_path / "profiles"))  # datasheet figures
    monkeypatch.setattr(textual.constants, "TEXTUAL_ANIMATIONS", "none")
    return tmp_path
