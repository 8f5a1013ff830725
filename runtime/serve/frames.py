"""The stage data path: one micro-batch step as a msgpack header frame plus a raw tensor frame.

Header (msgpack map)::

    v       1
    group   decode micro-batch this step belongs to (int)
    seq     the group's step counter, for detecting stale or reordered steps (int)
    phase   "prefill" or "decode"
    slots   [start, stop): the KV-cache slots (sequences) of the rows
    past    tokens already cached for these slots
    pad     left padding of each row (len = rows)
    sample  per row [temperature, top_k, top_p, seed, step] (read by the last stage)
    dtype   the tensor's dtype name; shape: its shape

The tensor is token ids [rows, tokens] (int64) into the first stage, hidden states
[rows, tokens, hidden] between stages. The last stage replies with a header whose ``tokens``
lists the sampled id of every row and no tensor frame. Nothing is ever pickled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Final

import msgpack
import torch
from torch import Tensor

from runtime.serve.sampling import SamplingParams

FRAME_VERSION: Final = 1
_DTYPES: Final = {
    "int64": torch.int64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_NAMES: Final = {v: k for k, v in _DTYPES.items()}
MAX_ROWS: Final = 1 << 16
MAX_TENSOR_BYTES: Final = 4 << 30
CONTROL_FRAME_BYTES: Final = 1 << 20
"""Largest control message (hello, progress, ready, beats; connect, stop) a socket accepts."""
_HEADER_SLACK_BYTES: Final = 64 << 10
_HEADER_BYTES_PER_ROW: Final = 256  # pad, sample row and token of one row in a step header


def step_frame_bytes(rows: int, tokens: int, hidden: int) -> int:
    """Largest frame of a step of ``rows`` sequences × ``tokens`` positions of width ``hidden``
    (fp32 hidden states, or int64 token ids): what a stage's data socket and the gateway's
    results socket accept (``ZMQ_MAXMSGSIZE``, set before they bind)."""
    tensor = rows * tokens * max(4 * hidden, 8)
    return tensor + _HEADER_SLACK_BYTES + _HEADER_BYTES_PER_ROW * rows


class FrameError(ValueError):
    """A data-path message that does not follow the format above."""


@dataclass(frozen=True, slots=True)
class StepHeader:
    """Everything about one micro-batch step besides its tensor."""

    group: int
    seq: int
    phase: str
    slots: tuple[int, int]
    past: int
    pad: tuple[int, ...]
    sample: tuple[tuple[float, int, float, int, int], ...]
    tokens: tuple[int, ...] = ()

    @property
    def rows(self) -> int:
        """Sequences in the micro-batch."""
        return self.slots[1] - self.slots[0]

    def sampling(self) -> tuple[list[SamplingParams], list[int]]:
        """Per-row sampling parameters and the number of tokens each row generated so far."""
        params = [SamplingParams(t, k, p, s) for t, k, p, s, _ in self.sample]
        return params, [row[4] for row in self.sample]

    def with_tokens(self, tokens: list[int]) -> StepHeader:
        """The last stage's reply header."""
        return replace(self, tokens=tuple(tokens))


def positions_and_keys(header: StepHeader, seqlen: int) -> tuple[Tensor, Tensor]:
    """Positions [rows, seqlen] of the new tokens and key validity [rows, past + seqlen] of
    left-padded rows (a row's padding is never attended to and gets position 0)."""
    pad = torch.tensor(header.pad, dtype=torch.long)[:, None]
    total = header.past + seqlen
    keys = torch.arange(total)[None, :] >= pad
    positions = (torch.arange(header.past, total)[None, :] - pad).clamp(min=0)
    return positions, keys


def encode_step(header: StepHeader, tensor: Tensor | None) -> list[bytes | memoryview]:
    """Frames of one step; the tensor travels as its raw bytes (bf16 through a uint8 view)."""
    meta: dict[str, Any] = {
        "v": FRAME_VERSION,
        "group": header.group,
        "seq": header.seq,
        "phase": header.phase,
        "slots": list(header.slots),
        "past": header.past,
        "pad": list(header.pad),
        "sample": [list(row) for row in header.sample],
    }
    if header.tokens:
        meta["tokens"] = list(header.tokens)
    if tensor is None:
        return [msgpack.packb(meta, use_bin_type=True)]
    tensor = tensor.detach().to("cpu").contiguous()
    meta["dtype"], meta["shape"] = _NAMES[tensor.dtype], list(tensor.shape)
    raw = tensor.view(torch.uint8).numpy().data if tensor.numel() else memoryview(b"")
    return [msgpack.packb(meta, use_bin_type=True), raw]


