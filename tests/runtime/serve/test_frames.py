"""The stage data path (runtime/serve/frames.py): steps survive encode/decode bit for bit, positions
match the local chain's, and every malformed step is a FrameError naming what is wrong."""

from __future__ import annotations

import warnings
from typing import Any

import msgpack
import pytest
import torch

from runtime.model.local_chain import positions_from_mask
from runtime.serve.frames import (
    FRAME_VERSION,
    FrameError,
    StepHeader,
    decode_step,
    encode_step,
    positions_and_keys,
)
from runtime.serve.sampling import SamplingParams

GREEDY = (0.0, 0, 1.0, 11, 0)


def header(rows: int = 2, **fields: Any) -> StepHeader:
    values: dict[str, Any] = {
        "group": 1,
        "seq": 7,
        "phase": "prefill",
        "slots": (2, 2 + rows),
        "past": 0,
        "pad": tuple(range(rows)),
        "sample": tuple((0.5 * r, r, 0.9, 1000 + r, r) for r in range(rows)),
    }
    values.update(fields)
    return StepHeader(**values)


def round_trip(frames: list[Any]) -> tuple[StepHeader, torch.Tensor | None]:
    """Decode the frames as a socket would deliver them (plain bytes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer on read-only bytes
        return decode_step([bytes(f) for f in frames])


def meta(**fields: Any) -> dict[str, Any]:
    """A valid header map for a 2-row int64 [2, 3] step, with ``fields`` replaced."""
    values: dict[str, Any] = {
        "v": FRAME_VERSION,
        "group": 0,
        "seq": 1,
        "phase": "decode",
        "slots": [0, 2],
        "past": 4,
        "pad": [0, 1],
        "sample": [list(GREEDY), list(GREEDY)],
        "dtype": "int64",
        "shape": [2, 3],
    }
    values.update(fields)
    return {k: v for k, v in values.items() if v is not ...}


def frames_of(values: dict[str, Any], data: bytes | None = b"\0" * 48) -> list[bytes]:
    head = msgpack.packb(values, use_bin_type=True)
    return [head] if data is None else [head, data]


def test_valid_meta_decodes() -> None:
    step, tensor = round_trip(frames_of(meta()))
    assert step.rows == 2 and tensor is not None and tensor.shape == (2, 3)


# ----------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        (torch.int64, (2, 5)),
        (torch.float32, (2, 3, 8)),
        (torch.bfloat16, (2, 3, 8)),
        (torch.float16, (2, 1, 8)),
    ],
)
def test_step_round_trips_bit_exactly(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        tensor = torch.randint(-(1 << 62), 1 << 62, shape, generator=generator)
    else:
        tensor = (torch.randn(shape, generator=generator) * 1e3).to(dtype)
        tensor.view(-1)[:4] = torch.tensor([float("inf"), -0.0, float("nan"), 1e-30])
    sent = header()
    decoded, received = round_trip(encode_step(sent, tensor))
    assert decoded == sent
    assert received is not None and received.dtype == dtype and received.shape == shape
    assert torch.equal(received.view(torch.uint8), tensor.view(torch.uint8))


def test_non_contiguous_and_sliced_tensors_are_sent_as_their_values() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensor = base.t()[1:3]  # [2, 4], not contiguous
    _, received = round_trip(encode_step(header(), tensor))
    assert received is not None and torch.equal(received, tensor)


def test_result_header_carries_tokens_and_no_tensor() -> None:
    reply = header(3, phase="decode", past=9).with_tokens([5, 0, 4095])
    frames = encode_step(reply, None)
    assert len(frames) == 1
    decoded, tensor = round_trip(frames)
    assert tensor is None and decoded == reply and decoded.tokens == (5, 0, 4095)


def test_sampling_rows_become_parameters_and_steps() -> None:
    params, steps = header(2).sampling()
    assert params == [SamplingParams(0.0, 0, 0.9, 1000), SamplingParams(0.5, 1, 0.9, 1001)]
    assert steps == [0, 1]


def test_zero_token_step_round_trips() -> None:
    """A tensor with no elements (rows but no tokens) travels as an empty frame."""
    tensor = torch.empty(2, 0, dtype=torch.int64)
    frames = encode_step(header(), tensor)
    assert len(frames) == 2 and bytes(frames[1]) == b""
    _, received = round_trip(frames)
    assert received is not None and received.shape == (2, 0) and received.dtype == torch.int64


def test_large_seed_and_ids_survive() -> None:
    sent = header(1, sample=((2.0, 50, 0.5, (1 << 63) - 1, 15),), group=0, seq=1 << 40)
    decoded, _ = round_trip(encode_step(sent, torch.zeros(1, 1, dtype=torch.int64)))
    assert decoded == sent


# ----------------------------------------------------------------- positions


@pytest.mark.parametrize("pads", [(0, 0), (0, 3), (4, 1, 0)])
@pytest.mark.parametrize("past", [0, 6, 11])
def test_positions_and_keys_match_the_local_chain(pads: tuple[int, ...], past: int) -> None:
    """A left-padded prompt of ``length`` tokens, ``past`` tokens cached: the new tokens'
    positions equal positions_from_mask over the whole mask, and the keys are that mask."""
    length = 6
    seqlen = length if past == 0 else 1
    total = past + seqlen
    mask = torch.ones(len(pads), total, dtype=torch.long)
    for r, pad in enumerate(pads):
        mask[r, :pad] = 0
    step = header(len(pads), pad=pads, past=past, slots=(0, len(pads)))
    positions, keys = positions_and_keys(step, seqlen)
    assert positions.shape == (len(pads), seqlen) and keys.shape == (len(pads), total)
    assert torch.equal(positions, positions_from_mask(mask)[:, past:])
    assert torch.equal(keys, mask.bool())


def test_decode_positions_follow_the_local_chain_step_by_step() -> None:
    """local_chain.greedy advances positions by one per decode step from the prompt's last."""
    pads, length = (2, 0), 5
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :2] = 0
    chain_positions = positions_from_mask(mask)
    for past in range(length, length + 4):
        chain_positions = chain_positions[:, -1:] + 1
        positions, _ = positions_and_keys(header(2, pad=pads, past=past), 1)
        assert torch.equal(positions, chain_positions)


