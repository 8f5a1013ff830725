"""Many clients against one deployment: nothing lost, and one client's flood does not starve
another.

The built-in model in two 16-bit stages (global batch 8, decode groups of 4) served by a real
gateway and stage processes on this host. In the same run:

1. Alone: one interleaved client sends requests one after another; its latencies are the
   baseline.
2. Load: N clients (threads, each its own connection) send M requests each at once and wait for
   every reply, while the interleaved client keeps sending one at a time. Printed: sent / ok /
   error / lost (no reply within the timeout), p50/p99 latency of the load's requests.
3. Flood: one client queues F requests at once; the interleaved client's p99 latency while the
   flood drains, ÷ its p99 alone: the fairness figure (the scheduler takes waiting requests
   round-robin over clients, so it stays a small multiple of a request's own time, not the time
   to drain the flood).

Usage: python bench/load.py [--quick] [--clients 64] [--requests 10] [--flood 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving_util import start_deployment  # noqa: E402
from runtime.serve.client import Client, ServerError  # noqa: E402
from tests.runtime.serve.conftest import stop_gateway  # noqa: E402
from tests.runtime.serve.plans import serving_plan, write_plan  # noqa: E402

PROMPTS = ["ROMEO:", "JULIET:\nO", "KING LEAR:\nBlow, winds", "First Citizen:\nWe are"]
MAX_NEW = 8
TIMEOUT_S = 300.0


@dataclass
class Tally:
    """Outcomes and latencies (seconds) of a set of requests."""

    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, latency: float | None = None) -> None:
        with self.lock:
            if outcome == "ok":
                self.ok += 1
                self.latencies.append(latency or 0.0)
            elif outcome == "lost":
                self.lost += 1
            else:
                self.errors[outcome] = self.errors.get(outcome, 0) + 1


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def burst(endpoint: str, count: int, tally: Tally, offset: int = 0) -> None:
    """One connection sends ``count`` requests at once, then waits for each."""
    with Client(endpoint, timeout_s=TIMEOUT_S) as client:
        sent = {}
        for n in range(count):
            prompt = PROMPTS[(offset + n) % len(PROMPTS)]
            sent[client.submit(prompt, max_new_tokens=MAX_NEW)] = time.monotonic()
            with tally.lock:
                tally.sent += 1
        for request_id, started in sent.items():
            try:
                client.wait(request_id)
                tally.add("ok", time.monotonic() - started)
            except ServerError as exc:
                tally.add(exc.code)
            except (TimeoutError, ConnectionError):
                tally.add("lost")


def interleaved(endpoint: str, tally: Tally, until: threading.Event, at_least: int) -> None:
    """One request at a time until ``until`` is set (and at least ``at_least`` of them)."""
    with Client(endpoint, timeout_s=TIMEOUT_S) as client:
        n = 0
        while n < at_least or not until.is_set():
            started = time.monotonic()
            with tally.lock:
                tally.sent += 1
            try:
                client.generate(PROMPTS[n % len(PROMPTS)], max_new_tokens=MAX_NEW)
                tally.add("ok", time.monotonic() - started)
            except ServerError as exc:
                tally.add(exc.code)
            except (TimeoutError, ConnectionError):
                tally.add("lost")
            n += 1


def with_interleaved(endpoint: str, work: list[threading.Thread]) -> tuple[Tally, float]:
    """Run ``work`` while the interleaved client sends; its tally and the work's wall time."""
    done, probe = threading.Event(), Tally()
    prober = threading.Thread(target=interleaved, args=(endpoint, probe, done, 3))
    started = time.monotonic()
    prober.start()
    for thread in work:
        thread.start()
    for thread in work:
        thread.join()
    wall = time.monotonic() - started
    done.set()
    prober.join()
    return probe, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 clients × 3, a flood of 100")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10, help="per client")
    parser.add_argument("--flood", type=int, default=1000, help="requests the flooder queues")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests, args.flood = 8, 3, 100
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = serving_plan("bard-tiny", [0, 4], batch=8, prefill=4, decode=4, max_new=MAX_NEW)
        served = start_deployment(write_plan(plan, root), root, "load", {})
        endpoint = served.state.client_endpoint
        try:
            alone, _ = with_interleaved(endpoint, [])
            for _ in range(2):  # a few more for a steadier baseline
                more, _ = with_interleaved(endpoint, [])
                alone.latencies += more.latencies
            print(
                f"alone: {len(alone.latencies)} requests, p99 {_pct(alone.latencies, 0.99):.3f} s"
            )

            load = Tally()
            clients = [
                threading.Thread(target=burst, args=(endpoint, args.requests, load, k))
                for k in range(args.clients)
            ]
            probe, wall = with_interleaved(endpoint, clients)
            errors = sum(load.errors.values())
            print(
                f"load: {args.clients} clients × {args.requests}: sent {load.sent} ok {load.ok} "
                f"error {errors} lost {load.lost} in {wall:.1f} s; latency p50 "
                f"{_pct(load.latencies, 0.5):.3f} s p99 {_pct(load.latencies, 0.99):.3f} s"
                + (f"; errors {load.errors}" if errors else "")
            )
            flood = Tally()
            flooder = threading.Thread(target=burst, args=(endpoint, args.flood, flood))
            probe, wall = with_interleaved(endpoint, [flooder])
            ratio = _pct(probe.latencies, 0.99) / _pct(alone.latencies, 0.99)
            print(
                f"flood: one client × {args.flood}: ok {flood.ok} error "
                f"{sum(flood.errors.values())} lost {flood.lost}, drained in {wall:.1f} s; the "
                f"interleaved client: {len(probe.latencies)} requests, p50 "
                f"{_pct(probe.latencies, 0.5):.3f} s p99 {_pct(probe.latencies, 0.99):.3f} s"
            )
            lost = load.lost + flood.lost + probe.lost
            print(
                f"lost {lost} of {load.sent + flood.sent + probe.sent}; fairness, interleaved "
                f"p99 under a flood ÷ alone: {ratio:.1f}× (flood drain ÷ alone p99: "
                f"{wall / statistics.median(alone.latencies):.0f}×)"
            )
        finally:
            stop_gateway(served.process)


if __name__ == "__main__":
    main()
