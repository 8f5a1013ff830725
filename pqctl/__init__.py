"""The interfaces: the ``pqctl`` command line (``cli``, ``commands/``, ``render/``), the
Textual dashboard (``tui/``), and the work both call that joins the planner with the runtime:
``plan_inputs`` (model, cluster, workload and quality target of a plan), ``device_profiles``
(``pqctl profile``) and ``model_quality`` (``pqctl calibrate``, ``pqctl eval``).
"""

import time as _time

STARTED = _time.monotonic()
"""When this process imported pqctl: a command's start (``pqctl profile`` keeps its whole run,
start-up included, to --time-budget)."""
