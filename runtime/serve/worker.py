"""A stage worker: one process holding one plan stage's shard.

Sockets (ZeroMQ):
- data in: PULL, bound here; the previous stage (or the gateway) PUSHes steps to it;
- data out: PUSH, connected to the next stage (or the gateway) when the gateway says where;
- control: DEALER, connected to the gateway's control ROUTER: hello, load progress, ready,
  heartbeats and step failures go up; ``connect`` and ``stop`` come down;
- metrics: PUB, bound here; a metrics message every second (see :func:`metrics_message`).

Run as ``python -m runtime.serve.worker --plan plan.json --stage I --control ENDPOINT``.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch
import zmq

from planner.plan import Plan, PlanValidationError
from runtime.errors import RuntimeFailure
from runtime.model.shard import StageShard
from runtime.model.stages import load_plan_stage
from runtime.serve.frames import (
    CONTROL_FRAME_BYTES,
    FrameError,
    StepHeader,
    decode_step,
    encode_step,
    positions_and_keys,
)
from runtime.serve.keys import CurveKeys, secure_client, secure_server, start_authenticator
from runtime.serve.launcher import BEAT_INTERVAL_S, bind_endpoint
from runtime.serve.sampling import sample

METRICS_INTERVAL_S = 1.0
DEFAULT_STEP_FRAME_BYTES = 64 << 20


def control_message(kind: str, stage: int, **fields: Any) -> bytes:
    """A control-channel message from a stage (msgpack map)."""
    return msgpack.packb({"type": kind, "stage": stage, **fields}, use_bin_type=True)  # type: ignore[no-any-return]


@dataclass
class PhaseWindow:
    """Work done in one phase since the last metrics message."""

    tokens: int = 0
    steps: int = 0
    busy_s: float = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.steps += 1
        self.busy_s += seconds


@dataclass
class Meter:
    """Per-phase throughput over one-second windows."""

    started: float = field(default_factory=time.monotonic)
    prefill: PhaseWindow = field(default_factory=PhaseWindow)
    decode: PhaseWindow = field(default_factory=PhaseWindow)
    total_tokens: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})

    def add(self, phase: str, tokens: int, seconds: float) -> None:
        (self.prefill if phase == "prefill" else self.decode).add(tokens, seconds)
        self.total_tokens[phase] += tokens

    def take(self) -> tuple[float, PhaseWindow, PhaseWindow]:
        """The window's length and its two phases; starts the next window."""
        now = time.monotonic()
        window = (now - self.started, self.prefill, self.decode)
        self.started, self.prefill, self.decode = now, PhaseWindow(), PhaseWindow()
        return window


def metrics_message(
    stage: int,
    meter: Meter,
    queue_depth: int,
    shard: StageShard,
    paths: dict[int, list[str]],
    dropped: int = 0,
) -> dict[str, Any]:
    """One metrics message. Rates: tokens per wall second of the window (``*_tokens_per_s``)
    and per second of compute (``*_busy_tokens_per_s``, what the plan predicts)."""
    span, pre, dec = meter.take()

    def phase(w: PhaseWindow) -> dict[str, float | None]:
        return {
            "tokens_per_s": w.tokens / span if span > 0 else 0.0,
            "busy_tokens_per_s": w.tokens / w.busy_s if w.busy_s > 0 else None,
            "step_ms": 1000 * w.busy_s / w.steps if w.steps else None,
            "steps": w.steps,
        }

    return {
        "type": "metrics",
        "stage": stage,
        "time": time.time(),
        "window_s": span,
        "prefill": phase(pre),
        "decode": phase(dec),
        "busy": (pre.busy_s + dec.busy_s) / span if span > 0 else 0.0,
        "queue_depth": queue_depth,
        "tokens_total": dict(meter.total_tokens),
        "resident_bytes": shard.resident_bytes(),
        "rss_bytes": _rss_bytes(),
        "kernel_paths": {str(k): v for k, v in paths.items()},
        "threads": torch.get_num_threads(),
        "dropped_steps": dropped,
    }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_step(shard: StageShard, header: StepHeader, x: torch.Tensor) -> tuple[StepHeader, Any]:
    """Run one step through the shard: (header, hidden states) to pass on, or the last stage's
    reply header carrying the sampled tokens (and no tensor)."""
    if x.shape[0] != header.rows:
        raise FrameError(f"tensor has {x.shape[0]} rows, slots say {header.rows}")
    if header.slots[1] > shard.spec.batch_slots:
        raise FrameError(f"slots {header.slots} exceed the stage's {shard.spec.batch_slots}")
    seqlen = x.shape[1]
    if header.past + seqlen > shard.spec.max_len:
        raise FrameError(
            f"{header.past + seqlen} positions exceed the cache's {shard.spec.max_len}"
        )
    if any(not 0 <= p <= header.past + seqlen for p in header.pad):
        raise FrameError(f"pad {list(header.pad)} exceeds the {header.past + seqlen} positions")
    if header.phase == "decode" and seqlen != 1:
        raise FrameError(f"a decode step carries one token per row, not {seqlen}")
    if len(header.sample) != header.rows:
        raise FrameError(f"sample has {len(header.sample)} rows for {header.rows}")
    if shard.embedding is not None:
        vocab = shard.arch.vocab_size
        if x.dtype != torch.int64 or x.dim() != 2:
            raise FrameError("the first stage takes int64 token ids [rows, tokens]")
        if x.numel() and not (int(x.min()) >= 0 and int(x.max()) < vocab):
            raise FrameError(f"token ids must be in [0, {vocab})")
    elif x.dim() != 3 or x.shape[2] != shard.arch.hidden_size:
        raise FrameError(f"expected hidden states [rows, tokens, {shard.arch.hidden_size}]")
    elif not x.is_floating_point():
        raise FrameError(f"hidden states must be floating point, not {x.dtype}")
    positions, keys = positions_and_keys(header, seqlen)
    out = shard(x, shard.context(header.slots, header.past, positions, keys), True)
    if shard.head is None:
        return header, out
    params, steps = header.sampling()
    tokens = sample(out[:, -1].float(), params, steps)
    return header.with_tokens(tokens.tolist()), None


