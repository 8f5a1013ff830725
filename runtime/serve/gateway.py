"""The gateway process: starts a plan's stages, schedules requests through them, serves clients.

Sockets (ZeroMQ, all bound here):
- client ROUTER: the client protocol (``runtime.serve.protocol``, docs/protocol.md);
- control ROUTER: stage workers' hello / progress / ready / beats / failures; connect and stop;
- results PULL: the last stage's sampled tokens;
- status PUB: a status message every half second (stages, load progress, requests, failures);
- and a PUSH connected to the first stage's data PULL.

Run as ``python -m runtime.serve.gateway --plan plan.json --name NAME``; ``pqctl apply`` does this.
A stage that dies or stops sending heartbeats (every ``--beat-interval`` seconds; silent for
``--beat-timeout``) while serving fails the requests in flight (an error naming it and why) and
is restarted; waiting requests wait for it. More than ``--restarts`` failures of the deployment's
stages within ``--restart-window`` seconds end the deployment (failures further apart do not
add up).
Exit codes: 0 stopped on request, 1 start-up failure, 4 a stage failed for good.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import zmq

from planner.plan import Plan, PlanValidationError
from runtime.errors import RuntimeFailure
from runtime.model.source import checked_checkpoint
from runtime.model.tokenizer import load_tokenizer
from runtime.serve.deployment import DeploymentError, DeploymentState, check_name, state_dir
from runtime.serve.frames import (
    CONTROL_FRAME_BYTES,
    FrameError,
    decode_step,
    encode_step,
    step_frame_bytes,
)
from runtime.serve.keys import (
    CLIENT_DOMAIN,
    INTERNAL_DOMAIN,
    CurveKeys,
    deployment_keys,
    secure_client,
    secure_server,
    start_authenticator,
)
from runtime.serve.launcher import (
    BEAT_INTERVAL_S,
    BEAT_TIMEOUT_S,
    IPC_PREFIX,
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    Launcher,
    LocalLauncher,
    RestartWindow,
    StageHandle,
    StageLaunch,
    available_cores,
    bind_endpoint,
    make_run_dir,
    stage_threads,
    stages_take_turns,
    stop_all,
)
from runtime.serve.operator import OPERATOR_IDENTITY
from runtime.serve.protocol import (
    HARD_FRAME_BYTES,
    INTERNAL,
    PROTOCOL_VERSION,
    REPLANNING,
    SHUTTING_DOWN,
    STAGE_FAILED,
    CancelRequest,
    GenerateRequest,
    InfoRequest,
    Limits,
    ProtocolError,
    pack,
    parse_client_message,
)
from runtime.serve.replan import Replanner, stage_summary
from runtime.serve.request_stats import RequestStats
from runtime.serve.scheduler import Layout, Reply, Scheduler, Step

EXIT_STAGE_FAILED = 4
STATUS_INTERVAL_S = 0.5
GATHER_GAP_S = 0.005  # a pause this long ends a burst of requests (see Gateway._on_clients)
GATHER_MAX_S = 0.05


@dataclass
class StageState:
    """What the gateway knows of one stage worker."""

    index: int
    handle: StageHandle
    state: str = "starting"  # starting → loading → ready; failed
    data: str | None = None
    metrics: str | None = None
    last_beat: float = field(default_factory=time.monotonic)
    error: str | None = None  # why the running process failed (until it is restarted)
    last_failure: str | None = None  # why the stage was last restarted
    restarts: int = 0
    resident_bytes: int | None = None
    kernel_paths: dict[str, list[str]] | None = None
    loaded: tuple[int, int] | None = None  # (parts loaded, parts in all) while loading

    def describe(self, plan: Plan) -> str:
        stage = plan.stages[self.index]
        dev = stage.device
        where = "cpu" if dev.index < 0 else f"cuda:{dev.index}"
        r = stage.layer_range
        return f"stage {self.index} ({where} on {dev.host}, layers {r.start}–{r.stop - 1})"


class Gateway:
    """Sockets, stage supervision and the request loop (see the module docstring)."""

    def __init__(
        self,
        plan_path: Path,
        name: str,
        client_endpoint: str,
        launcher: Launcher,
        *,
        keys_dir: Path | None = None,
        bind_host: str = "127.0.0.1",
        beat_interval_s: float = BEAT_INTERVAL_S,
        beat_timeout_s: float = BEAT_TIMEOUT_S,
        log_dir: Path | None = None,
        impl: str = "auto",
        max_restarts: int = MAX_RESTARTS,
        restart_window_s: float = RESTART_WINDOW_S,
        replanner: Replanner | None = None,
        status_endpoint: str | None = None,
        owner_pid: int | None = None,
        deployment_started: float | None = None,
        gateway_restarts: int = 0,
        internal_keys_dir: Path | None = None,
        http_endpoint: str | None = None,
    ) -> None:
        self.name = check_name(name)
        self.replanner, self.replan_note = replanner, ""
        self._use_plan(plan_path)
        self.launcher, self.bind_host, self.beat_timeout_s = launcher, bind_host, beat_timeout_s
        self.keys_dir, self.impl, self.max_restarts = keys_dir, impl, max_restarts
        self.beat_interval_s, self.restart_window_s = beat_interval_s, restart_window_s
        self.failures = RestartWindow(max_restarts, restart_window_s)  # stage failures
        # With keys, the client endpoint admits the operator's authorized/ and everything else
        # only the deployment's own keys (runtime/serve/keys.py: roles).
        client_keys = CurveKeys.load(keys_dir) if keys_dir else None
        if keys_dir is not None and internal_keys_dir is None:
            internal_keys_dir = internal_keys(name, reuse=gateway_restarts > 0)
        self.internal_keys_dir = internal_keys_dir
        keys = CurveKeys.load(internal_keys_dir) if internal_keys_dir else None
        self.log_dir = log_dir or state_dir() / "logs" / name
        self.log_dir.mkdir(parents=True, exist_ok=True)

        self.ctx = zmq.Context()
        self.auth = start_authenticator(self.ctx, keys, client_keys)
        self.client = self._bind(
            zmq.ROUTER, client_endpoint, client_keys, HARD_FRAME_BYTES, CLIENT_DOMAIN
        )
        self.client.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.client.setsockopt(zmq.SNDHWM, 100_000)
        self.control = self._bind(
            zmq.ROUTER, bind_endpoint(bind_host, "control"), keys, CONTROL_FRAME_BYTES
        )
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted stage reuses its identity
        self.results = self._bind(
            zmq.PULL, bind_endpoint(bind_host, "results"), keys, self.step_bytes
        )
        status_endpoint = status_endpoint or bind_endpoint(bind_host, "status")
        self.status = self._bind(zmq.PUB, status_endpoint, keys, CONTROL_FRAME_BYTES)
        self.keys = keys
        self.to_first = self._push()
        self.stages: list[StageState] = []
        self.phase = "starting"
        self.failure: str | None = None
        self.stopping = False
        self.state = DeploymentState(
            name=self.name,
            pid=owner_pid or os.getpid(),
            plan=str(self.plan_path),
            model=self.plan.model.source,
            client_endpoint=self._endpoint(self.client),
            status_endpoint=self._endpoint(self.status),
            started=deployment_started or time.time(),
            log_dir=str(self.log_dir),
            keys=str(keys_dir) if keys_dir else None,
            internal_keys=str(internal_keys_dir) if internal_keys_dir else None,
            run_dir=bind_host.removeprefix(IPC_PREFIX)
            if bind_host.startswith(IPC_PREFIX)
            else None,
            gateway_pid=os.getpid(),
            gateway_restarts=gateway_restarts,
            control_endpoint=self._endpoint(self.control),
            http_endpoint=http_endpoint,
        )
        self.stats = RequestStats()
        self.window_started, self.window_tokens = time.monotonic(), 0
        self.tokens_per_s = 0.0

    def _use_plan(self, plan_path: Path) -> None:
        """Load a plan and everything that follows from it (at start, and after a re-plan)."""
        self.plan_path = plan_path.resolve()
        self.plan = Plan.load(self.plan_path)
        self.checkpoint, _ = checked_checkpoint(self.plan)
        self.tokenizer, pad_id, eos_ids = load_tokenizer(self.checkpoint)
        w, mb = self.plan.workload, self.plan.micro_batching
        self.limits = Limits(w.prompt_len, w.max_new_tokens)
        layout = Layout(
            w.global_batch, mb.prefill_size, mb.decode_size, w.prompt_len, w.max_new_tokens
        )
        self.scheduler = Scheduler(
            layout, self.tokenizer, pad_id, eos_ids, vocab_size=self.plan.model.vocab_size
        )
        rows = max(mb.prefill_size, mb.decode_size)
        self.step_bytes = step_frame_bytes(rows, w.prompt_len, self.plan.model.hidden_size)
        cpu_stages = [i for i, st in enumerate(self.plan.stages) if st.device.index < 0]
        turns = stages_take_turns(w.global_batch, mb.prefill_size)
        self.threads = stage_threads(cpu_stages, available_cores(), take_turns=turns)

    def _bind(
        self,
        kind: int,
        endpoint: str,
        keys: CurveKeys | None,
        max_bytes: int,
        domain: str = INTERNAL_DOMAIN,
    ) -> zmq.Socket[bytes]:
        """A socket bound to ``endpoint`` that drops any peer sending a frame over
        ``max_bytes`` (set before binding: the listener's connections inherit it)."""
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        secure_server(sock, keys, domain)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise RuntimeFailure(f"cannot bind {endpoint}: {exc}") from None
        return sock

    def _push(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        secure_client(sock, self.keys)
        return sock

    @staticmethod
    def _endpoint(sock: zmq.Socket[bytes]) -> str:
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ----------------------------------------------------------------- life cycle
    def _launch(self, index: int) -> StageHandle:
        launch = StageLaunch(
            self.plan_path,
            index,
            self._endpoint(self.control),
            self.bind_host,
            self.checkpoint,
            self.internal_keys_dir,
            self.log_dir / f"stage-{index}.log",
            self.impl,
            self.threads.get(index),
            self.beat_interval_s,
            self.step_bytes,
        )
        return self.launcher.start(launch)

    def start_stages(self) -> None:
        for index in range(len(self.plan.stages)):
            self.stages.append(StageState(index, self._launch(index)))
        self.phase = "loading"

    def run(self) -> int:
        """The loop: until stopped (0) or a stage fails (4)."""
        self.state.save()
        try:
            self.start_stages()
            poller = zmq.Poller()
            for sock in (self.client, self.control, self.results):
                poller.register(sock, zmq.POLLIN)
            next_status = 0.0
            while not self.stopping:
                ready = dict(poller.poll(20))
                if self.control in ready:
                    self._on_control()
                if self.results in ready:
                    self._on_results()
                if self.client in ready:
                    self._on_clients()
                if self.phase == "serving":
                    self._send_steps(self.scheduler.admit())
                if self.phase == "replanning":
                    self._poll_replan()
                self._check_stages()
                if self.failure is not None:
                    break
                now = time.monotonic()
                if now >= next_status:
                    self._publish_status()
                    next_status = now + STATUS_INTERVAL_S
            if self.failure is None:
                self.phase = "stopping"
                self._reply(self.scheduler.fail_all(SHUTTING_DOWN, "the deployment is stopping"))
            self._publish_status()
            return 0 if self.failure is None else EXIT_STAGE_FAILED
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self._stop_stages()
        self.state.remove()
        for sock in (self.client, self.control, self.results, self.status, self.to_first):
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        own = internal_keys_dir(self.name)
        if self.internal_keys_dir is not None and self.internal_keys_dir == own:
            shutil.rmtree(own, ignore_errors=True)

    def _stop_stages(self) -> None:
        """Ask every stage to stop, then end those that do not."""
        for stage in self.stages:
            self._tell(stage.index, {"type": "stop"})
        stop_all([s.handle for s in self.stages])

    def _fail(self, message: str) -> None:
        self.failure = message
        self.phase = "failed"
        self._reply(self.scheduler.fail_all(STAGE_FAILED, message))

    # ----------------------------------------------------------------- stages
    def _tell(self, index: int, message: dict[str, Any]) -> None:
        # Not connected (yet or any more): the liveness checks handle that.
        with contextlib.suppress(zmq.ZMQError):
            self.control.send_multipart(
                [f"stage-{index}".encode(), msgpack.packb(message)], zmq.NOBLOCK
            )

    def _on_control(self) -> None:
        while self.control.poll(0):
            frames = self.control.recv_multipart()
            if frames[0] == OPERATOR_IDENTITY:
                self._on_operator(frames[-1])
                continue
            try:
                msg = msgpack.unpackb(frames[-1], raw=False)
                index = int(msg["stage"])
                stage = self.stages[index]
                kind = msg["type"]
            except Exception:
                continue
            if frames[0] != f"stage-{index}".encode():
                continue
            stage.last_beat = time.monotonic()
            if kind == "hello":
                stage.data, stage.metrics = str(msg["data"]), str(msg["metrics"])
                if self.phase == "recovering":
                    self._wire_around(index)
                else:
                    self._wire()
            elif kind == "loading":
                stage.state, stage.loaded = "loading", None
            elif kind == "progress":
                done, total = msg.get("done"), msg.get("total")
                if isinstance(done, int) and isinstance(total, int) and 0 <= done <= total:
                    stage.loaded = (done, total)
                if isinstance(msg.get("rss_bytes"), int):
                    stage.resident_bytes = msg["rss_bytes"]
            elif kind == "ready":
                stage.state = "ready"
                stage.resident_bytes = msg.get("resident_bytes")
                stage.kernel_paths = msg.get("kernel_paths")
                ready = all(s.state == "ready" for s in self.stages)
                if ready and self.phase in ("loading", "recovering"):
                    self.phase = "serving"
            elif kind == "failed":
                stage.error = f"failed: {msg.get('title')}: {msg.get('message')}"
                if self.phase != "serving":  # loading failed: restarting would fail again
                    stage.state = "failed"
                    self._fail(f"{stage.describe(self.plan)} {stage.error}")
                # while serving, the process exits next and is restarted
            elif kind == "step_failed":
                group, seq = msg.get("group"), msg.get("seq")
                if not (isinstance(group, int) and isinstance(seq, int)):
                    continue  # a step the stage could not even read: nothing to fail
                if not self.scheduler.is_pending(group, seq):
                    continue  # not a step in flight: a stale or forged report
                text = f"{stage.describe(self.plan)} could not run a step: {msg.get('message')}"
                self._reply(self.scheduler.fail_group(group, INTERNAL, text))

    def _on_operator(self, frame: bytes) -> None:
        """An operator's message on the control socket (the dashboard's Requests view):
        ``{"type": "cancel", "client": <the id's last 8 hex digits, as listed>, "id": <str>}``
        ends that request as its own client's cancel would. Anything else is ignored."""
        try:
            msg = msgpack.unpackb(frame, raw=False)
            kind, client, request_id = msg["type"], msg["client"], msg["id"]
        except Exception:
            return
        if kind != "cancel" or not isinstance(client, str) or not isinstance(request_id, str):
            return
        active = self.scheduler.find(client, request_id)
        if active is not None:
            self._reply(self.scheduler.cancel(active.client, request_id))

    def _wire(self) -> None:
        """Once every stage said where it listens: chain gateway → 0 → … → N-1 → gateway."""
        if any(s.data is None for s in self.stages):
            return
        self.to_first.connect(str(self.stages[0].data))
        for stage in self.stages:
            nxt = (
                self.stages[stage.index + 1].data
                if stage.index + 1 < len(self.stages)
                else self._endpoint(self.results)
            )
            self._tell(stage.index, {"type": "connect", "downstream": nxt})

    def _wire_around(self, index: int) -> None:
        """A restarted stage listens somewhere new: reconnect its upstream, tell it its
        downstream. Other links are untouched."""
        stage = self.stages[index]
        if index == 0:
            self.to_first.close(linger=0)  # drops steps queued for the dead process
            self.to_first = self._push()
            self.to_first.connect(str(stage.data))
        else:
            self._tell(index - 1, {"type": "connect", "downstream": stage.data})
        nxt = self.stages[index + 1].data if index + 1 < len(self.stages) else None
        self._tell(index, {"type": "connect", "downstream": nxt or self._endpoint(self.results)})

    def _check_stages(self) -> None:
        now = time.monotonic()
        for stage in self.stages:
            code = stage.handle.exit_code()
            if code is not None and not self.stopping:
                why = stage.error or getattr(stage.handle, "error", None)
                self._stage_lost(stage, why or f"exited with code {code}")
                return
            if stage.state == "ready" and now - stage.last_beat > self.beat_timeout_s:
                self._stage_lost(stage, f"sent no heartbeat for {self.beat_timeout_s:.0f} s")
                return

    def _stage_lost(self, stage: StageState, reason: str) -> None:
        """Fail the requests in flight; restart the stage while restarts remain (waiting
        requests wait for it), else stop the deployment."""
        message = f"{stage.describe(self.plan)} {reason}"
        failures = self.failures.fail()
        if self.phase not in ("serving", "recovering") or self.failures.exhausted:
            stage.state, stage.error = "failed", reason
            if self.phase in ("serving", "recovering"):
                message += (
                    f" ({failures} stage failures within "
                    f"{self.restart_window_s:g} s; at most {self.max_restarts} are restarted)"
                )
            self._fail(message)
            return
        for group in self.scheduler.groups:
            self._reply(self.scheduler.fail_group(group.index, STAGE_FAILED, message))
        stage.handle.kill()
        try:
            stage.handle = self._launch(stage.index)
        except RuntimeFailure as exc:  # its host is gone
            self._host_lost(stage, f"{message}; {exc}")
            return
        stage.state, stage.data, stage.error = "starting", None, None
        stage.last_failure = reason
        stage.restarts += 1
        stage.last_beat = time.monotonic()
        self.phase = "recovering"

    def _host_lost(self, stage: StageState, message: str) -> None:
        """A stage cannot be started again where the plan puts it: re-plan on what is left
        (with a replanner; requests meanwhile are refused as re-planning), else fail."""
        if self.replanner is None:
            stage.state, stage.error = "failed", message
            self._fail(message)
            return
        lost = self.plan.stages[stage.index].device.host
        self.phase = "replanning"
        self.replan_note = f"lost {lost}: {message}"
        print(f"re-planning: {self.replan_note}", flush=True)
        self._reply(self.scheduler.fail_all(REPLANNING, f"re-planning after losing {lost}"))
        self._stop_stages()
        self.stages = []
        self.replanner.start(self.plan, [lost])

    def _poll_replan(self) -> None:
        """Once the planner is done: serve its plan (old and new stages go to the log and the
        status), or fail with its reason."""
        assert self.replanner is not None
        try:
            new = self.replanner.poll()
        except RuntimeFailure as exc:
            self._fail(f"{self.replan_note}; {exc.title}: {exc}")
            return
        if new is None:
            return
        old = stage_summary(self.plan)
        self._use_plan(new)
        self.state = replace(self.state, plan=str(self.plan_path))
        self.state.save()
        use = getattr(self.launcher, "use", None)
        if use is not None:
            use(self.plan, self.plan_path)
        self.replan_note = (
            "re-planned: " + " | ".join(old) + " -> " + " | ".join(stage_summary(self.plan))
        )
        print(self.replan_note, flush=True)
        self.to_first.close(linger=0)
        self.to_first = self._push()
        self.start_stages()

    # ----------------------------------------------------------------- data path
    def _send_steps(self, steps: list[Step]) -> None:
        for header, tensor in steps:
            self.to_first.send_multipart(encode_step(header, tensor), copy=False)

    def _on_results(self) -> None:
        while self.results.poll(0):
            frames = self.results.recv_multipart()
            try:
                header, _ = decode_step(frames)
            except FrameError:
                continue  # only the last stage reaches this socket
            replies, steps = self.scheduler.on_result(header)
            self._reply(replies)
            self._send_steps(steps)

    # ----------------------------------------------------------------- clients
    def _on_clients(self) -> None:
        """Every client message that has arrived. While new requests would go into a free
        group, keep reading until the clients pause (``GATHER_GAP_S``, at most ``GATHER_MAX_S``
        in all): a burst of requests sent together is then admitted together, not split into
        a group of the first few and a later wave of the rest."""
        deadline = time.monotonic() + GATHER_MAX_S
        while True:
            queued = len(self.scheduler.waiting)
            while self.client.poll(0):
                frames = self.client.recv_multipart()
                identity, body = frames[0], frames[1:]
                try:
                    message = parse_client_message(body, self.limits)
                    self._handle(identity, message)
                except ProtocolError as exc:
                    self._reply([(identity, exc.reply())])
            gathering = (
                len(self.scheduler.waiting) > queued
                and self.scheduler.free_capacity() > len(self.scheduler.waiting)
                and time.monotonic() < deadline
            )
            if not (gathering and self.client.poll(round(GATHER_GAP_S * 1000))):
                return

    def _handle(
        self, identity: bytes, message: GenerateRequest | CancelRequest | InfoRequest
    ) -> None:
        if isinstance(message, InfoRequest):
            self._reply([(identity, self._info(message.id))])
        elif isinstance(message, CancelRequest):
            self._reply(self.scheduler.cancel(identity, message.id))
        else:
            if self.phase in ("stopping", "failed"):
                raise ProtocolError(SHUTTING_DOWN, "the deployment is stopping", None, message.id)
            if self.phase == "replanning":
                raise ProtocolError(REPLANNING, self.replan_note, None, message.id)
            ids = self.tokenizer.encode(message.prompt)
            self.scheduler.submit(identity, message, ids)

    def _info(self, request_id: str | None) -> dict[str, Any]:
        w, mb = self.plan.workload, self.plan.micro_batching
        return {
            "type": "info",
            "id": request_id,
            "protocol": PROTOCOL_VERSION,
            "model": self.plan.model.source,
            "state": self.phase,
            "limits": {
                "max_prompt_tokens": self.limits.max_prompt_tokens,
                "max_new_tokens": self.limits.max_new_tokens,
            },
            "global_batch": w.global_batch,
            "prefill_micro_batch": mb.prefill_size,
            "decode_micro_batch": mb.decode_size,
            "stages": len(self.plan.stages),
        }

    def _reply(self, replies: list[Reply]) -> None:
        for identity, message in replies:
            if message.get("type") == "token":
                self.window_tokens += len(message["token_ids"])
            self.stats.on_reply(message)
            try:
                self.client.send_multipart([identity, pack(message)], zmq.NOBLOCK)
            except zmq.ZMQError:
                self.scheduler.forget_client(identity)  # gone or not reading

    # ----------------------------------------------------------------- status
    def _publish_status(self) -> None:
        now = time.monotonic()
        span = now - self.window_started
        if span >= 1.0:
            self.tokens_per_s = self.window_tokens / span
            self.window_started, self.window_tokens = now, 0
        sched = self.scheduler
        message = {
            "type": "status",
            "name": self.name,
            "phase": self.phase,
            "failure": self.failure,
            "replan": self.replan_note or None,
            "client_endpoint": self.state.client_endpoint,
            "pid": self.state.pid,
            "gateway_pid": self.state.gateway_pid,
            "gateway_restarts": self.state.gateway_restarts,
            "started": self.state.started,
            "stages": [
                {
                    "index": s.index,
                    "state": s.state,
                    "pid": s.handle.pid,
                    "metrics": s.metrics,
                    "error": s.error,
                    "last_failure": s.last_failure,
                    "restarts": s.restarts,
                    "resident_bytes": s.resident_bytes,
                    "loaded": list(s.loaded) if s.loaded else None,
                }
                for s in self.stages
            ],
            "requests": {
                "waiting": len(sched.waiting),
                "active": sched.active_requests,
                "completed": sched.completed,
                "dropped_results": sched.dropped_results,
                "steps_in_flight": sched.in_flight,
            },
            "generated_tokens": sched.generated_tokens,
            "request_list": sched.request_rows(),
            "request_stats": self.stats.to_dict(),
            "time": time.time(),
        }
        self.status.send(msgpack.packb(message, use_bin_type=True))


def internal_keys_dir(name: str) -> Path:
    """Where deployment ``name`` keeps its own keys (with --keys)."""
    return state_dir() / "keys" / name


def internal_keys(name: str, reuse: bool) -> Path:
    """The deployment's own key directory (created fresh at its first start)."""
    return deployment_keys(internal_keys_dir(name), reuse=reuse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve.gateway", description=__doc__)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--name", default="default")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:7460", help="client ROUTER endpoint")
    parser.add_argument(
        "--bind-host",
        default=None,
        help="address the gateway's stage-facing sockets bind to (default 127.0.0.1; with "
        "--ray, this node's address)",
    )
    parser.add_argument(
        "--ray", default=None, help="start stages through the Ray cluster at this address"
    )
    parser.add_argument(
        "--replan-on-loss",
        action="store_true",
        help="with --ray: when a host is lost, re-plan on the hosts left and serve that plan",
    )
    parser.add_argument("--keys", type=Path, default=None, help="CURVE key directory")
    parser.add_argument(
        "--status-endpoint", default=None, help="status PUB endpoint (default: a free port)"
    )
    parser.add_argument(
        "--owner-pid", type=int, default=None, help="the supervisor's pid, for the state file"
    )
    parser.add_argument("--deployment-started", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="private directory for the internal Unix sockets (default: a fresh one; not with "
        "--ray or --bind-host, which use TCP)",
    )
    parser.add_argument("--gateway-restarts", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--http-endpoint",
        default=None,
        help="HOST:PORT of the deployment's HTTP endpoint (served by runtime.serve.http beside "
        "the gateway), recorded in the state file",
    )
    parser.add_argument(
        "--beat-interval", type=float, default=BEAT_INTERVAL_S, help="stage heartbeat period, s"
    )
    parser.add_argument(
        "--beat-timeout", type=float, default=BEAT_TIMEOUT_S, help="silence, s, that loses a stage"
    )
    parser.add_argument(
        "--restarts",
        type=int,
        default=MAX_RESTARTS,
        help="stage failures restarted within --restart-window before giving up",
    )
    parser.add_argument("--restart-window", type=float, default=RESTART_WINDOW_S)
    parser.add_argument(
        "--impl",
        choices=("auto", "reference"),
        default="auto",
        help="stage compute: the platform's kernels, or dequantized weights (for checking)",
    )
    args = parser.parse_args(argv)
    if args.ray is None:
        run_dir = args.run_dir or (None if args.bind_host else make_run_dir())
        bind = f"{IPC_PREFIX}{run_dir}" if run_dir else args.bind_host or "127.0.0.1"
        return _serve(args, LocalLauncher(), bind)
    from runtime.cluster.ray_nodes import RayClusterError, connected, node_ip
    from runtime.serve.ray_launcher import RayLauncher

    try:
        with connected(args.ray):
            try:
                internal = None
                if args.keys is not None:
                    internal = internal_keys(args.name, reuse=args.gateway_restarts > 0)
                launcher = RayLauncher(Plan.load(args.plan), args.plan, internal)
            except (RuntimeFailure, PlanValidationError, OSError) as exc:
                print(f"error: {getattr(exc, 'title', 'cannot start')}: {exc}", file=sys.stderr)
                return 1
            replanner = None
            if args.replan_on_loss:
                replanner = Replanner(args.ray, state_dir() / "logs" / args.name)
            return _serve(args, launcher, args.bind_host or node_ip(), replanner, internal)
    except RayClusterError as exc:
        print(f"error: Ray cluster: {exc}", file=sys.stderr)
        return 1


def _serve(
    args: argparse.Namespace,
    launcher: Launcher,
    bind_host: str,
    replanner: Replanner | None = None,
    internal_keys_dir: Path | None = None,
) -> int:
    try:
        gateway = Gateway(
            args.plan,
            args.name,
            args.endpoint,
            launcher,
            keys_dir=args.keys,
            bind_host=bind_host,
            beat_interval_s=args.beat_interval,
            beat_timeout_s=args.beat_timeout,
            impl=args.impl,
            max_restarts=args.restarts,
            restart_window_s=args.restart_window,
            replanner=replanner,
            status_endpoint=args.status_endpoint,
            owner_pid=args.owner_pid,
            deployment_started=args.deployment_started,
            gateway_restarts=args.gateway_restarts,
            internal_keys_dir=internal_keys_dir,
            http_endpoint=args.http_endpoint,
        )
    except (RuntimeFailure, PlanValidationError, DeploymentError, OSError, ValueError) as exc:
        title = getattr(exc, "title", "cannot start")
        print(f"error: {title}: {exc}", file=sys.stderr)
        if bind_host.startswith(IPC_PREFIX) and args.run_dir is None:  # made for this start
            shutil.rmtree(bind_host.removeprefix(IPC_PREFIX), ignore_errors=True)
        return 1

    def stop(*_: object) -> None:
        gateway.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    code = gateway.run()
    if gateway.failure:
        print(f"error: {gateway.failure}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