def decode_step(frames: list[Any]) -> tuple[StepHeader, Tensor | None]:
    """Parse and validate a step's frames (bytes or zmq.Frame); the tensor shares the frame's
    memory (read-only view, copy before writing).

    Raises:
        FrameError: naming the bad field.
    """
    if not 1 <= len(frames) <= 2:
        raise FrameError(f"a step is 1 or 2 frames, got {len(frames)}")
    try:
        meta = msgpack.unpackb(_bytes(frames[0]), raw=False, strict_map_key=True)
    except Exception as exc:
        raise FrameError(f"header is not msgpack ({exc})") from None
    if not isinstance(meta, dict) or meta.get("v") != FRAME_VERSION:
        raise FrameError(f"header must be a map with v = {FRAME_VERSION}")
    group, seq, past = _int(meta, "group"), _int(meta, "seq"), _int(meta, "past")
    phase = meta.get("phase")
    if phase not in ("prefill", "decode"):
        raise FrameError(f'phase must be "prefill" or "decode", got {phase!r}')
    slots = _ints(meta, "slots")
    if len(slots) != 2 or not 0 <= slots[0] < slots[1] or slots[1] - slots[0] > MAX_ROWS:
        raise FrameError(f"slots must be [start, stop) with 0 <= start < stop, got {slots}")
    rows = slots[1] - slots[0]
    pad = _ints(meta, "pad")
    if len(pad) != rows:
        raise FrameError(f"pad has {len(pad)} entries for {rows} rows")
    sample = meta.get("sample")
    if not isinstance(sample, list) or len(sample) != rows:
        raise FrameError(f"sample must list {rows} rows")
    parsed = tuple(_sample_row(row) for row in sample)
    tokens = tuple(_ints(meta, "tokens")) if "tokens" in meta else ()
    if tokens and len(tokens) != rows:
        raise FrameError(f"tokens has {len(tokens)} entries for {rows} rows")
    header = StepHeader(group, seq, phase, (slots[0], slots[1]), past, tuple(pad), parsed, tokens)
    if len(frames) == 1:
        if "dtype" in meta:
            raise FrameError("header describes a tensor but no tensor frame follows")
        return header, None
    return header, _tensor(meta, frames[1], rows)


def _tensor(meta: dict[str, Any], frame: Any, rows: int) -> Tensor:
    name = meta.get("dtype")
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise FrameError(f"dtype must be one of {', '.join(_DTYPES)}, got {meta.get('dtype')!r}")
    shape = _ints(meta, "shape")
    if not 2 <= len(shape) <= 3 or shape[0] != rows or min(shape) < 0:
        raise FrameError(f"shape must be [rows, tokens(, hidden)] with rows = {rows}, got {shape}")
    buffer = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if expected > MAX_TENSOR_BYTES or buffer.nbytes != expected:
        raise FrameError(f"tensor frame has {buffer.nbytes} bytes, shape {shape} needs {expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


def _bytes(frame: Any) -> bytes:
    return frame.bytes if hasattr(frame, "bytes") else bytes(frame)


def _int(meta: dict[str, Any], name: str) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise FrameError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _ints(meta: dict[str, Any], name: str) -> list[int]:
    value = meta.get(name)
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise FrameError(f"{name} must be a list of non-negative integers, got {value!r}")
    return value


def _sample_row(row: object) -> tuple[float, int, float, int, int]:
    if (
        not isinstance(row, list)
        or len(row) != 5
        or not isinstance(row[0], int | float)
        or not isinstance(row[2], int | float)
        or not all(isinstance(row[i], int) and row[i] >= 0 for i in (1, 3, 4))
        or not (row[0] >= 0.0 and 0.0 < row[2] <= 1.0)
    ):
        raise FrameError(f"sample row must be [temperature, top_k, top_p, seed, step], got {row!r}")
    return float(row[0]), int(row[1]), float(row[2]), int(row[3]), int(row[4])