class Worker:
    """The worker's sockets and loop (see the module docstring)."""

    def __init__(
        self,
        stage: int,
        control_endpoint: str,
        bind_host: str,
        keys: CurveKeys | None,
        beat_interval_s: float = BEAT_INTERVAL_S,
        max_frame_bytes: int = DEFAULT_STEP_FRAME_BYTES,
    ) -> None:
        self.stage, self.beat_interval_s = stage, beat_interval_s
        self.ctx = zmq.Context()
        self.keys = keys
        self.auth = start_authenticator(self.ctx, keys)
        self.control = self.ctx.socket(zmq.DEALER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, CONTROL_FRAME_BYTES)
        self.control.setsockopt(zmq.IDENTITY, f"stage-{stage}".encode())
        secure_client(self.control, keys)
        self.control.connect(control_endpoint)
        self.data_in = self.ctx.socket(zmq.PULL)
        self.data_in.setsockopt(zmq.LINGER, 0)
        self.data_in.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # before bind: it is inherited
        secure_server(self.data_in, keys)
        self.data_in.bind(bind_endpoint(bind_host, f"stage-{stage}-data"))
        self.metrics = self.ctx.socket(zmq.PUB)
        self.metrics.setsockopt(zmq.LINGER, 0)
        secure_server(self.metrics, keys)
        self.metrics.bind(bind_endpoint(bind_host, f"stage-{stage}-metrics"))
        self.data_out: zmq.Socket[bytes] | None = None
        self.queue: collections.deque[list[zmq.Frame]] = collections.deque()
        self.stopping = False
        self.dropped = 0  # steps refused (malformed) or failed, since the start
        self.parent = os.getppid()

    def endpoint(self, sock: zmq.Socket[bytes]) -> str:
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def send_control(self, kind: str, **fields: Any) -> None:
        self.control.send(control_message(kind, self.stage, **fields))

    def hello(self) -> None:
        self.send_control(
            "hello",
            pid=os.getpid(),
            data=self.endpoint(self.data_in),
            metrics=self.endpoint(self.metrics),
        )

    def handle_control(self) -> None:
        while self.control.poll(0):
            try:
                msg = msgpack.unpackb(self.control.recv(), raw=False)
                kind = msg["type"]
            except Exception:
                continue  # only the gateway can reach this socket; ignore what it cannot mean
            if kind == "stop":
                self.stopping = True
            elif kind == "connect" and isinstance(msg.get("downstream"), str):
                self.connect_downstream(msg["downstream"])

    def connect_downstream(self, endpoint: str) -> None:
        if self.data_out is not None:
            self.data_out.close(linger=0)
        self.data_out = self.ctx.socket(zmq.PUSH)
        self.data_out.setsockopt(zmq.LINGER, 0)
        secure_client(self.data_out, self.keys)
        self.data_out.connect(endpoint)

    def orphaned(self) -> bool:
        return os.getppid() != self.parent

    def serve(self, shard: StageShard) -> None:
        """Process steps until told to stop or the gateway's process goes away."""
        paths = shard.kernel_paths()
        meter = Meter()
        poller = zmq.Poller()
        poller.register(self.data_in, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        next_beat = next_metrics = time.monotonic()
        while not self.stopping and not self.orphaned():
            ready = dict(poller.poll(0 if self.queue else 50))
            if self.control in ready:
                self.handle_control()
            while self.data_in.poll(0):
                self.queue.append(self.data_in.recv_multipart(copy=False))
            if self.queue and self.data_out is not None:
                self.process(shard, self.queue.popleft(), meter)
            now = time.monotonic()
            if now >= next_metrics:
                message = metrics_message(
                    self.stage, meter, len(self.queue), shard, paths, self.dropped
                )
                self.metrics.send(msgpack.packb(message, use_bin_type=True))
                next_metrics = now + METRICS_INTERVAL_S
            if now >= next_beat:
                self.send_control("beat", queue_depth=len(self.queue))
                next_beat = now + self.beat_interval_s

    def process(self, shard: StageShard, frames: list[zmq.Frame], meter: Meter) -> None:
        assert self.data_out is not None
        header: StepHeader | None = None
        try:
            header, x = decode_step(frames)
            if x is None:
                raise FrameError("a step into a stage needs a tensor frame")
            started = time.perf_counter()
            out_header, out = run_step(shard, header, x)
            tokens = header.rows * (x.shape[1] if header.phase == "prefill" else 1)
            meter.add(header.phase, tokens, time.perf_counter() - started)
        except Exception as exc:  # a bad step is dropped and counted; the stage goes on
            self.dropped += 1
            fields: dict[str, Any] = {"message": f"{type(exc).__name__}: {exc}"}
            if header is not None:
                fields |= {"group": header.group, "seq": header.seq}
            self.send_control("step_failed", **fields)
            return
        self.data_out.send_multipart(encode_step(out_header, out), copy=False)

    def close(self) -> None:
        for sock in (self.control, self.data_in, self.metrics, self.data_out):
            if sock is not None:
                sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def _say(message: str) -> None:
    """One line of the stage's log (its standard error, which the launcher keeps)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve.worker", description=__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--stage", type=int, required=True)
    parser.add_argument("--control", required=True, help="the gateway's control endpoint")
    parser.add_argument("--bind-host", default="127.0.0.1")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--keys", type=Path, default=None, help="CURVE key directory")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for the stage's kernels"
    )
    parser.add_argument(
        "--impl",
        choices=("auto", "reference"),
        default="auto",
        help="auto: the platform's kernels; reference: dequantized weights in the compute dtype",
    )
    parser.add_argument(
        "--beat-interval", type=float, default=BEAT_INTERVAL_S, help="heartbeat period, seconds"
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=int,
        default=DEFAULT_STEP_FRAME_BYTES,
        help="largest step frame the data socket accepts (the gateway sizes it from the plan)",
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when stages stop
    keys = CurveKeys.load(args.keys, "stage") if args.keys else None
    worker = Worker(
        args.stage,
        args.control,
        args.bind_host,
        keys,
        max(0.05, args.beat_interval),
        max(CONTROL_FRAME_BYTES, args.max_frame_bytes),
    )
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "stopping", True))
    try:
        worker.hello()
        try:
            plan = Plan.load(args.plan)
            if not 0 <= args.stage < len(plan.stages):
                raise RuntimeFailure(
                    f"the plan has {len(plan.stages)} stages, no stage {args.stage}"
                )
            spec = plan.stages[args.stage]
            layers = spec.layer_range
            _say(f"stage {args.stage}: loading layers {layers.start}-{layers.stop - 1} of "
                 f"{plan.model.source} on {spec.device.key}")  # fmt: skip
            began = time.monotonic()
            worker.send_control("loading")
            shard = load_plan_stage(
                plan,
                args.stage,
                checkpoint=args.checkpoint,
                impl=args.impl,
                progress=lambda done, total: worker.send_control(
                    "progress", done=done, total=total, rss_bytes=_rss_bytes()
                ),
            )
        except (RuntimeFailure, PlanValidationError, OSError) as exc:
            title = getattr(exc, "title", type(exc).__name__)
            worker.send_control("failed", title=title, message=str(exc))
            _say(f"stage {args.stage}: {title}: {exc}")
            time.sleep(0.2)  # let the message leave before the socket closes
            return 1
        worker.send_control(
            "ready",
            resident_bytes=shard.resident_bytes(),
            rss_bytes=_rss_bytes(),
            kernel_paths={str(k): v for k, v in shard.kernel_paths().items()},
            device=str(shard.device),
        )
        _say(f"stage {args.stage}: ready in {time.monotonic() - began:.1f} s, "
             f"{shard.resident_bytes() / 2**20:.1f} MiB resident, on {shard.device}")  # fmt: skip
        worker.serve(shard)
        _say(f"stage {args.stage}: stopped")
        return 0
    except Exception as exc:
        worker.send_control("failed", title="stage crashed", message=f"{exc!r}")
        traceback.print_exc()
        time.sleep(0.2)
        return 1
    finally:
        worker.close()


if __name__ == "__main__":
    sys.exit(main())
