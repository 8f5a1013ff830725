"""What the gateway counts of the requests it answers: latency histograms (time to first token,
time per output token, end to end), finish reasons and error codes.

Fed with every reply the gateway sends (:meth:`RequestStats.on_reply`) and published in its status
(:meth:`RequestStats.to_dict`), from which ``/metrics`` (``runtime.serve.http``) exports them in
Prometheus' text format. The bucket bounds are vLLM's, so its Grafana panels read them alike.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass, field
from typing import Any

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
"""Time to first token, seconds (vLLM's ``time_to_first_token_seconds`` bounds)."""
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""Time per output token after the first, seconds (vLLM's bounds)."""
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
"""Request latency from receipt to its last token, seconds (vLLM's bounds)."""


@dataclass
class Histogram:
    """Counts per upper bound (the last count is above every bound), their sum and total."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def to_dict(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


@dataclass
class RequestStats:
    """Totals since the gateway started."""

    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    tpot: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    finished: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_tokens: int = 0
    generation_tokens: int = 0

    def on_reply(self, message: dict[str, Any]) -> None:
        """Count a reply: a ``done`` adds its latencies and tokens, an ``error`` its code."""
        kind = message.get("type")
        if kind == "error":
            self.errors[str(message.get("code"))] += 1
        elif kind == "done":
            usage = message["usage"]
            self.finished[str(message["finish_reason"])] += 1
            self.prompt_tokens += usage["prompt_tokens"]
            generated = usage["completion_tokens"]
            self.generation_tokens += generated
            self.e2e.observe(usage["total_s"])
            if generated:
                self.ttft.observe(usage["first_token_s"])
            if generated > 1:
                self.tpot.observe((usage["total_s"] - usage["first_token_s"]) / (generated - 1))

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_to_first_token_s": self.ttft.to_dict(),
            "time_per_output_token_s": self.tpot.to_dict(),
            "e2e_latency_s": self.e2e.to_dict(),
            "finished": dict(self.finished),
            "errors": dict(self.errors),
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
        }
