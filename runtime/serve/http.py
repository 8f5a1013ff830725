"""The OpenAI-compatible HTTP endpoint of a deployment, beside its ZeroMQ client endpoint.

``pqctl apply --http HOST:PORT`` has the deployment's supervisor run
``python -m runtime.serve.http --name NAME --listen HOST:PORT``: a FastAPI application on uvicorn
that turns each HTTP request into a request of the client protocol (docs/protocol.md) to the
same gateway and scheduler every other client uses. Routes (docs/http.md):

- ``GET /v1/models``; ``POST /v1/completions``; ``POST /v1/chat/completions`` (the tokenizer's
  chat template when the checkpoint has one, else :func:`plain_chat_prompt`), each with
  ``stream: true`` answered as server-sent events the way OpenAI's API streams them;
- ``GET /health`` (200 while the deployment serves, 503 otherwise; never needs the key);
- ``GET /metrics``: Prometheus text (:mod:`runtime.serve.http_metrics`).

Errors are OpenAI's error JSON with the status its API uses: 400 naming the field, 401 without the
API key (``PQCTL_API_KEY`` in the environment: every route but /health then needs
``Authorization: Bearer KEY``), 404 for another model, 429 when the client's queue is full, 503
while the deployment is not serving (loading, a stage restarting, a re-plan, the gateway
restarting). Each client address gets its own connection to the gateway, so the gateway's
round-robin admission is fair between HTTP clients too. A client that disconnects in the middle
of a stream has its request cancelled in the scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.serve.deployment import DeploymentError, DeploymentState, pid_alive
from runtime.serve.http_metrics import exposition, registry_for
from runtime.serve.keys import CurveKeys, secure_client
from runtime.serve.launcher import API_KEY_ENV
from runtime.serve.monitor import Monitor
from runtime.serve.protocol import (
    BAD_FIELD,
    BAD_MESSAGE,
    FRAME_TOO_LARGE,
    HARD_FRAME_BYTES,
    INTERNAL,
    MISSING_FIELD,
    OVERLOADED,
    PROMPT_TOO_LONG,
    REPLANNING,
    SHUTTING_DOWN,
    STAGE_FAILED,
    UNKNOWN_FIELD,
)

MAX_CONNECTIONS = 256
"""Gateway connections kept open, one per client address (the least recently used closes)."""
COMPLETION_DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for /v1/completions (chat's default is the plan's limit)."""
STATE_WAIT_S = 120.0
"""How long the endpoint waits at start for the deployment's gateway to write its state."""

CONNECTION_LOST = "connection_lost"
"""The code of a request's error when the gateway's connection dropped (it restarted)."""
UNAVAILABLE = "service_unavailable"
# What the gateway's error codes become (HTTP status, OpenAI error type).
_STATUS = {
    **dict.fromkeys(
        (BAD_FIELD, MISSING_FIELD, UNKNOWN_FIELD, PROMPT_TOO_LONG, BAD_MESSAGE),
        (400, "invalid_request_error"),
    ),
    FRAME_TOO_LARGE: (413, "invalid_request_error"),
    OVERLOADED: (429, "rate_limit_error"),
    **dict.fromkeys((STAGE_FAILED, REPLANNING, SHUTTING_DOWN, CONNECTION_LOST), (503, UNAVAILABLE)),
    INTERNAL: (500, "server_error"),
}
# Gateway field names as the HTTP API names them (the others are the same).
_FIELD = {"max_new_tokens": "max_tokens"}
_FINISH = {"length": "length", "stop": "stop", "eos": "stop", "cancelled": "stop"}


class APIError(Exception):
    """An error answered as OpenAI's error JSON with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status,
            message,
            param,
            code,
            kind,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    @classmethod
    def from_reply(cls, reply: dict[str, Any], chat: bool = False) -> APIError:
        """The gateway's ``error`` reply as the HTTP error it is."""
        code = str(reply.get("code"))
        status, kind = _STATUS.get(code, (500, "server_error"))
        field = reply.get("field")
        param = _FIELD.get(field, field) if isinstance(field, str) else None
        if chat and param == "prompt":
            param = "messages"
        message = str(reply.get("message", code))
        if code == PROMPT_TOO_LONG and chat:
            message = f"the messages make a prompt too long: {message}"
        elif param and param != field and isinstance(field, str):
            message = message.replace(field, param)
        return cls(status, message, param, code, kind)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param, "invalid_value")


