"""Property tests (hypothesis) of every message a deployment reads from a socket: whatever a
client or a forged peer sends, the reader answers with its own error type (a protocol error
reply, a FrameError the worker drops and counts, a result the scheduler drops and counts),
never another exception."""

from __future__ import annotations

from functools import cache
from typing import Any

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.model.assets import builtin_model_dir
from runtime.model.shard import StageShard
from runtime.model.stages import load_plan_stage
from runtime.model.tokenizer import load_tokenizer
from runtime.serve.frames import FrameError, StepHeader, decode_step, encode_step
from runtime.serve.protocol import ERROR_CODES, Limits, ProtocolError, pack, parse_client_message
from runtime.serve.scheduler import Layout, Scheduler
from runtime.serve.worker import run_step
from tests.runtime.serve.plans import serving_plan

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
LIMITS = Limits(32, 16)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=10,
)

GENERATE = {"type": "generate", "id": "r", "prompt": "ROMEO:", "max_new_tokens": 4}
FIELDS = ["type", "id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
          "stop", "stream", "ignore_eos", "extra"]  # fmt: skip


def _client_reply(frames: list[bytes]) -> None:
    try:
        parse_client_message(frames, LIMITS)
    except ProtocolError as exc:
        reply = exc.reply()
        assert reply["code"] in ERROR_CODES and reply["message"]
        pack(reply)  # the reply itself can be sent


@SETTINGS
@given(frames=st.lists(st.binary(max_size=64), min_size=0, max_size=3))
def test_any_client_frames_get_a_reply_or_parse(frames: list[bytes]) -> None:
    _client_reply(frames)


@SETTINGS
@given(
    kind=st.sampled_from(["generate", "cancel", "info", "other"]),
    changes=st.dictionaries(st.sampled_from(FIELDS), values, max_size=4),
    dropped=st.sets(st.sampled_from(FIELDS), max_size=2),
)
def test_any_client_message_gets_a_reply_or_parses(
    kind: str, changes: dict[str, Any], dropped: set[str]
) -> None:
    message: dict[str, Any] = dict(GENERATE, type=kind)
    message.update(changes)
    for name in dropped:
        message.pop(name, None)
    try:
        frame = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return  # not encodable: covered by the raw-bytes property
    _client_reply([frame])


# ----------------------------------------------------------------- stage messages


@cache
def _shards() -> tuple[StageShard, StageShard]:
    plan = serving_plan("bard-tiny", [0, 4], batch=4, prompt_len=16, max_new=8)
    first, last = (load_plan_stage(plan, i, impl="reference") for i in (0, 1))
    return first, last


def _header() -> dict[str, Any]:
    header = StepHeader(0, 1, "prefill", (0, 2), 0, (1, 0), ((0.0, 0, 1.0, 7, 0),) * 2)
    frames = encode_step(header, torch.ones(2, 3, dtype=torch.int64))
    meta: dict[str, Any] = msgpack.unpackb(frames[0], raw=False)
    return meta


HEADER_FIELDS = ["v", "group", "seq", "phase", "slots", "past", "pad", "sample", "tokens",
                 "dtype", "shape"]  # fmt: skip


@SETTINGS
@given(
    changes=st.dictionaries(st.sampled_from(HEADER_FIELDS), values, max_size=3),
    tensor=st.binary(max_size=96) | st.none(),
    stage=st.sampled_from([0, 1]),
)
def test_any_step_frames_are_run_or_refused_with_a_frame_error(
    changes: dict[str, Any], tensor: bytes | None, stage: int
) -> None:
    meta = _header()
    meta.update(changes)
    try:
        head = msgpack.packb(meta, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    frames: list[Any] = [head] if tensor is None else [head, tensor]
    try:
        header, x = decode_step(frames)
        if x is None:
            raise FrameError("no tensor")
        run_step(_shards()[stage], header, x.clone())
    except FrameError:
        pass


@SETTINGS
@given(
    group=st.integers(min_value=0, max_value=2**40),
    seq=st.integers(min_value=0, max_value=2**40),
    start=st.integers(min_value=0, max_value=8),
    rows=st.integers(min_value=1, max_value=8),
    tokens=st.lists(st.integers(min_value=0, max_value=2**40), max_size=8),
    phase=st.sampled_from(["prefill", "decode"]),
)
def test_any_result_the_scheduler_did_not_ask_for_is_dropped_and_counted(
    group: int, seq: int, start: int, rows: int, tokens: list[int], phase: str
) -> None:
    tokenizer, pad_id, eos = _tokenizer()
    scheduler = Scheduler(Layout(4, 2, 2, 16, 8), tokenizer, pad_id, eos, vocab_size=4096)
    header = StepHeader(group, seq, phase, (start, start + rows), 0, (0,) * rows, (), tuple(tokens))
    replies, steps = scheduler.on_result(header)
    assert (replies, steps, scheduler.dropped_results) == ([], [], 1)


@cache
def _tokenizer() -> Any:
    return load_tokenizer(builtin_model_dir())
