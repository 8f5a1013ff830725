"""``python -m pqctl``."""

from pqctl.cli import main

main()
