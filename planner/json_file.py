"""Reading the planner's JSON input files (profiles, calibration statistics)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.errors import ProfileError


def read_json(path: str | Path) -> Any:
    """The parsed contents of ``path``; raises ProfileError naming the file when it cannot be
    read or is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from exc
