"""What ``pqctl apply``'s live table reads, from inside a Ray cluster's namespace: run as
``python -m tests.pqctl.commands.ray_monitor NAME`` (by ``test_apply_ray.py``; the deployment's
own keys, which its status sockets admit, come from its state file); prints one
JSON line, per stage: its restarts, its host's address in its metrics endpoint, and whether its
metrics messages (tokens/s, threads, busy share) arrived."""

from __future__ import annotations

import json
import sys
import time

from runtime.serve.deployment import DeploymentState
from runtime.serve.monitor import Monitor


def main() -> int:
    name = sys.argv[1]
    state = DeploymentState.load(name)
    monitor = Monitor.of(state)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            monitor.poll(0.5)
            status = monitor.status or {}
            stages = status.get("stages", [])
            if stages and len(monitor.metrics) == len(stages):
                break
        stages = (monitor.status or {}).get("stages", [])
        print(
            json.dumps(
                [
                    {
                        "index": s["index"],
                        "restarts": s["restarts"],
                        "metrics_endpoint": s["metrics"],
                        "metrics": s["index"] in monitor.metrics,
                    }
                    for s in stages
                ]
            )
        )
    finally:
        monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
