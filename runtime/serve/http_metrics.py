"""``GET /metrics`` of the HTTP endpoint: the deployment in Prometheus' text format.

Read at each scrape from what the endpoint's monitor last received: the gateway's status (its
requests, restarts and request statistics, ``runtime.serve.request_stats``) and every stage's
metrics, with the plan's predicted per-stage rates beside the measured ones. Names follow vLLM's
where the meaning is the same, under the ``pqctl:`` prefix (``vllm:num_requests_running`` is
``pqctl:num_requests_running``), so a vLLM Grafana dashboard needs its prefix changed only.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from planner.plan import Plan, PlanValidationError
from runtime.serve.monitor import predicted_rates

if TYPE_CHECKING:
    from runtime.serve.http import Backend

PREFIX = "pqctl:"
_HISTOGRAMS = (
    ("time_to_first_token_seconds", "time_to_first_token_s", "Time to first token, seconds."),
    (
        "time_per_output_token_seconds",
        "time_per_output_token_s",
        "Time per output token after the first, seconds.",
    ),
    ("e2e_request_latency_seconds", "e2e_latency_s", "Request latency end to end, seconds."),
)


class _PlanCache:
    """The plan file the deployment serves, read again only when it changes (a re-plan)."""

    def __init__(self) -> None:
        self.key: tuple[str, float] | None = None
        self.plan: Plan | None = None

    def get(self, path: str) -> Plan | None:
        try:
            key = (path, Path(path).stat().st_mtime)
        except OSError:
            return self.plan
        if key != self.key:
            try:
                self.plan = Plan.load(path)
            except (OSError, PlanValidationError):
                return self.plan
            self.key = key
        return self.plan


class DeploymentCollector:
    """A prometheus_client collector over a :class:`runtime.serve.http.Backend`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.plans = _PlanCache()

    def collect(self) -> Iterator[Metric]:
        status = self.backend.status
        name = str(status.get("name", self.backend.state.name))
        labels = {"deployment": name, "model_name": self.backend.state.model}
        yield from self._requests(status, labels)
        yield from self._stages(status, labels)

    def _requests(self, status: dict[str, Any], labels: dict[str, str]) -> Iterator[Metric]:
        keys, values = list(labels), list(labels.values())
        requests = status.get("requests") or {}
        for metric, field, help_text in (
            ("num_requests_running", "active", "Requests in the pipeline now."),
            ("num_requests_waiting", "waiting", "Requests waiting for a free micro-batch."),
        ):
            yield _one(GaugeMetricFamily, metric, help_text, labels, requests.get(field))
        serving = GaugeMetricFamily(
            PREFIX + "deployment_serving",
            "1 while the deployment serves, 0 while it loads, recovers, re-plans or stops.",
            labels=[*keys, "phase"],
        )
        phase = self.backend.phase
        serving.add_metric([*values, phase], 1.0 if phase == "serving" else 0.0)
        yield serving
        yield _one(
            CounterMetricFamily,
            "gateway_restarts",
            "Times the supervisor restarted the gateway.",
            labels,
            status.get("gateway_restarts"),
        )
        stats = status.get("request_stats") or {}
        for metric, help_text in (
            ("prompt_tokens", "Prompt tokens of finished requests."),
            ("generation_tokens", "Tokens generated for finished requests."),
        ):
            yield _one(CounterMetricFamily, metric, help_text, labels, stats.get(metric))
        success = CounterMetricFamily(
            PREFIX + "request_success",
            "Finished requests by finish reason.",
            labels=[*keys, "finished_reason"],
        )
        for reason, count in sorted((stats.get("finished") or {}).items()):
            success.add_metric([*values, str(reason)], float(count))
        yield success
        errors = CounterMetricFamily(
            PREFIX + "request_errors",
            "Requests (or messages) answered with an error, by the error's code.",
            labels=[*keys, "code"],
        )
        for code, count in sorted((stats.get("errors") or {}).items()):
            errors.add_metric([*values, str(code)], float(count))
        yield errors
        for metric, field, help_text in _HISTOGRAMS:
            histogram = HistogramMetricFamily(PREFIX + metric, help_text, labels=keys)
            data = stats.get(field)
            if isinstance(data, dict):
                cumulative, buckets = 0, []
                for bound, count in zip(
                    [*data["bounds"], float("inf")], data["counts"], strict=True
                ):
                    cumulative += int(count)
                    buckets.append((_bound(bound), float(cumulative)))
                histogram.add_metric(values, buckets, float(data["sum"]))
            yield histogram

    def _stages(self, status: dict[str, Any], labels: dict[str, str]) -> Iterator[Metric]:
        keys = [*labels, "stage", "device"]
        plan = self.plans.get(self.backend.state.plan)
        predicted = predicted_rates(plan) if plan is not None else []
        rates = {
            phase: GaugeMetricFamily(
                f"{PREFIX}stage_{phase}_tokens_per_second",
                f"A stage's {phase} tokens per second of compute: measured (over the last "
                "second) and as the plan predicts.",
                labels=[*keys, "source"],
            )
            for phase in ("prefill", "decode")
        }
        busy = GaugeMetricFamily(
            PREFIX + "stage_busy_ratio", "Share of the last second a stage computed.", labels=keys
        )
        queue = GaugeMetricFamily(
            PREFIX + "stage_queue_depth", "Steps waiting at a stage's input.", labels=keys
        )
        restarts = CounterMetricFamily(
            PREFIX + "stage_restarts", "Times a stage process was restarted.", labels=keys
        )
        resident = GaugeMetricFamily(
            PREFIX + "stage_resident_bytes", "A stage process's resident memory.", labels=keys
        )
        metrics = dict(self.backend.monitor.metrics)
        for stage in status.get("stages") or []:
            index = stage.get("index")
            if not isinstance(index, int):
                continue
            device = _device(plan, index)
            values = [*labels.values(), str(index), device]
            restarts.add_metric(values, float(stage.get("restarts") or 0))
            measured = metrics.get(index) or {}
            for phase, family in rates.items():
                rate = (measured.get(phase) or {}).get("busy_tokens_per_s")
                if isinstance(rate, int | float):
                    family.add_metric([*values, "measured"], float(rate))
                if index < len(predicted):
                    p = predicted[index]
                    expected = (
                        p.prefill_tokens_per_s if phase == "prefill" else p.decode_tokens_per_s
                    )
                    family.add_metric([*values, "predicted"], expected)
            for family, field in ((busy, "busy"), (queue, "queue_depth")):
                value = measured.get(field)
                if isinstance(value, int | float):
                    family.add_metric(values, float(value))
            memory = measured.get("rss_bytes") or stage.get("resident_bytes")
            if isinstance(memory, int | float):
                resident.add_metric(values, float(memory))
        yield from rates.values()
        yield from (busy, queue, restarts, resident)


def _one(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    help_text: str,
    labels: dict[str, str],
    value: object,
) -> Metric:
    """A metric of one series: ``value`` (0 when absent) under ``labels``."""
    metric = family(PREFIX + name, help_text, labels=list(labels))
    number = float(value) if isinstance(value, int | float) else 0.0
    metric.add_metric(list(labels.values()), number)
    return metric


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _device(plan: Plan | None, index: int) -> str:
    if plan is None or index >= len(plan.stages):
        return ""
    return plan.stages[index].device.key


def registry_for(backend: Backend) -> CollectorRegistry:
    """A registry holding only the deployment's collector (no process metrics of this one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DeploymentCollector(backend))
    return registry


def exposition(registry: CollectorRegistry) -> tuple[str, str]:
    """The exposition text and its content type."""
    return generate_latest(registry).decode("utf-8"), CONTENT_TYPE_LATEST
