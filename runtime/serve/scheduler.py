"""The phase-aware micro-batch scheduler of the gateway (no sockets here).

The plan's global batch of B sequences is cut into decode micro-batches ("groups") of the
plan's decode size; group g owns KV-cache slots [g·ξ_d, min((g+1)·ξ_d, B)) on every stage.
A free group admits up to ξ_d waiting requests at once, taken round-robin over the clients that
have requests waiting (each client connection's own requests in order: one client's flood
cannot starve another), left-pads
their prompts to the longest, and sends the prompt in prefill chunks of ξ_p rows. When every
chunk has produced its first token, the group decodes as one unit, one step in flight at a
time; the other groups' steps fill the pipeline meanwhile (spec §7.1). Requests that arrive
while groups run wait for the next free group: continuous batching at group granularity.

A group finishes when all its requests have; a request's rows stay in the group until then
(their tokens are ignored), so a group's slots are reused only once no step of it is in flight.
"""

from __future__ import annotations

import collections
import itertools
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from runtime.serve.frames import StepHeader
from runtime.serve.protocol import (
    DUPLICATE_ID,
    MAX_QUEUED,
    MAX_QUEUED_PER_CLIENT,
    MAX_SEED,
    OVERLOADED,
    PROMPT_TOO_LONG,
    UNKNOWN_ID,
    GenerateRequest,
    ProtocolError,
    Usage,
    done_reply,
    error_reply,
    token_reply,
)
from runtime.serve.textstream import Decoder, TextStream

Reply = tuple[bytes, dict[str, Any]]
Step = tuple[StepHeader, Tensor]
RECENT_REQUESTS = 64
"""Finished requests the status keeps listing after their running ones."""
LISTED_WAITING = 256
"""Waiting requests the status lists (the count covers all of them)."""


@dataclass(frozen=True, slots=True)
class Layout:
    """The plan's batch layout and limits."""

    global_batch: int
    prefill_size: int
    decode_size: int
    max_prompt_tokens: int
    max_new_tokens: int

    @property
    def groups(self) -> list[tuple[int, int]]:
        """Slot range of every decode micro-batch."""
        b, d = self.global_batch, self.decode_size
        return [(start, min(start + d, b)) for start in range(0, b, d)]


@dataclass(eq=False)
class Active:
    """One request from arrival to its ``done`` (or error) reply."""

    client: bytes
    request: GenerateRequest
    prompt_ids: list[int]
    seed: int
    stream: TextStream
    received: float
    admitted: float | None = None
    first_token: float | None = None
    generated: int = 0
    sent_ids: int = 0
    finished: str | None = None
    ended: float | None = None

    def row(self, now: float) -> dict[str, Any]:
        """What the status lists of this request (the dashboard's Requests view)."""
        state = self.finished or ("running" if self.admitted is not None else "waiting")
        end = self.ended if self.ended is not None else now
        decoding = end - self.first_token if self.first_token is not None else 0.0
        return {
            "id": self.request.id,
            "client": self.client.hex()[-8:],
            "state": state,
            "prompt_tokens": len(self.prompt_ids),
            "generated_tokens": self.generated,
            "max_new_tokens": self.request.max_new_tokens,
            "ttft_s": None if self.first_token is None else self.first_token - self.received,
            "tokens_per_s": (self.generated - 1) / decoding if decoding > 0 else None,
            "age_s": now - self.received,
        }


@dataclass(eq=False)
class Group:
    """A decode micro-batch: its slots, its requests and its step in flight."""

    index: int
    slots: tuple[int, int]
    rows: list[Active] = field(default_factory=list)
    length: int = 0
    past: int = 0
    pending: set[int] = field(default_factory=set)
    first: dict[int, int] = field(default_factory=dict)

    @property
    def busy(self) -> bool:
        return bool(self.rows)


