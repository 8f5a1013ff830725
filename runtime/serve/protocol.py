"""The client protocol: typed msgpack messages over a ZeroMQ ROUTER (server) / DEALER (client).

``docs/protocol.md`` is the normative description; this module implements it for both sides.
It imports neither torch nor transformers, so a client needs only pyzmq and msgpack.

Every message is one ZeroMQ frame holding one msgpack map with string keys and a ``type``.
Client → server: ``generate``, ``cancel``, ``info``. Server → client: ``token`` (streamed
text), ``done`` (the end of a request), ``error``, ``info``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

PROTOCOL_VERSION: Final = 1
MAX_FRAME_BYTES: Final = 1 << 20  # larger frames get a frame_too_large error
HARD_FRAME_BYTES: Final = 64 << 20  # larger frames drop the connection (ZMQ_MAXMSGSIZE)
MAX_ID_CHARS: Final = 128
MAX_STOP_STRINGS: Final = 16
MAX_STOP_CHARS: Final = 256
MAX_SEED: Final = (1 << 63) - 1
MAX_QUEUED: Final = 4096  # waiting requests of a deployment, all clients together
MAX_QUEUED_PER_CLIENT: Final = 1024  # waiting requests of one client connection

# Error codes: the complete list, documented in docs/protocol.md.
BAD_MESSAGE: Final = "bad_message"  # not one frame of a msgpack map with a string "type"
FRAME_TOO_LARGE: Final = "frame_too_large"
UNKNOWN_TYPE: Final = "unknown_type"
UNKNOWN_FIELD: Final = "unknown_field"
MISSING_FIELD: Final = "missing_field"
BAD_FIELD: Final = "bad_field"  # wrong type or out of range
PROMPT_TOO_LONG: Final = "prompt_too_long"
DUPLICATE_ID: Final = "duplicate_id"
UNKNOWN_ID: Final = "unknown_id"
OVERLOADED: Final = "overloaded"
STAGE_FAILED: Final = "stage_failed"
SHUTTING_DOWN: Final = "shutting_down"
REPLANNING: Final = "replanning"  # a host was lost; the deployment is being re-planned
INTERNAL: Final = "internal"
ERROR_CODES: Final = (
    BAD_MESSAGE,
    FRAME_TOO_LARGE,
    UNKNOWN_TYPE,
    UNKNOWN_FIELD,
    MISSING_FIELD,
    BAD_FIELD,
    PROMPT_TOO_LONG,
    DUPLICATE_ID,
    UNKNOWN_ID,
    OVERLOADED,
    STAGE_FAILED,
    SHUTTING_DOWN,
    REPLANNING,
    INTERNAL,
)

FINISH_REASONS: Final = ("length", "stop", "eos", "cancelled")


class ProtocolError(ValueError):
    """A message the server rejects: the error code, a message, the field at fault and the
    request id when one could be read."""

    def __init__(
        self, code: str, message: str, field: str | None = None, request_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.field, self.request_id = code, message, field, request_id

    def reply(self) -> dict[str, Any]:
        """The ``error`` message for this problem."""
        return error_reply(self.request_id, self.code, self.message, self.field)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a deployment accepts, from its plan: prompt tokens and new tokens per request."""

    max_prompt_tokens: int
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A validated ``generate`` message (see docs/protocol.md for every field)."""

    id: str
    prompt: str
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = True
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class CancelRequest:
    """A validated ``cancel`` message."""

    id: str


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """A validated ``info`` message."""

    id: str | None = None


ClientMessage = GenerateRequest | CancelRequest | InfoRequest


def pack(message: Mapping[str, Any]) -> bytes:
    """One message as the bytes of its frame."""
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(frame: bytes) -> dict[str, Any]:
    """A frame's message: a msgpack map with a string ``type``, or ProtocolError."""
    try:
        message = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(BAD_MESSAGE, f"frame is not valid msgpack ({exc})") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_MESSAGE, "a message must be a msgpack map")
    if not all(isinstance(k, str) for k in message):
        raise ProtocolError(BAD_MESSAGE, "message keys must be strings")
    if not isinstance(message.get("type"), str):
        raise ProtocolError(BAD_MESSAGE, 'a message needs a string "type"', "type")
    return message


_GENERATE_FIELDS: Final = {
    "type",
    "id",
    "prompt",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "stream",
    "ignore_eos",
}


def parse_client_message(frames: list[bytes], limits: Limits) -> ClientMessage:
    """Validate the frames a client sent (identity already removed) into a typed request.

    Raises:
        ProtocolError: naming the code, the bad field and, where readable, the request id.
    """
    if len(frames) != 1:
        raise ProtocolError(BAD_MESSAGE, f"a message is exactly one frame, got {len(frames)}")
    if len(frames[0]) > MAX_FRAME_BYTES:
        raise ProtocolError(
            FRAME_TOO_LARGE, f"frame of {len(frames[0])} bytes exceeds {MAX_FRAME_BYTES}"
        )
    message = unpack(frames[0])
    raw_id = message.get("id")
    request_id = raw_id if isinstance(raw_id, str) else None
    kind = message["type"]
    try:
        if kind == "generate":
            return _parse_generate(message, limits)
        if kind == "cancel":
            _only(message, {"type", "id"})
            return CancelRequest(_id(message))
        if kind == "info":
            _only(message, {"type", "id"})
            return InfoRequest(_id(message) if "id" in message else None)
    except ProtocolError as exc:
        exc.request_id = request_id
        raise
    raise ProtocolError(
        UNKNOWN_TYPE,
        f'unknown message type "{kind}"; expected generate, cancel or info',
        "type",
        request_id,
    )