def _unavailable(message: str) -> APIError:
    """503: the deployment cannot take requests now (loading, restarting); retry."""
    return APIError(503, message, None, "unavailable", UNAVAILABLE)


# ----------------------------------------------------------------- the gateway connections
class GatewayConnection:
    """One DEALER connection to the gateway carrying many requests; replies go to the queue of
    the request they name. A dropped connection (the gateway restarted) ends every request in
    flight with ``connection_lost``."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, keys: CurveKeys | None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, HARD_FRAME_BYTES)
        secure_client(self.sock, keys)
        self.events = self.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.sock.connect(endpoint)
        self.queues: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self.tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._watch()),
        ]

    async def _read(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                message = msgpack.unpackb(frame, raw=False)
                queue = self.queues.get(message["id"])
            except Exception:
                continue
            if queue is not None:
                queue.put_nowait(message)

    async def _watch(self) -> None:
        while True:
            await self.events.recv_multipart()
            for request_id, queue in self.queues.items():
                queue.put_nowait(
                    {
                        "type": "error",
                        "id": request_id,
                        "code": CONNECTION_LOST,
                        "message": "the deployment's gateway restarted; send the request again",
                    }
                )

    def open(self, request_id: str) -> asyncio.Queue[dict[str, Any]]:
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.queues[request_id] = queue
        return queue

    def close_request(self, request_id: str) -> None:
        self.queues.pop(request_id, None)

    def send(self, message: dict[str, Any]) -> None:
        """Queue ``message`` for the gateway without waiting (also from a ``finally``).

        Raises:
            APIError: 503, no connection to the gateway now (it is restarting).
        """
        try:
            self.sock.send(msgpack.packb(message, use_bin_type=True), zmq.NOBLOCK)
        except zmq.Again:
            raise _unavailable(
                "the deployment's gateway is not reachable now; retry shortly"
            ) from None

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.events.close(linger=0)
        self.sock.close(linger=0)


class Backend:
    """The deployment seen from the HTTP side: its connections, its status and its template."""

    def __init__(self, state: DeploymentState, chat: ChatTemplate) -> None:
        self.state, self.chat = state, chat
        self.ctx = zmq.asyncio.Context()
        self.keys = CurveKeys.load(Path(state.keys), "client") if state.keys else None
        self.connections: OrderedDict[str, GatewayConnection] = OrderedDict()
        self.ids = itertools.count()
        self.monitor = Monitor.of(state)
        self.watching = True
        self.watcher = threading.Thread(target=self._watch_status, daemon=True)
        self.watcher.start()

    def _watch_status(self) -> None:
        while self.watching:
            self.monitor.poll(0.5)

    @property
    def status(self) -> dict[str, Any]:
        return self.monitor.status or {}

    @property
    def phase(self) -> str:
        """The deployment's phase as its gateway last published it ("unknown" before any, or
        when it has been silent for 3 s: the gateway is restarting)."""
        status = self.monitor.status
        if status is None or time.monotonic() - self.monitor.updated > 3.0:
            return "unknown"
        return str(status.get("phase"))

    def connection(self, client: str) -> GatewayConnection:
        found = self.connections.get(client)
        if found is not None:
            self.connections.move_to_end(client)
            return found
        if len(self.connections) >= MAX_CONNECTIONS:
            _, oldest = self.connections.popitem(last=False)
            oldest.close()
        made = GatewayConnection(self.ctx, self.state.client_endpoint, self.keys)
        self.connections[client] = made
        return made

    def request_id(self) -> str:
        return f"http-{os.getpid()}-{next(self.ids)}"

    def close(self) -> None:
        self.watching = False
        for connection in self.connections.values():
            connection.close()
        self.watcher.join(timeout=2)
        self.monitor.close()
        self.ctx.term()


# ----------------------------------------------------------------- chat prompts
def plain_chat_prompt(messages: list[dict[str, str]]) -> str:
    """The prompt of a chat for a checkpoint without a chat template: each message as
    ``Role: content`` on lines of its own, a blank line between messages, then ``Assistant:``
    for the model to go on from (docs/http.md)."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*parts, "Assistant:"])