class FairQueue:
    """Waiting requests, one queue per client; :meth:`popleft` takes them round-robin over the
    clients (each client's in the order it sent them)."""

    def __init__(self) -> None:
        self.queues: collections.OrderedDict[bytes, collections.deque[Active]] = (
            collections.OrderedDict()
        )
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __iter__(self) -> Iterator[Active]:
        """Every waiting request, in the order :meth:`popleft` would take them."""
        queues = [list(q) for q in self.queues.values()]
        for turn in range(max((len(q) for q in queues), default=0)):
            yield from (q[turn] for q in queues if turn < len(q))

    def __contains__(self, active: Active) -> bool:
        return active in self.queues.get(active.client, ())

    def waiting_for(self, client: bytes) -> int:
        """Requests of ``client`` waiting."""
        return len(self.queues.get(client, ()))

    def append(self, active: Active) -> None:
        self.queues.setdefault(active.client, collections.deque()).append(active)
        self.size += 1

    def popleft(self) -> Active:
        """The next client's oldest request; that client then goes to the back of the round."""
        client, queue = next(iter(self.queues.items()))
        active = queue.popleft()
        del self.queues[client]
        if queue:
            self.queues[client] = queue
        self.size -= 1
        return active

    def remove(self, active: Active) -> None:
        queue = self.queues[active.client]
        queue.remove(active)
        self.size -= 1
        if not queue:
            del self.queues[active.client]


