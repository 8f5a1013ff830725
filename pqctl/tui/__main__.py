"""``python -m pqctl.tui [--theme T] [--cluster FILE] [--model M]``: open the dashboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pqctl.tui.app import DashboardError, run_dashboard


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pqctl.tui", description=__doc__)
    parser.add_argument("--theme", help="dark, light, high-contrast or a user theme's name")
    parser.add_argument("--cluster", type=Path, help="cluster file (default: this host)")
    parser.add_argument("--model", help="model to plan (default: the built-in one)")
    args = parser.parse_args(argv)
    try:
        run_dashboard(args.theme, args.cluster, args.model)
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