class ChatTemplate:
    """A checkpoint's chat template (transformers' ``apply_chat_template``), or the plain one."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer if getattr(tokenizer, "chat_template", None) else None

    @property
    def name(self) -> str:
        return "checkpoint" if self.tokenizer is not None else "plain"

    def prompt(self, messages: list[dict[str, str]]) -> str:
        if self.tokenizer is None:
            return plain_chat_prompt(messages)
        text: str = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        # The gateway encodes prompts as tokenizer(text) does, which adds BOS itself where
        # the tokenizer does: a template's own BOS would then appear twice.
        bos = self.tokenizer.bos_token
        adds_bos = (
            bos is not None and self.tokenizer.bos_token_id in self.tokenizer("")["input_ids"]
        )
        if adds_bos and text.startswith(bos):
            text = text[len(bos) :]
        return text


def load_chat_template(state: DeploymentState) -> ChatTemplate:
    """The template of the deployment's checkpoint (its tokenizer; none if it cannot load)."""
    from planner.plan import Plan
    from runtime.model.source import checked_checkpoint
    from runtime.model.tokenizer import load_tokenizer

    try:
        checkpoint, _ = checked_checkpoint(Plan.load(state.plan))
        return ChatTemplate(load_tokenizer(checkpoint)[0].backend)
    except Exception as exc:  # the gateway serves it: its tokenizer loads; say why if not
        print(f"http: no chat template ({exc}); using the plain one", file=sys.stderr)
        return ChatTemplate(None)


