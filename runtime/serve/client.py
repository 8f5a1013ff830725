"""Python client of a pqctl deployment (the protocol in docs/protocol.md). Needs only pyzmq and
msgpack: it imports neither torch nor transformers.

    from runtime.serve.client import Client
    with Client() as client:                      # the local "default" deployment
        print(client.generate("ROMEO:", max_new_tokens=32).text)
        for piece in client.stream("JULIET:", max_new_tokens=32, temperature=0.8, seed=1):
            print(piece, end="", flush=True)
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from runtime.serve.deployment import DEFAULT_NAME, DeploymentState
from runtime.serve.keys import CurveKeys, secure_client
from runtime.serve.protocol import HARD_FRAME_BYTES, pack, unpack


class ServerError(RuntimeError):
    """An ``error`` reply: its code, message and the field at fault."""

    def __init__(self, code: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.field = code, message, field


class ConnectionLost(ConnectionError):
    """The connection to the gateway dropped while a request was in flight (the gateway
    restarted or went away): the request will not be answered; send it again."""


class NotAuthorized(ConnectionError):
    """The server refused this client's credentials (a key not in its authorized list, or
    keys where it has none / none where it has them)."""


_WATCHED = (
    zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


@dataclass(frozen=True, slots=True)
class Completion:
    """A finished request (the ``done`` reply)."""

    id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: dict[str, Any] = field(default_factory=dict)


class Client:
    """One DEALER connection; many requests may be in flight on it."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        name: str = DEFAULT_NAME,
        keys: Path | None = None,
        timeout_s: float = 120.0,
    ) -> None:
        """Connect to ``endpoint``, or to the running deployment ``name`` on this host.

        Args:
            keys: CURVE key directory (client keypair + server.key) when the server uses keys.
            timeout_s: longest wait for any reply before TimeoutError.
        """
        if endpoint is None:
            state = DeploymentState.load(name)
            endpoint = state.client_endpoint
            if keys is None and state.keys:
                keys = Path(state.keys)
        self.endpoint, self.timeout_s = endpoint, timeout_s
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_BYTES)  # a server's replies are small
        secure_client(self._sock, CurveKeys.load(keys, "client") if keys else None)
        # A dropped connection (the gateway restarted) fails the requests sent before it.
        self._events = self._sock.get_monitor_socket(_WATCHED)
        self._up = False  # a handshake succeeded and no drop since
        self._refused = ""  # why the server refused the last handshake
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._events, zmq.POLLIN)
        self._drops = 0  # connection drops seen so far
        self._sent: dict[str, int] = {}  # request id -> drops seen when it was sent
        self._sock.connect(endpoint)
        self._ids = (f"{os.getpid()}-{n}" for n in itertools.count())
        self._early: list[dict[str, Any]] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._sock.disable_monitor()
        self._events.close(linger=0)
        self._sock.close(linger=0)
        self._ctx.term()

    # ----------------------------------------------------------------- raw messages
    def send(self, message: dict[str, Any]) -> None:
        """Send one protocol message as is.

        Raises:
            NotAuthorized: the server refused this client's handshake, so the message has no
                connection to go out on (a DEALER would wait for one forever).
            TimeoutError: no connection took it within the client's timeout.
        """
        frame = pack(message)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
                return
            except zmq.Again:
                pass
            self._note_drops()
            if self._refused and not self._up:
                raise NotAuthorized(f"{self.endpoint}: {self._refused}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no connection to {self.endpoint} took a message in time")
            self._sock.poll(50, zmq.POLLOUT)

    def receive(self, timeout_s: float | None = None) -> dict[str, Any]:
        """The next reply, whichever request it belongs to.

        Raises:
            TimeoutError: nothing arrived in time.
        """
        if self._early:
            return self._early.pop(0)
        return self._recv(self.timeout_s if timeout_s is None else timeout_s)

    def _recv(self, wait: float, request_id: str | None = None) -> dict[str, Any]:
        """The next reply within ``wait`` seconds; raises ConnectionLost when the connection
        dropped after ``request_id`` was sent."""
        deadline = time.monotonic() + wait
        while True:
            self._check_connection(request_id)
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self._sock in ready:  # replies that arrived before a drop still count
                message = unpack(self._sock.recv())
                ends = message.get("type") == "done" or (
                    message.get("type") == "error" and message.get("code") != "duplicate_id"
                )  # duplicate_id names a running request it does not end
                if ends:
                    self._sent.pop(str(message.get("id")), None)
                return message
            if self._events in ready:
                self._note_drops()
                continue
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no reply from {self.endpoint} in {wait:.0f} s")

    def _note_drops(self) -> None:
        while self._events.poll(0):
            event = recv_monitor_message(self._events)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._up, self._refused = True, ""
            elif event == zmq.EVENT_DISCONNECTED and self._up:
                self._up, self._drops = False, self._drops + 1
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._refused = "the server refused this client's key (not in its authorized/)"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self._refused = (
                    "the server speaks another security mechanism (CURVE keys on one side only?)"
                )

    def _check_connection(self, request_id: str | None) -> None:
        if request_id is None:
            return
        if self._refused and not self._up:
            raise NotAuthorized(f"{self.endpoint}: {self._refused}")
        if self._sent.get(request_id, self._drops) >= self._drops:
            return
        self._sent.pop(request_id, None)
        raise ConnectionLost(
            f"request {request_id}: the connection to {self.endpoint} dropped before its reply "
            "(the gateway restarted or stopped); send it again"
        )

    def _until(self, request_id: str | None, kind: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        stash: list[dict[str, Any]] = []
        try:
            while True:
                if self._early:
                    message = self._early.pop(0)
                else:
                    wait = max(0.0, deadline - time.monotonic())
                    message = self._recv(wait, request_id)
                if message.get("id") == request_id and message["type"] in (kind, "error"):
                    return _checked(message)
                stash.append(message)
        finally:
            self._early.extend(stash)

    # ----------------------------------------------------------------- requests
    def info(self) -> dict[str, Any]:
        """The deployment's model, state and limits."""
        request_id = next(self._ids)
        self._send_request(request_id, {"type": "info", "id": request_id})
        try:
            return self._until(request_id, "info")
        finally:
            self._sent.pop(request_id, None)

    def submit(
        self, prompt: str, *, max_new_tokens: int, stream: bool = False, **options: Any
    ) -> str:
        """Send a ``generate`` request (options: temperature, top_k, top_p, seed, stop,
        ignore_eos, id); returns its id without waiting."""
        request_id = str(options.pop("id", None) or next(self._ids))
        message: dict[str, Any] = {"type": "generate", "id": request_id, "prompt": prompt}
        message |= {"max_new_tokens": max_new_tokens, "stream": stream}
        if "stop" in options:
            options["stop"] = list(options["stop"])
        self._send_request(request_id, message | options)
        return request_id

    def _send_request(self, request_id: str, message: dict[str, Any]) -> None:
        """Send a message that expects replies, noting the connection it went out on (a drop
        seen after this fails it with ConnectionLost)."""
        self._note_drops()
        self.send(message)
        self._sent[request_id] = self._drops

    def cancel(self, request_id: str) -> None:
        """Ask the server to end a request; its ``done`` reply says ``cancelled``."""
        self.send({"type": "cancel", "id": request_id})

    def generate(self, prompt: str, *, max_new_tokens: int, **options: Any) -> Completion:
        """Generate and wait for the whole completion."""
        request_id = self.submit(prompt, max_new_tokens=max_new_tokens, **options)
        return _completion(self._until(request_id, "done"))

    def generate_many(
        self, prompts: Sequence[str], *, max_new_tokens: int, **options: Any
    ) -> list[Completion]:
        """Send every prompt at once (the server batches them); completions in prompt order."""
        ids = [self.submit(p, max_new_tokens=max_new_tokens, **options) for p in prompts]
        return [self.wait(i) for i in ids]

    def wait(self, request_id: str) -> Completion:
        """The completion of a request sent with :meth:`submit` (its token messages, if it
        streams, are skipped).

        Raises:
            ServerError: the server rejected or failed the request.
            TimeoutError: no reply for ``timeout_s``.
        """
        return _completion(self._until(request_id, "done"))

    def stream(self, prompt: str, *, max_new_tokens: int, **options: Any) -> Iterator[str]:
        """Generate, yielding text as it arrives; the iterator's return value (``StopIteration
        .value``) is the :class:`Completion`."""
        request_id = self.submit(prompt, max_new_tokens=max_new_tokens, stream=True, **options)
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = self._next_for(request_id, deadline)
            if message["type"] == "token":
                deadline = time.monotonic() + self.timeout_s
                yield str(message["text"])
            elif message["type"] == "done":
                return _completion(message)  # type: ignore[return-value]

    def _next_for(self, request_id: str, deadline: float) -> dict[str, Any]:
        for i, message in enumerate(self._early):
            if message.get("id") == request_id:
                return _checked(self._early.pop(i))
        while True:
            message = self._recv(max(0.0, deadline - time.monotonic()), request_id)
            if message.get("id") == request_id:
                return _checked(message)
            self._early.append(message)


def _checked(message: dict[str, Any]) -> dict[str, Any]:
    if message.get("type") == "error":
        raise ServerError(
            str(message.get("code")), str(message.get("message")), message.get("field")
        )
    return message


def _completion(message: dict[str, Any]) -> Completion:
    return Completion(
        str(message["id"]),
        str(message["text"]),
        list(message["token_ids"]),
        str(message["finish_reason"]),
        dict(message.get("usage", {})),
    )