def _parse_generate(m: dict[str, Any], limits: Limits) -> GenerateRequest:
    _only(m, _GENERATE_FIELDS)
    request_id = _id(m)
    prompt = _require(m, "prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt", "must be a string")
    if not prompt:
        raise _bad("prompt", "must not be empty")
    max_new = _require(m, "max_new_tokens")
    if not _is_int(max_new) or not 1 <= max_new <= limits.max_new_tokens:
        raise _bad(
            "max_new_tokens",
            f"must be an integer from 1 to {limits.max_new_tokens} (the plan's limit), "
            f"got {max_new!r}",
        )
    temperature = _number(m, "temperature", 0.0, "from 0 (greedy) to 100")
    if not 0.0 <= temperature <= 100.0:
        raise _bad("temperature", f"must be from 0 (greedy) to 100, got {temperature!r}")
    top_k = m.get("top_k", 0)
    if not _is_int(top_k) or top_k < 0:
        raise _bad("top_k", f"must be an integer ≥ 0 (0 = off), got {top_k!r}")
    top_p = _number(m, "top_p", 1.0, "in (0, 1] (1 = off)")
    if not 0.0 < top_p <= 1.0:
        raise _bad("top_p", f"must be in (0, 1] (1 = off), got {top_p!r}")
    seed = m.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED):
        raise _bad("seed", f"must be nil or an integer from 0 to 2^63-1, got {seed!r}")
    stop = m.get("stop", [])
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise _bad(
            "stop",
            f"must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
        )
    stream, ignore_eos = _flag(m, "stream", True), _flag(m, "ignore_eos", False)
    return GenerateRequest(
        request_id,
        prompt,
        max_new,
        temperature,
        top_k,
        top_p,
        seed,
        tuple(stop),
        stream,
        ignore_eos,
    )


def _only(m: Mapping[str, Any], allowed: set[str]) -> None:
    for key in m:
        if key not in allowed:
            raise ProtocolError(
                UNKNOWN_FIELD,
                f'unknown field "{key}" in a {m["type"]} message; '
                f"allowed: {', '.join(sorted(allowed))}",
                key,
            )


def _require(m: Mapping[str, Any], name: str) -> Any:
    if name not in m:
        raise ProtocolError(MISSING_FIELD, f'a {m["type"]} message needs "{name}"', name)
    return m[name]


def _id(m: Mapping[str, Any]) -> str:
    value = _require(m, "id")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise _bad("id", f"must be a non-empty string of at most {MAX_ID_CHARS} characters")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(m: Mapping[str, Any], name: str, default: float, allowed: str) -> float:
    value = m.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, f"must be a number {allowed}, got {value!r}")
    return float(value)


def _flag(m: Mapping[str, Any], name: str, default: bool) -> bool:
    value = m.get(name, default)
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}")
    return value


def _bad(name: str, what: str) -> ProtocolError:
    return ProtocolError(BAD_FIELD, f"{name} {what}", name)


# Server → client messages.


def error_reply(
    request_id: str | None, code: str, message: str, field: str | None = None
) -> dict[str, Any]:
    """An ``error`` message; ``id`` is nil when the request's id could not be read."""
    reply: dict[str, Any] = {"type": "error", "id": request_id, "code": code, "message": message}
    if field is not None:
        reply["field"] = field
    return reply


def token_reply(request_id: str, index: int, text: str, token_ids: list[int]) -> dict[str, Any]:
    """A streamed ``token`` message: new text and the ids generated since the last one."""
    return {"type": "token", "id": request_id, "index": index, "text": text, "token_ids": token_ids}


@dataclass(slots=True)
class Usage:
    """Token counts and timings of a finished request (seconds since the server received it)."""

    prompt_tokens: int
    completion_tokens: int
    queued_s: float
    first_token_s: float
    total_s: float
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)


def done_reply(
    request_id: str, finish_reason: str, text: str, token_ids: list[int], usage: Usage
) -> dict[str, Any]:
    """The ``done`` message that ends a request."""
    return {
        "type": "done",
        "id": request_id,
        "finish_reason": finish_reason,
        "text": text,
        "token_ids": token_ids,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "queued_s": round(usage.queued_s, 6),
            "first_token_s": round(usage.first_token_s, 6),
            "total_s": round(usage.total_s, 6),
            "seed": usage.seed,
            **usage.extra,
        },
    }