# ----------------------------------------------------------------- malformed steps


@pytest.mark.parametrize(
    ("values", "text"),
    [
        (meta(v=2), "header must be a map with v = 1"),
        (meta(v=...), "header must be a map with v = 1"),
        ([1, 2], "header must be a map with v = 1"),
        (meta(group=-1), "group must be a non-negative integer, got -1"),
        (meta(seq=True), "seq must be a non-negative integer, got True"),
        (meta(past=None), "past must be a non-negative integer, got None"),
        (meta(phase="generate"), 'phase must be "prefill" or "decode", got \'generate\''),
        (meta(phase=...), 'phase must be "prefill" or "decode", got None'),
        (meta(slots=[2, 2]), "slots must be [start, stop) with 0 <= start < stop, got [2, 2]"),
        (meta(slots=[3, 1]), "slots must be [start, stop)"),
        (meta(slots=[0, 1, 2]), "slots must be [start, stop)"),
        (meta(slots=[0, 1 << 17]), "slots must be [start, stop)"),
        (meta(slots=[-1, 1]), "slots must be a list of non-negative integers, got [-1, 1]"),
        (meta(slots="0:2"), "slots must be a list of non-negative integers"),
        (meta(pad=[0]), "pad has 1 entries for 2 rows"),
        (meta(pad=[0, 1, 2]), "pad has 3 entries for 2 rows"),
        (meta(pad=[0, -1]), "pad must be a list of non-negative integers"),
        (meta(sample=[list(GREEDY)]), "sample must list 2 rows"),
        (meta(sample=...), "sample must list 2 rows"),
        (meta(sample=[list(GREEDY), [0.0, 0, 1.0, 1]]), "sample row must be [temperature"),
        (meta(sample=[list(GREEDY), [-1.0, 0, 1.0, 1, 0]]), "sample row must be"),
        (meta(sample=[list(GREEDY), [float("nan"), 0, 1.0, 1, 0]]), "sample row must be"),
        (meta(sample=[list(GREEDY), [0.0, -1, 1.0, 1, 0]]), "sample row must be"),
        (meta(sample=[list(GREEDY), [0.0, 0, 0.0, 1, 0]]), "sample row must be"),
        (meta(sample=[list(GREEDY), [0.0, 0, 1.5, 1, 0]]), "sample row must be"),
        (meta(sample=[list(GREEDY), [0.0, 0, 1.0, -1, 0]]), "sample row must be"),
        (meta(sample=[list(GREEDY), [0.0, 0, 1.0, 1, 0.5]]), "sample row must be"),
        (meta(sample=[list(GREEDY), "greedy"]), "sample row must be"),
        (meta(tokens=[1]), "tokens has 1 entries for 2 rows"),
        (meta(tokens=[1, 2, 3]), "tokens has 3 entries for 2 rows"),
        (meta(tokens=[1, -2]), "tokens must be a list of non-negative integers"),
        (
            meta(dtype="int32"),
            "dtype must be one of int64, float32, bfloat16, float16, got 'int32'",
        ),
        (meta(dtype=...), "dtype must be one of"),
        (meta(shape=[2]), "shape must be [rows, tokens(, hidden)] with rows = 2, got [2]"),
        (meta(shape=[2, 3, 1, 1]), "shape must be [rows, tokens(, hidden)]"),
        (meta(shape=[3, 2]), "shape must be [rows, tokens(, hidden)] with rows = 2, got [3, 2]"),
        (meta(shape=[2, -3]), "shape must be a list of non-negative integers"),
        (meta(shape=[2, 4]), "tensor frame has 48 bytes, shape [2, 4] needs 64"),
        (
            meta(shape=[2, 3, 1], dtype="float32"),
            "tensor frame has 48 bytes, shape [2, 3, 1] needs 24",
        ),
        (meta(shape=[2, 1 << 28, 2]), "tensor frame has 48 bytes"),
    ],
)
def test_malformed_header_is_named(values: Any, text: str) -> None:
    with pytest.raises(FrameError) as info:
        round_trip(frames_of(values))
    assert str(info.value).startswith(text)


def test_frame_count_and_tensor_presence() -> None:
    with pytest.raises(FrameError, match="a step is 1 or 2 frames, got 0"):
        decode_step([])
    with pytest.raises(FrameError, match="a step is 1 or 2 frames, got 3"):
        decode_step([*frames_of(meta()), b""])
    with pytest.raises(FrameError, match="header describes a tensor but no tensor frame follows"):
        decode_step(frames_of(meta(), None))
    with pytest.raises(FrameError, match="dtype must be one of"):  # a tensor nobody described
        decode_step(frames_of(meta(dtype=..., shape=...)))
    with pytest.raises(FrameError, match="header is not msgpack"):
        decode_step([b"\xc1", b""])
    with pytest.raises(FrameError, match="tensor frame has 47 bytes"):
        round_trip(frames_of(meta(), b"\0" * 47))
    step, tensor = decode_step(frames_of(meta(dtype=..., shape=...), None))
    assert tensor is None and step.rows == 2