class Scheduler:
    """Requests in, steps out; step results in, client replies out."""

    def __init__(
        self,
        layout: Layout,
        tokenizer: Decoder,
        pad_id: int,
        eos_ids: Sequence[int],
        clock: Callable[[], float] = time.monotonic,
        vocab_size: int | None = None,
    ) -> None:
        self.layout, self.tokenizer, self.pad_id = layout, tokenizer, pad_id
        self.vocab_size = vocab_size
        self.dropped_results = 0  # results that matched no step in flight, or were malformed
        self.eos_ids = tuple(eos_ids)
        self.clock = clock
        self.groups = [Group(i, slots) for i, slots in enumerate(layout.groups)]
        self.waiting = FairQueue()
        self.by_key: dict[tuple[bytes, str], Active] = {}
        self.seq = 0
        self.completed = 0
        self.generated_tokens = 0
        self.recent: collections.deque[Active] = collections.deque(maxlen=RECENT_REQUESTS)

    # ----------------------------------------------------------------- requests
    def submit(self, client: bytes, request: GenerateRequest, prompt_ids: list[int]) -> None:
        """Queue a validated request whose prompt is already tokenized.

        Raises:
            ProtocolError: a duplicate id, a prompt over the plan's length, a full queue.
        """
        key = (client, request.id)
        if key in self.by_key:
            raise ProtocolError(
                DUPLICATE_ID, f'request "{request.id}" is still running', "id", request.id
            )
        if not prompt_ids:
            raise ProtocolError(
                PROMPT_TOO_LONG, "prompt encodes to no tokens", "prompt", request.id
            )
        if len(prompt_ids) > self.layout.max_prompt_tokens:
            raise ProtocolError(
                PROMPT_TOO_LONG,
                f"prompt is {len(prompt_ids)} tokens; the plan allows "
                f"{self.layout.max_prompt_tokens}",
                "prompt",
                request.id,
            )
        if len(self.waiting) >= MAX_QUEUED:
            raise ProtocolError(
                OVERLOADED, f"{MAX_QUEUED} requests are waiting; retry later", None, request.id
            )
        if self.waiting.waiting_for(client) >= MAX_QUEUED_PER_CLIENT:
            raise ProtocolError(
                OVERLOADED,
                f"this connection has {MAX_QUEUED_PER_CLIENT} requests waiting, the most one "
                "client may queue; retry when some are done",
                None,
                request.id,
            )
        seed = request.seed if request.seed is not None else random.randint(0, MAX_SEED)
        eos = () if request.ignore_eos else self.eos_ids
        stream = TextStream(self.tokenizer, request.stop, eos)
        active = Active(client, request, prompt_ids, seed, stream, self.clock())
        self.by_key[key] = active
        self.waiting.append(active)

    def cancel(self, client: bytes, request_id: str) -> list[Reply]:
        """End a request now with finish reason ``cancelled``."""
        active = self.by_key.get((client, request_id))
        if active is None:
            raise ProtocolError(UNKNOWN_ID, f'no running request "{request_id}"', "id", request_id)
        if active in self.waiting:
            self.waiting.remove(active)
        return self._finish(active, "cancelled")

    def forget_client(self, client: bytes) -> None:
        """A client that cannot be reached: drop its requests without replies."""
        for key, active in list(self.by_key.items()):
            if key[0] == client:
                if active in self.waiting:
                    self.waiting.remove(active)
                active.finished = "cancelled"
                del self.by_key[key]
                self._ended(active, self.clock())

    def _ended(self, active: Active, now: float) -> None:
        active.ended = now
        self.recent.append(active)

    def request_rows(self) -> list[dict[str, Any]]:
        """Running requests, then waiting ones (the first :data:`LISTED_WAITING`), then the
        last :data:`RECENT_REQUESTS` finished, newest first: each as :meth:`Active.row`."""
        now = self.clock()
        running = [a for a in self.by_key.values() if a.admitted is not None]
        waiting = list(itertools.islice(self.waiting, LISTED_WAITING))
        return [a.row(now) for a in (*running, *waiting, *reversed(self.recent))]

    def find(self, client_tail: str, request_id: str) -> Active | None:
        """The running or waiting request ``request_id`` of the connection whose id ends in
        ``client_tail`` (as :meth:`Active.row` shows it)."""
        for (client, rid), active in self.by_key.items():
            if rid == request_id and client.hex().endswith(client_tail):
                return active
        return None

    @property
    def active_requests(self) -> int:
        return sum(1 for a in self.by_key.values() if a.admitted is not None)

    @property
    def in_flight(self) -> int:
        return sum(len(g.pending) for g in self.groups)

    def free_capacity(self) -> int:
        """Requests the free groups would take now."""
        return sum(g.slots[1] - g.slots[0] for g in self.groups if not (g.busy or g.pending))

    # ----------------------------------------------------------------- steps out
    def admit(self) -> list[Step]:
        """Fill free groups from the queue; the prefill steps to send."""
        steps: list[Step] = []
        for group in self.groups:
            if group.busy or group.pending or not self.waiting:
                continue
            capacity = group.slots[1] - group.slots[0]
            rows = [self.waiting.popleft() for _ in range(min(capacity, len(self.waiting)))]
            steps.extend(self._prefill(group, rows))
        return steps

    def _prefill(self, group: Group, rows: list[Active]) -> list[Step]:
        now = self.clock()
        group.rows, group.first = rows, {}
        group.length = max(len(a.prompt_ids) for a in rows)
        group.past = 0
        ids = torch.full((len(rows), group.length), self.pad_id, dtype=torch.int64)
        pads = []
        for r, active in enumerate(rows):
            active.admitted = now
            n = len(active.prompt_ids)
            ids[r, group.length - n :] = torch.tensor(active.prompt_ids, dtype=torch.int64)
            pads.append(group.length - n)
        steps = []
        size = self.layout.prefill_size
        for a in range(0, len(rows), size):
            b = min(a + size, len(rows))
            header = self._header(group, "prefill", (a, b), 0, pads[a:b])
            steps.append((header, ids[a:b]))
        return steps

    def _header(
        self, group: Group, phase: str, rows: tuple[int, int], past: int, pads: list[int]
    ) -> StepHeader:
        self.seq += 1
        group.pending.add(self.seq)
        start = group.slots[0]
        sample = tuple(
            (a.request.temperature, a.request.top_k, a.request.top_p, a.seed, a.generated)
            for a in group.rows[rows[0] : rows[1]]
        )
        return StepHeader(
            group.index,
            self.seq,
            phase,
            (start + rows[0], start + rows[1]),
            past,
            tuple(pads),
            sample,
        )

    # ----------------------------------------------------------------- results in
    def on_result(self, header: StepHeader) -> tuple[list[Reply], list[Step]]:
        """The last stage's tokens for a step: replies to send and the group's next step."""
        if not self._expected(header):
            self.dropped_results += 1
            return [], []
        group = self.groups[header.group]
        group.pending.discard(header.seq)
        offset = header.slots[0] - group.slots[0]
        for r, token in enumerate(header.tokens):
            group.first[offset + r] = token
        if group.pending:
            return [], []  # more prefill chunks to come
        replies: list[Reply] = []
        for r, active in enumerate(group.rows):
            replies.extend(self._on_token(active, group.first[r]))
        group.past = group.length if header.phase == "prefill" else group.past + 1
        return replies, self._continue(group)

    def _expected(self, header: StepHeader) -> bool:
        """A result for a step in flight (not one of a group failed or reset meanwhile), with
        one token in the vocabulary per row of its slots."""
        if not self.is_pending(header.group, header.seq):
            return False
        group = self.groups[header.group]
        start, stop = header.slots
        rows = len(group.rows)
        return (
            len(header.tokens) == header.rows
            and 0 <= start - group.slots[0] < stop - group.slots[0] <= rows
            and all(
                0 <= t < (self.vocab_size if self.vocab_size is not None else 1 << 31)
                for t in header.tokens
            )
        )

    def is_pending(self, group: int, seq: int) -> bool:
        """Whether step ``seq`` of ``group`` is in flight."""
        return 0 <= group < len(self.groups) and seq in self.groups[group].pending

    def _continue(self, group: Group) -> list[Step]:
        if all(a.finished for a in group.rows):
            group.rows, group.first = [], {}
            return []
        pads = [group.length - len(a.prompt_ids) for a in group.rows]
        tokens = torch.tensor([[group.first[r]] for r in range(len(group.rows))])
        header = self._header(group, "decode", (0, len(group.rows)), group.past, pads)
        return [(header, tokens)]

    def _on_token(self, active: Active, token: int) -> list[Reply]:
        if active.finished:
            return []
        now = self.clock()
        if active.first_token is None:
            active.first_token = now
        active.generated += 1
        self.generated_tokens += 1
        delta = active.stream.push(token)
        replies: list[Reply] = []
        if active.request.stream and delta:
            replies.append(self._token_message(active, delta))
        if active.stream.finished is not None:
            return replies + self._finish(active, active.stream.finished)
        if active.generated >= active.request.max_new_tokens:
            return replies + self._finish(active, "length")
        return replies

    def _token_message(self, active: Active, text: str) -> Reply:
        ids = active.stream.token_ids
        message = token_reply(active.request.id, active.sent_ids, text, ids[active.sent_ids :])
        active.sent_ids = len(ids)
        return active.client, message

    def _finish(self, active: Active, reason: str) -> list[Reply]:
        replies: list[Reply] = []
        tail = active.stream.flush()
        if active.request.stream and tail:
            replies.append(self._token_message(active, tail))
        if reason == "length" and active.stream.finished is not None:
            reason = active.stream.finished  # the held-back tail completed a stop string
        active.finished = reason
        self.by_key.pop((active.client, active.request.id), None)
        self.completed += 1
        now = self.clock()
        self._ended(active, now)
        usage = Usage(
            len(active.prompt_ids),
            active.generated,
            (now if active.admitted is None else active.admitted) - active.received,
            (now if active.first_token is None else active.first_token) - active.received,
            now - active.received,
            active.seed,
        )
        message = done_reply(
            active.request.id, reason, active.stream.text, list(active.stream.token_ids), usage
        )
        return [*replies, (active.client, message)]

    def fail_group(self, index: int, code: str, message: str) -> list[Reply]:
        """A step of this group failed: error replies to its requests; the group is free."""
        if not 0 <= index < len(self.groups):
            return []
        group = self.groups[index]
        replies = [self._error(a, code, message) for a in group.rows if not a.finished]
        group.rows, group.first, group.pending = [], {}, set()
        return replies

    def fail_all(self, code: str, message: str) -> list[Reply]:
        """Error replies to every running and waiting request (stage failure, shutdown)."""
        replies: list[Reply] = []
        for group in self.groups:
            replies.extend(self.fail_group(group.index, code, message))
        while self.waiting:
            replies.append(self._error(self.waiting.popleft(), code, message))
        return replies

    def _error(self, active: Active, code: str, message: str) -> Reply:
        active.finished = "error"
        self.by_key.pop((active.client, active.request.id), None)
        self._ended(active, self.clock())
        return active.client, error_reply(active.request.id, code, message)
