"""The client protocol's validation (runtime/serve/protocol.py against docs/protocol.md): every
error code the parser produces, the field it names, the request id it carries, and the
messages' wording (the value and the allowed range)."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from runtime.serve.protocol import (
    BAD_FIELD,
    BAD_MESSAGE,
    ERROR_CODES,
    FRAME_TOO_LARGE,
    MAX_FRAME_BYTES,
    MAX_ID_CHARS,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MISSING_FIELD,
    UNKNOWN_FIELD,
    UNKNOWN_TYPE,
    CancelRequest,
    GenerateRequest,
    InfoRequest,
    Limits,
    ProtocolError,
    Usage,
    done_reply,
    error_reply,
    pack,
    parse_client_message,
    token_reply,
    unpack,
)

LIMITS = Limits(max_prompt_tokens=32, max_new_tokens=64)


def generate(**fields: Any) -> dict[str, Any]:
    """A valid generate message with ``fields`` replaced (a value of ... removes the field)."""
    message = {"type": "generate", "id": "r1", "prompt": "ROMEO:", "max_new_tokens": 8}
    message.update(fields)
    return {k: v for k, v in message.items() if v is not ...}


def rejected(message: Any, frames: list[bytes] | None = None) -> ProtocolError:
    frames = frames if frames is not None else [pack(message)]
    with pytest.raises(ProtocolError) as info:
        parse_client_message(frames, LIMITS)
    assert info.value.code in ERROR_CODES
    assert str(info.value) == info.value.message
    return info.value


# ----------------------------------------------------------------- valid messages


def test_minimal_generate_gets_the_documented_defaults() -> None:
    request = parse_client_message([pack(generate())], LIMITS)
    assert request == GenerateRequest("r1", "ROMEO:", 8)
    assert isinstance(request, GenerateRequest)
    assert (request.temperature, request.top_k, request.top_p, request.seed) == (0.0, 0, 1.0, None)
    assert (request.stop, request.stream, request.ignore_eos) == ((), True, False)


def test_generate_with_every_option() -> None:
    message = generate(
        temperature=1,
        top_k=40,
        top_p=0.5,
        seed=MAX_SEED,
        stop=["\n\n", "x" * MAX_STOP_CHARS] + ["s"] * (MAX_STOP_STRINGS - 2),
        stream=False,
        ignore_eos=True,
        max_new_tokens=LIMITS.max_new_tokens,
        id="i" * MAX_ID_CHARS,
    )
    request = parse_client_message([pack(message)], LIMITS)
    assert isinstance(request, GenerateRequest)
    assert request.temperature == 1.0 and isinstance(request.temperature, float)
    assert (request.top_k, request.top_p, request.seed) == (40, 0.5, MAX_SEED)
    assert request.stop == ("\n\n", "x" * MAX_STOP_CHARS, *["s"] * (MAX_STOP_STRINGS - 2))
    assert (request.stream, request.ignore_eos, request.max_new_tokens) == (False, True, 64)
    assert request.id == "i" * MAX_ID_CHARS


def test_cancel_and_info() -> None:
    assert parse_client_message([pack({"type": "cancel", "id": "a"})], LIMITS) == CancelRequest("a")
    assert parse_client_message([pack({"type": "info"})], LIMITS) == InfoRequest(None)
    assert parse_client_message([pack({"type": "info", "id": "p"})], LIMITS) == InfoRequest("p")


def test_frame_of_exactly_the_limit_is_read() -> None:
    message = generate(prompt="")
    padding = MAX_FRAME_BYTES - len(pack(message)) - 4  # str 32 header grows by 4 bytes
    frame = pack(generate(prompt="p" * padding))
    assert len(frame) == MAX_FRAME_BYTES
    request = parse_client_message([frame], LIMITS)
    assert isinstance(request, GenerateRequest) and len(request.prompt) == padding


# ----------------------------------------------------------------- unreadable messages


@pytest.mark.parametrize(
    ("frames", "text"),
    [
        ([b"\xc1"], "frame is not valid msgpack"),  # 0xc1 is never used by msgpack
        ([b"\x92\x01"], "frame is not valid msgpack"),  # truncated array
        ([b"\x01\x02"], "frame is not valid msgpack"),  # extra data after a message
        ([b""], "frame is not valid msgpack"),
        ([msgpack.packb({1: "generate"})], "frame is not valid msgpack"),  # int key
        ([pack([1, 2])], "a message must be a msgpack map"),
        ([pack("generate")], "a message must be a msgpack map"),
        ([msgpack.packb({b"type": "info"}, use_bin_type=True)], "message keys must be strings"),
        ([pack({"id": "a"})], 'a message needs a string "type"'),
        ([pack({"type": 1, "id": "a"})], 'a message needs a string "type"'),
        ([pack({"type": None})], 'a message needs a string "type"'),
        ([pack({"type": "info"}), b""], "a message is exactly one frame, got 2"),
        ([], "a message is exactly one frame, got 0"),
    ],
)
def test_bad_message(frames: list[bytes], text: str) -> None:
    error = rejected(None, frames)
    assert error.code == BAD_MESSAGE
    assert error.message.startswith(text)
    assert error.request_id is None  # "answers a message that could not be read (id nil)"
    reply = error.reply()
    assert reply["type"] == "error" and reply["id"] is None and reply["code"] == BAD_MESSAGE


def test_frame_too_large_is_checked_before_decoding() -> None:
    error = rejected(None, [b"\xc1" * (MAX_FRAME_BYTES + 1)])
    assert error.code == FRAME_TOO_LARGE
    assert error.message == f"frame of {MAX_FRAME_BYTES + 1} bytes exceeds {MAX_FRAME_BYTES}"
    assert error.field is None and error.request_id is None


def test_unknown_type_carries_the_id() -> None:
    error = rejected({"type": "generat", "id": "x"})
    assert (error.code, error.field, error.request_id) == (UNKNOWN_TYPE, "type", "x")
    assert error.message == 'unknown message type "generat"; expected generate, cancel or info'
    assert error.reply() == {
        "type": "error",
        "id": "x",
        "code": UNKNOWN_TYPE,
        "message": error.message,
        "field": "type",
    }
    assert rejected({"type": "stop"}).request_id is None


# ----------------------------------------------------------------- fields


@pytest.mark.parametrize(
    ("message", "extra"),
    [
        (generate(max_tokens=4), "max_tokens"),
        ({"type": "cancel", "id": "r1", "prompt": "x"}, "prompt"),
        ({"type": "info", "id": "r1", "verbose": True}, "verbose"),
    ],
)
def test_unknown_field_is_named(message: dict[str, Any], extra: str) -> None:
    error = rejected(message)
    assert (error.code, error.field, error.request_id) == (UNKNOWN_FIELD, extra, "r1")
    assert error.message.startswith(f'unknown field "{extra}" in a {message["type"]} message')


def test_unknown_field_lists_what_is_allowed() -> None:
    error = rejected({"type": "cancel", "id": "r1", "force": True})
    assert error.message == 'unknown field "force" in a cancel message; allowed: id, type'


@pytest.mark.parametrize(
    ("message", "name"),
    [
        (generate(id=...), "id"),
        (generate(prompt=...), "prompt"),
        (generate(max_new_tokens=...), "max_new_tokens"),
        ({"type": "cancel"}, "id"),
    ],
)
def test_missing_field(message: dict[str, Any], name: str) -> None:
    error = rejected(message)
    assert (error.code, error.field) == (MISSING_FIELD, name)
    assert error.message == f'a {message["type"]} message needs "{name}"'
    assert error.request_id == message.get("id")


BAD_FIELDS = [
    ("id", ""),
    ("id", "i" * (MAX_ID_CHARS + 1)),
    ("id", 7),
    ("id", None),
    ("prompt", ""),
    ("prompt", b"ROMEO:"),
    ("prompt", ["ROMEO:"]),
    ("max_new_tokens", 0),
    ("max_new_tokens", -1),
    ("max_new_tokens", LIMITS.max_new_tokens + 1),
    ("max_new_tokens", True),
    ("max_new_tokens", 8.0),
    ("max_new_tokens", "8"),
    ("max_new_tokens", None),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", -math.inf),
    ("temperature", True),
    ("temperature", "0.5"),
    ("temperature", None),
    ("top_k", -1),
    ("top_k", 1.0),
    ("top_k", False),
    ("top_k", None),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", True),
    ("seed", -1),
    ("seed", MAX_SEED + 1),
    ("seed", 1.0),
    ("seed", True),
    ("seed", "1"),
    ("stop", "\n"),
    ("stop", [""]),
    ("stop", ["x" * (MAX_STOP_CHARS + 1)]),
    ("stop", ["s"] * (MAX_STOP_STRINGS + 1)),
    ("stop", [1]),
    ("stop", None),
    ("stream", 1),
    ("stream", None),
    ("ignore_eos", "yes"),
    ("ignore_eos", 0),
]


@pytest.mark.parametrize(("name", "value"), BAD_FIELDS)
def test_bad_field(name: str, value: object) -> None:
    error = rejected(generate(**{name: value}))
    assert (error.code, error.field) == (BAD_FIELD, name)
    assert error.message.startswith(f"{name} must ")
    # The id is carried whenever it is a string, even one that is not a valid id.
    expected_id = "r1" if name != "id" else value if isinstance(value, str) else None
    assert error.request_id == expected_id
    if name not in ("id", "stop", "prompt"):  # echoing these back is not useful
        assert f"got {value!r}" in error.message


def test_bad_field_in_cancel_and_info() -> None:
    error = rejected({"type": "cancel", "id": 3})
    assert (error.code, error.field, error.request_id) == (BAD_FIELD, "id", None)
    error = rejected({"type": "info", "id": ""})
    assert (error.code, error.field, error.request_id) == (BAD_FIELD, "id", "")


@pytest.mark.parametrize(
    ("name", "value", "text"),
    [
        (
            "max_new_tokens",
            0,
            "max_new_tokens must be an integer from 1 to 64 (the plan's limit), got 0",
        ),
        (
            "max_new_tokens",
            True,
            "max_new_tokens must be an integer from 1 to 64 (the plan's limit), got True",
        ),
        ("temperature", 101, "temperature must be from 0 (greedy) to 100, got 101.0"),
        ("temperature", math.nan, "temperature must be a number from 0 (greedy) to 100, got nan"),
        ("top_k", -2, "top_k must be an integer ≥ 0 (0 = off), got -2"),
        ("top_p", 0, "top_p must be in (0, 1] (1 = off), got 0.0"),
        ("top_p", math.inf, "top_p must be a number in (0, 1] (1 = off), got inf"),
        ("seed", -1, "seed must be nil or an integer from 0 to 2^63-1, got -1"),
        (
            "stop",
            [""],
            "stop must be a list of at most 16 non-empty strings of at most 256 characters",
        ),
        ("id", "", "id must be a non-empty string of at most 128 characters"),
        ("stream", 1, "stream must be true or false, got 1"),
        ("prompt", "", "prompt must not be empty"),
    ],
)
def test_messages_name_the_field_and_the_allowed_range(name: str, value: object, text: str) -> None:
    assert rejected(generate(**{name: value})).message == text


def test_the_first_problem_is_reported() -> None:
    """Unknown fields before missing ones before bad values; the id before the other fields."""
    error = rejected(generate(extra=1, prompt=..., max_new_tokens=0))
    assert (error.code, error.field) == (UNKNOWN_FIELD, "extra")
    error = rejected(generate(id="", prompt=...))
    assert (error.code, error.field) == (BAD_FIELD, "id")
    error = rejected(generate(prompt=..., max_new_tokens=0))
    assert (error.code, error.field) == (MISSING_FIELD, "prompt")


# ----------------------------------------------------------------- replies


def test_replies_round_trip_through_pack_and_unpack() -> None:
    usage = Usage(3, 2, 0.0000004, 0.1234567, 0.5, 81237, {"stages": 2})
    messages = [
        token_reply("a", 0, "\nI", [199, 41]),
        done_reply("a", "length", "\nI", [199, 41], usage),
        error_reply("a", BAD_FIELD, "top_k must be ...", "top_k"),
        error_reply(None, BAD_MESSAGE, "a message must be a msgpack map"),
    ]
    for message in messages:
        assert unpack(pack(message)) == message
    done = messages[1]
    assert done["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "queued_s": 0.0,
        "first_token_s": 0.123457,
        "total_s": 0.5,
        "seed": 81237,
        "stages": 2,
    }
    assert "field" not in messages[3]
    request = generate(temperature=0.7, stop=["\n"], seed=MAX_SEED)
    assert unpack(pack(request)) == request


@pytest.mark.parametrize(
    ("raw_id", "reported"),
    [("x" * 129, "x" * 129), ("", ""), (7, None), (None, None)],
    ids=["too-long", "empty", "int", "nil"],
)
def test_an_invalid_id_is_reported_as_sent_when_it_is_a_string(
    raw_id: Any, reported: str | None
) -> None:
    """docs/protocol.md: an error's id is the message's id whenever it is a string, even an
    invalid one (then field is "id"); nil otherwise."""
    message = {"type": "generate", "id": raw_id, "prompt": "x", "max_new_tokens": 1}
    error = rejected(message)
    assert (error.request_id, error.field) == (reported, "id")
    assert error.reply()["id"] == reported