# ----------------------------------------------------------------- request bodies
_NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": None,
    "logprobs": None,
    "top_logprobs": None,
    "echo": False,
    "best_of": 1,
    "suffix": None,
    "user": Ellipsis,  # any value: a label of the caller's
    "service_tier": Ellipsis,
    "store": Ellipsis,
    "metadata": Ellipsis,
    "parallel_tool_calls": Ellipsis,
}
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop"}
_COMMON |= {"seed", "n", "stream", "stream_options"}


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(name, f"must be a number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def generate_message(body: dict[str, Any], extra: set[str], default_max: int) -> dict[str, Any]:
    """The client-protocol ``generate`` fields of an OpenAI request body (prompt aside).

    Raises:
        APIError: 400 naming the first field that is wrong or not supported.
    """
    for name, value in body.items():
        if name in _COMMON or name in extra:
            continue
        if name in _NEUTRAL:
            neutral = _NEUTRAL[name]
            if neutral is Ellipsis or value == neutral or value is None:
                continue
            raise _bad(name, f"not supported by pqctl (only {neutral!r})")
        raise _bad(name, "unknown or unsupported field")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise _bad("n", f"only 1 completion per request is supported, got {n!r}")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is None:
        max_tokens = default_max
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad("max_tokens", f"must be a positive integer, got {max_tokens!r}")
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad("stop", "must be a string or a list of strings")
    if any(not s for s in stops):
        raise _bad("stop", "stop strings must not be empty")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise _bad("seed", f"must be a non-negative integer, got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise _bad("top_p", "must be above 0")
    message: dict[str, Any] = {
        "type": "generate",
        "max_new_tokens": max_tokens,
        "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": top_p,
        "stop": stops,
        "seed": seed,
        "stream": stream,
    }
    return message


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """The ``messages`` of a chat request, each with a role and text content.

    Raises:
        APIError: 400 naming ``messages`` (and which one) when one is not.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
        ):
            raise _bad("messages", f"messages[{i}] needs a role of system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(texts) != len(content) or not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(t, str)
                for p, t in zip(content, texts, strict=True)
            ):
                raise _bad("messages", f"messages[{i}].content: only text parts are supported")
            content = "".join(t for t in texts if t is not None)
        if not isinstance(content, str):
            raise _bad("messages", f"messages[{i}].content must be a string")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


def completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("prompt", "must be a non-empty string (one prompt per request)")
    return prompt


# ----------------------------------------------------------------- the application
def create_app(backend: Backend, api_key: str | None) -> FastAPI:
    """The FastAPI application serving ``backend``."""
    app = FastAPI(title="pqctl", docs_url=None, redoc_url=None, openapi_url=None)
    model_id = backend.state.model
    registry = registry_for(backend)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(APIError(400, str(exc)).body(), status_code=400)

    @app.middleware("http")
    async def authorize(request: Request, call_next: Any) -> Any:
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), api_key.encode()
            ):
                error = APIError(
                    401,
                    "missing or wrong API key: send Authorization: Bearer <key> (pqctl apply "
                    "--api-key)",
                    None,
                    "invalid_api_key",
                )
                return JSONResponse(error.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        phase = backend.phase
        return JSONResponse({"status": phase}, status_code=200 if phase == "serving" else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text, content_type = exposition(registry)
        return PlainTextResponse(text, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": model_id,
                    "object": "model",
                    "created": int(backend.state.started),
                    "owned_by": "pqctl",
                }
            ],
        }

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("model", "required: the model's id (GET /v1/models lists it)")
        if model != model_id:
            raise APIError(
                404,
                f"the model `{model}` does not exist; this deployment serves `{model_id}`",
                "model",
                "model_not_found",
            )
        return body

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        message = generate_message(body, {"prompt"}, COMPLETION_DEFAULT_MAX_TOKENS)
        message["prompt"] = completion_prompt(body)
        return await run(request, body, message, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        given = body.get("max_tokens", body.get("max_completion_tokens")) is not None
        default = 1 if given else await plan_max_new_tokens(request)  # chat: up to the plan's
        message = generate_message(body, {"messages"}, default)
        message["prompt"] = backend.chat.prompt(chat_messages(body))
        return await run(request, body, message, chat=True)

    async def plan_max_new_tokens(request: Request) -> int:
        info = await ask_info(request)
        return int(info["limits"]["max_new_tokens"])

    async def ask_info(request: Request) -> dict[str, Any]:
        connection = backend.connection(_client(request))
        request_id = backend.request_id()
        queue = connection.open(request_id)
        try:
            connection.send({"type": "info", "id": request_id})
            reply = await asyncio.wait_for(queue.get(), 10.0)
        except TimeoutError:
            raise _unavailable("the deployment does not answer") from None
        finally:
            connection.close_request(request_id)
        if reply.get("type") != "info":
            raise APIError.from_reply(reply)
        return reply

    async def run(
        request: Request, body: dict[str, Any], message: dict[str, Any], chat: bool
    ) -> Any:
        phase = backend.phase
        if phase != "serving":
            raise _unavailable(f"the deployment is not serving now ({phase}); retry shortly")
        connection = backend.connection(_client(request))
        request_id = backend.request_id()
        message["id"] = request_id
        queue = connection.open(request_id)
        try:
            connection.send(message)
        except APIError:
            connection.close_request(request_id)
            raise
        kind = "chat.completion" if chat else "text_completion"
        reply_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        try:
            first = await queue.get()
        except asyncio.CancelledError:
            _cancel(connection, request_id)
            raise
        if first["type"] == "error":
            connection.close_request(request_id)
            raise APIError.from_reply(first, chat)
        if not message["stream"]:  # the gateway sends the whole text in its done reply
            connection.close_request(request_id)
            return _whole(kind, reply_id, created, model_id, first, chat)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _stream(
            connection,
            request_id,
            queue,
            first,
            reply_id,
            created,
            model_id,
            chat,
            include_usage,
        )
        return StreamingResponse(chunks, media_type="text/event-stream")

    return app


def _client(request: Any) -> str:
    """Whose connection a request goes on: its client's address."""
    return request.client.host if request.client is not None else "-"


def _cancel(connection: GatewayConnection, request_id: str) -> None:
    with contextlib.suppress(zmq.ZMQError, APIError):
        connection.send({"type": "cancel", "id": request_id})
    connection.close_request(request_id)


def _usage(done: dict[str, Any]) -> dict[str, int]:
    usage = done["usage"]
    prompt, completion = int(usage["prompt_tokens"]), int(usage["completion_tokens"])
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _whole(
    kind: str, reply_id: str, created: int, model: str, done: dict[str, Any], chat: bool
) -> dict[str, Any]:
    finish = _FINISH.get(done["finish_reason"], "stop")
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": done["text"]}
    else:
        choice["text"] = done["text"]
    return {
        "id": reply_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(done),
    }


async def _stream(
    connection: GatewayConnection,
    request_id: str,
    queue: asyncio.Queue[dict[str, Any]],
    first: dict[str, Any],
    reply_id: str,
    created: int,
    model: str,
    chat: bool,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a chunk per text delta (chat's first carries
    the role), a last chunk with the finish reason, a usage chunk when asked, ``[DONE]``."""
    header: dict[str, Any] = {
        "id": reply_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
    }

    def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            content: dict[str, Any] = {}
            if role:
                content["role"] = "assistant"
            if delta is not None:
                content["content"] = delta
            choice["delta"] = content
        else:
            choice["text"] = delta or ""
        event: dict[str, Any] = {**header, "choices": [choice]}
        if include_usage:
            event["usage"] = None
        return f"data: {json.dumps(event)}\n\n"

    finished = False
    try:
        if chat:
            yield chunk("", None, role=True)
        message = first
        while True:
            if message["type"] == "token":
                if message["text"]:
                    yield chunk(message["text"], None)
            elif message["type"] == "done":
                finished = True
                yield chunk(None if chat else "", _FINISH.get(message["finish_reason"], "stop"))
                if include_usage:
                    usage = {**header, "choices": [], "usage": _usage(message)}
                    yield f"data: {json.dumps(usage)}\n\n"
                break
            else:  # an error after the stream began: OpenAI's error object as an event
                finished = True
                yield f"data: {json.dumps(APIError.from_reply(message, chat).body())}\n\n"
                break
            message = await queue.get()
        yield "data: [DONE]\n\n"
    finally:
        if finished:
            connection.close_request(request_id)
        else:  # the client went away mid-stream: the scheduler stops the request
            _cancel(connection, request_id)


# ----------------------------------------------------------------- the process
def wait_for_state(name: str, owner_pid: int | None, timeout_s: float) -> DeploymentState:
    """The deployment's state once its gateway (of supervisor ``owner_pid``) has written it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            state = DeploymentState.load(name)
            if owner_pid is None or state.pid == owner_pid:
                return state
        except DeploymentError:
            pass
        if time.monotonic() > deadline:
            raise DeploymentError(f'deployment "{name}" wrote no state within {timeout_s:.0f} s')
        if owner_pid is not None and not pid_alive(owner_pid):
            raise DeploymentError(f"the deployment's supervisor (pid {owner_pid}) is gone")
        time.sleep(0.2)


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:8000``) as host and port.

    Raises:
        ValueError: not that form, or the port is not 0-65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'"{text}" is not HOST:PORT (e.g. 127.0.0.1:8000)')
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serve.http", description=__doc__)
    parser.add_argument("--name", required=True, help="the deployment's name")
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve HTTP on")
    parser.add_argument("--owner-pid", type=int, default=None, help="the supervisor's pid")
    args = parser.parse_args(argv)
    try:
        host, port = split_listen(args.listen)
    except ValueError as exc:
        parser.error(f"--listen: {exc}")
    import socket

    import uvicorn

    # Bind at once (a port in use fails now, not after the model loads); serve once the
    # gateway's state names its endpoints.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"error: cannot listen on {args.listen}: {exc}", file=sys.stderr)
        return 1
    sock.listen(2048)
    try:
        state = wait_for_state(args.name, args.owner_pid, STATE_WAIT_S)
    except DeploymentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    backend = Backend(state, load_chat_template(state))
    app = create_app(backend, os.environ.get(API_KEY_ENV) or None)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)

    def watch_owner() -> None:  # the supervisor gone (kill -9): stop serving too
        while not server.should_exit:
            if args.owner_pid is not None and not pid_alive(args.owner_pid):
                server.should_exit = True
            time.sleep(1.0)

    threading.Thread(target=watch_owner, daemon=True).start()
    print(f"http: serving {state.model} on http://{args.listen}/v1", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
