"""Incremental detokenisation of one request's generated ids, with stop strings.

The gateway pushes each new id and streams the returned delta. Two things are held back:

* text ending in an incomplete UTF-8 sequence (decoded as U+FFFD at the end), until it completes;
* the longest tail that could still begin a stop string, so no character of a stop string, nor
  anything after it, is ever sent.

Decoding follows the prefix_offset/read_offset scheme of HF's TextStreamer and vLLM's detokenizer:
each push decodes only a short window of recent ids (the ids of the last emitted chunk, whose text
is known, plus the ids not yet decoded into text), and the delta is what the new ids add to it.
The window and its known part are decoded from the same first id, so tokenizers that drop a
leading space (SentencePiece) still give the right delta. The deltas plus `TextStream.flush`
concatenate to ``tokenizer.decode(ids, skip_special_tokens=True)`` cut before the first stop
string. A window grows only while new ids add no complete text: the bytes of one character
(a few ids), or special tokens.

No torch here: the gateway imports this module.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal, Protocol

REPLACEMENT_CHAR = "\ufffd"
"""What decoding gives for bytes of an incomplete UTF-8 sequence."""

FinishReason = Literal["stop", "eos"]


class Decoder(Protocol):
    """The one tokenizer method used: `tokenizers.Tokenizer` and HF fast tokenizers both fit."""

    def decode(self, ids: list[int], /, skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Turns one request's generated ids into safe text deltas; stops at stop strings or eos.

    ``token_ids`` holds every pushed id, including the eos id and the id that completed a stop
    string (they count as generated tokens); ``text`` never includes the eos token's text nor
    anything from a stop string on. When several stop strings could match, the first to appear
    completely wins (the earliest start among those completed by the same id).
    """

    def __init__(
        self, tokenizer: Decoder, stop: Sequence[str] = (), eos_token_ids: Collection[int] = ()
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._eos_token_ids = frozenset(eos_token_ids)
        self._ids: list[int] = []  # ids whose text counts: every pushed id but an eos
        self._eos_id: int | None = None
        self._prefix_offset = 0  # window start: first id of the last decoded chunk
        self._read_offset = 0  # first id whose text is not yet decoded
        self._prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self._sent: list[str] = []  # deltas returned so far
        self._unsent = ""  # decoded text held back: at most a stop string's length
        self._finished: FinishReason | None = None
        self._closed = False  # finished, or flushed

    @property
    def finished(self) -> FinishReason | None:
        """None while running (also after `flush`); "stop" once a stop string appeared; "eos"."""
        return self._finished

    @property
    def token_ids(self) -> list[int]:
        """Every pushed id, the eos id included (a copy)."""
        return [*self._ids] if self._eos_id is None else [*self._ids, self._eos_id]

    @property
    def text(self) -> str:
        """All text sent so far plus what `flush` would return now."""
        return "".join(self._sent) + self._final_unsent()[0]

    def push(self, token_id: int) -> str:
        """Add the next generated id; return the text that became safe to send ('' if none).

        After an eos id or a stop string the stream is finished, and this returns the last of the
        text (everything held back for eos, the text up to the stop string for stop).

        Raises:
            RuntimeError: the stream has finished or been flushed.
        """
        if self._closed:
            raise RuntimeError(f"push after the stream ended ({self._finished or 'flushed'})")
        if token_id in self._eos_token_ids:
            self._eos_id = token_id
            return self._finish("eos")
        self._ids.append(token_id)
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete
        self._unsent += window[len(self._prefix_text) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        stop_at = self._find_stop(self._unsent)
        if stop_at is not None:
            self._unsent = self._unsent[:stop_at]
            return self._finish("stop")
        return self._send(len(self._unsent) - self._held_for_stop())

    def flush(self) -> str:
        """End the stream (length limit, cancel): return all text still held back.

        That is a partial stop string at the end and any incomplete character (as U+FFFD), but
        never text at or after a stop string (finished then becomes "stop"). Later calls, and
        calls after the stream finished, return ''.
        """
        if self._closed:
            return ""
        self._closed = True
        self._unsent, stopped = self._final_unsent()
        if stopped:
            self._finished = "stop"
        return self._send(len(self._unsent))

    def _finish(self, reason: FinishReason) -> str:
        """Close the stream and return everything it may still send."""
        delta = self.flush()
        if self._finished is None:
            self._finished = reason
        return delta

    def _final_unsent(self) -> tuple[str, bool]:
        """The unsent text if the stream ended now, cut before a stop string; whether one was."""
        unsent = self._unsent
        if self._read_offset < len(self._ids):
            window = self._decode(self._ids[self._prefix_offset :])
            unsent += window[len(self._prefix_text) :]
        stop_at = self._find_stop(unsent)
        return unsent[:stop_at], stop_at is not None

    def _send(self, end: int) -> str:
        """Move ``_unsent[:end]`` to the sent text and return it."""
        delta, self._unsent = self._unsent[:end], self._unsent[end:]
        if delta:
            self._sent.append(delta)
        return delta

    def _find_stop(self, text: str) -> int | None:
        """Start of the earliest stop string in ``text``, or None."""
        starts = (text.find(stop) for stop in self._stop)
        return min((i for i in starts if i >= 0), default=None)

    def _held_for_stop(self) -> int:
        """Length of the longest unsent tail that is a proper prefix of some stop string."""
        held = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(self._unsent)), held, -1):
                if self._unsent.endswith(stop[:length]):
                    held = length
                    break
        return held

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)
