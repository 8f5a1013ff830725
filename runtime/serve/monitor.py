"""Watching a deployment: the gateway's status and every stage's metrics, over ZeroMQ SUB.

Used by ``pqctl apply`` and the dashboard. No torch here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from planner.plan import Plan
from runtime.serve.deployment import DeploymentState
from runtime.serve.keys import CurveKeys, secure_client

STATUS_FRAME_BYTES = 16 << 20
"""Largest status or metrics message a monitor accepts."""


@dataclass(frozen=True, slots=True)
class PredictedRates:
    """What the plan predicts for one stage while it is busy (tokens per second)."""

    prefill_tokens_per_s: float
    decode_tokens_per_s: float


def predicted_rates(plan: Plan) -> list[PredictedRates]:
    """Per stage: a prefill micro-batch is ξ_p · s tokens in ``prefill_s``, a decode step ξ_d
    tokens in ``decode_s`` (the plan's per-micro-batch stage times)."""
    w, mb = plan.workload, plan.micro_batching
    out = []
    for stage in plan.stages:
        p, d = stage.predicted.prefill_s, stage.predicted.decode_s
        out.append(
            PredictedRates(
                mb.prefill_size * w.prompt_len / p if p > 0 else 0.0,
                mb.decode_size / d if d > 0 else 0.0,
            )
        )
    return out


class Monitor:
    """Subscribes to a gateway's status and, as they appear in it, to its stages' metrics."""

    def __init__(self, status_endpoint: str, keys: CurveKeys | None = None) -> None:
        self.ctx = zmq.Context()
        self.keys = keys
        self.status_sock = self._sub(status_endpoint)
        self.metric_socks: dict[str, zmq.Socket[bytes]] = {}
        self.status: dict[str, Any] | None = None
        self.metrics: dict[int, dict[str, Any]] = {}
        self.updated = 0.0

    @classmethod
    def of(cls, state: DeploymentState) -> Monitor:
        """A monitor of a running deployment, with the deployment's own keys when it has keys
        (its status and metrics sockets admit only those).

        Raises:
            ValueError: its key directory cannot be read (another user's deployment).
        """
        directory = state.monitor_keys_dir()
        return cls(
            state.status_endpoint, CurveKeys.load(directory, "client") if directory else None
        )

    def _sub(self, endpoint: str) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, STATUS_FRAME_BYTES)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        secure_client(sock, self.keys)
        sock.connect(endpoint)
        return sock

    def poll(self, timeout_s: float) -> bool:
        """Read what arrived within ``timeout_s``; whether anything did."""
        poller = zmq.Poller()
        socks = [self.status_sock, *self.metric_socks.values()]
        for sock in socks:
            poller.register(sock, zmq.POLLIN)
        got = False
        deadline = time.monotonic() + timeout_s
        while True:
            ready = dict(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if not ready:
                return got
            for sock in ready:
                while sock.poll(0):
                    self._on(sock.recv())
                    got = True
            if time.monotonic() >= deadline:
                return got

    def _on(self, frame: bytes) -> None:
        try:
            message = msgpack.unpackb(frame, raw=False)
        except Exception:
            return
        if not isinstance(message, dict):
            return
        self.updated = time.monotonic()
        if message.get("type") == "status":
            self.status = message
            for stage in message.get("stages", []):
                endpoint = stage.get("metrics")
                if isinstance(endpoint, str) and endpoint not in self.metric_socks:
                    self.metric_socks[endpoint] = self._sub(endpoint)
        elif message.get("type") == "metrics" and isinstance(message.get("stage"), int):
            self.metrics[message["stage"]] = message

    def close(self) -> None:
        for sock in (self.status_sock, *self.metric_socks.values()):
            sock.close(linger=0)
        self.ctx.term()
