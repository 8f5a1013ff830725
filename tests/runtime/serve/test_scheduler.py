"""The gateway's scheduler (runtime/serve/scheduler.py) driven in-process: real stage shards of the
built-in model, each step run through them with the worker's own ``run_step``, no sockets, and
a fake clock that advances one second per step."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

import runtime.serve.scheduler
from planner.plan import Plan
from runtime.model.assets import builtin_model_dir
from runtime.model.local_chain import LocalChain
from runtime.model.shard import StageShard
from runtime.model.stages import load_plan_stage
from runtime.model.tokenizer import Tokenizer, load_tokenizer
from runtime.serve.frames import StepHeader
from runtime.serve.protocol import (
    DUPLICATE_ID,
    INTERNAL,
    MAX_SEED,
    OVERLOADED,
    PROMPT_TOO_LONG,
    STAGE_FAILED,
    UNKNOWN_ID,
    GenerateRequest,
    ProtocolError,
)
from runtime.serve.scheduler import Layout, Reply, Scheduler, Step
from runtime.serve.worker import run_step
from tests.runtime.serve.plans import serving_plan

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["ROMEO:", "HAMLET:\nTo be, or not to be", "First Citizen:\nWe are", "KING LEAR:\nO"]
C1, C2 = b"client-1", b"client-2"


@dataclass(frozen=True)
class Model:
    tokenizer: Tokenizer
    pad_id: int
    eos_ids: tuple[int, ...]


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(*load_tokenizer(builtin_model_dir()))


@pytest.fixture(scope="module")
def plan() -> Plan:
    """Two stages, a global batch of 4 in two decode groups of 2, prefill chunks of 2."""
    return serving_plan("bard-tiny", [0, 4], batch=4, prompt_len=32, max_new=16)


def shards_of(plan: Plan) -> list[StageShard]:
    """Fresh shards (their KV caches are empty)."""
    return [load_plan_stage(plan, i, impl="reference") for i in range(len(plan.stages))]


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """The gateway's loop without sockets. Steps run in the order they were sent (the stages'
    queues are FIFO), one at a time; each advances the clock by 1 s, and after each the
    scheduler admits waiting requests, as the gateway's loop does."""

    model: Model
    plan: Plan
    eos_ids: tuple[int, ...] | None = None
    clock: Clock = field(default_factory=Clock)
    queue: collections.deque[Step] = field(default_factory=collections.deque)
    sent: list[StepHeader] = field(default_factory=list)
    replies: list[Reply] = field(default_factory=list)

    def __post_init__(self) -> None:
        w, mb = self.plan.workload, self.plan.micro_batching
        layout = Layout(
            w.global_batch, mb.prefill_size, mb.decode_size, w.prompt_len, w.max_new_tokens
        )
        eos = self.model.eos_ids if self.eos_ids is None else self.eos_ids
        self.scheduler = Scheduler(
            layout, self.model.tokenizer, self.model.pad_id, eos, clock=self.clock
        )
        self.shards = shards_of(self.plan)

    def submit(
        self,
        request_id: str,
        prompt: str,
        max_new: int = 16,
        client: bytes = C1,
        prompt_ids: list[int] | None = None,
        **options: Any,
    ) -> None:
        request = GenerateRequest(request_id, prompt, max_new, **options)
        ids = self.model.tokenizer.encode(prompt) if prompt_ids is None else prompt_ids
        self.scheduler.submit(client, request, ids)

    def admit(self) -> None:
        self.send(self.scheduler.admit())

    def send(self, steps: list[Step]) -> None:
        self.sent.extend(header for header, _ in steps)
        self.queue.extend(steps)

    def compute(self, step: Step) -> StepHeader:
        """One step through every stage, as the stage workers run it: the result header."""
        header, x = step
        out: Any = x
        for shard in self.shards:
            header, out = run_step(shard, header, out)
        assert out is None and len(header.tokens) == header.rows
        return header

    def deliver(self, result: StepHeader) -> tuple[list[Reply], list[Step]]:
        self.clock.now += 1
        replies, steps = self.scheduler.on_result(result)
        self.replies.extend(replies)
        self.send(steps)
        self.admit()
        return replies, steps

    def tick(self) -> None:
        self.deliver(self.compute(self.queue.popleft()))

    def run(self, on_tick: Callable[[int], None] | None = None, max_steps: int = 500) -> int:
        """Admit, then run until no step is left; the number of steps run."""
        self.admit()
        ticks = 0
        while self.queue:
            if on_tick is not None:
                on_tick(ticks)
            self.tick()
            ticks += 1
            assert ticks < max_steps, "the scheduler never finishes"
        return ticks

    def done(self, request_id: str, client: bytes = C1) -> dict[str, Any]:
        message = terminals(self.replies)[client, request_id]
        assert message["type"] == "done", message
        return message

    def idle(self) -> bool:
        s = self.scheduler
        return not (s.waiting or s.by_key or s.in_flight or any(g.busy for g in s.groups))


def terminals(replies: list[Reply]) -> dict[tuple[bytes, str], dict[str, Any]]:
    """Each request's last message, checking the protocol's order on the way: token messages
    (consecutive indices, text that adds up to the done text) then exactly one done or error."""
    streamed: dict[tuple[bytes, str], tuple[str, list[int]]] = {}
    ended: dict[tuple[bytes, str], dict[str, Any]] = {}
    for client, message in replies:
        key = (client, message["id"])
        assert key not in ended, f"a message after the end of {key}: {message}"
        text, ids = streamed.get(key, ("", []))
        if message["type"] == "token":
            assert message["index"] == len(ids) and message["token_ids"]
            streamed[key] = (text + message["text"], ids + message["token_ids"])
            continue
        ended[key] = message
        if message["type"] == "done":
            assert text == (message["text"] if key in streamed else "")
            assert message["token_ids"][: len(ids)] == ids
            assert message["usage"]["completion_tokens"] == len(message["token_ids"])
        else:
            assert message["type"] == "error"
    return ended


def reference(model: Model, plan: Plan, prompts: list[str], max_new: int) -> list[list[int]]:
    """LocalChain greedy on the same left-padded batch and micro-batch sizes, fresh shards."""
    encoded = [model.tokenizer.encode(p) for p in prompts]
    length = max(len(e) for e in encoded)
    ids = torch.full((len(prompts), length), model.pad_id, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, length - len(e) :] = torch.tensor(e)
        mask[row, length - len(e) :] = 1
    mb = plan.micro_batching
    chain = LocalChain(shards_of(plan))
    result = chain.greedy(ids, mask, max_new, mb.prefill_size, mb.decode_size)
    tokens: list[list[int]] = result.tokens.tolist()
    return tokens


@pytest.fixture
def harness(model: Model, plan: Plan) -> Iterator[Harness]:
    h = Harness(model, plan)
    yield h
    assert h.idle(), "requests or steps left behind"


# ----------------------------------------------------------------- tokens


def test_one_group_gives_the_local_chains_greedy_tokens(model: Model) -> None:
    plan = serving_plan("bard-tiny", [0, 4], batch=4, prompt_len=32, max_new=16, decode=4)
    h = Harness(model, plan)
    for i, prompt in enumerate(PROMPTS):
        h.submit(f"r{i}", prompt, ignore_eos=True)
    steps = h.run()
    expected = reference(model, plan, PROMPTS, 16)
    for i, tokens in enumerate(expected):
        done = h.done(f"r{i}")
        assert done["token_ids"] == tokens, PROMPTS[i]
        assert done["finish_reason"] == "length"
        assert done["text"] == model.tokenizer.decode(tokens)
    assert steps == 2 + 15  # two prefill chunks, then one decode step per further token
    assert h.idle()


def test_continuous_batching_at_group_granularity(harness: Harness) -> None:
    h = harness
    h.submit("a", PROMPTS[0], 6, ignore_eos=True)
    h.admit()  # group 0
    h.submit("b", PROMPTS[1], 16, ignore_eos=True)
    h.admit()  # group 1
    h.submit("c", PROMPTS[2], 3, ignore_eos=True)
    h.admit()
    assert [a.request.id for a in h.scheduler.waiting] == ["c"]  # every group is busy

    def later(tick: int) -> None:
        if tick == 2:  # submitted while both groups run
            for rid in "def":
                h.submit(rid, PROMPTS[3], 2, ignore_eos=True)

    h.run(later)
    done = {rid: h.done(rid) for rid in "abcdef"}
    for rid, max_new in zip("abcdef", [6, 16, 3, 2, 2, 2], strict=True):
        assert done[rid]["finish_reason"] == "length"
        assert done[rid]["usage"]["completion_tokens"] == max_new
    usage = {rid: done[rid]["usage"] for rid in "abcdef"}
    ended = {rid: (2.0 if rid in "def" else 0.0) + usage[rid]["total_s"] for rid in "abcdef"}
    # c takes the group a frees, the moment a ends, and finishes long before b; d, the next
    # in line, fills the group's other slot.
    assert usage["a"]["queued_s"] == usage["b"]["queued_s"] == 0.0
    assert usage["c"]["queued_s"] == 2.0 + usage["d"]["queued_s"] == ended["a"] > 0
    order = [m["id"] for _, m in h.replies if m["type"] == "done"]
    assert order.index("c") < order.index("b")
    # e and f join together once that group frees again, still before b ends.
    assert 2.0 + usage["e"]["queued_s"] == 2.0 + usage["f"]["queued_s"] == ended["c"]
    assert ended["c"] < ended["b"]
    assert order[-1] == "b"


def test_a_request_alone_matches_the_same_request_in_a_full_group(model: Model, plan: Plan) -> None:
    """Rows of a group do not affect each other; a prompt of the plan's 32 tokens fits."""
    longest = model.tokenizer.encode(" ".join(PROMPTS * 4))[:32]
    alone, paired = Harness(model, plan), Harness(model, plan)
    alone.submit("x", PROMPTS[1], ignore_eos=True)
    paired.submit("y", "", prompt_ids=longest, ignore_eos=True)
    paired.submit("x", PROMPTS[1], ignore_eos=True)
    alone.run()
    paired.run()
    assert alone.done("x")["token_ids"] == paired.done("x")["token_ids"]
    assert paired.done("y")["usage"]["prompt_tokens"] == 32
    assert len(paired.done("y")["token_ids"]) == 16


# ----------------------------------------------------------------- finish reasons


def test_eos_ends_a_request_and_ignore_eos_does_not(model: Model, plan: Plan) -> None:
    """The built-in model never picks its eos (id 0) greedily after these prompts, so a token
    it does generate plays the eos here: the scheduler takes its eos ids as an argument."""
    first = Harness(model, plan)
    first.submit("ref", PROMPTS[0], ignore_eos=True)
    first.run()
    ref = first.done("ref")["token_ids"]
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    h = Harness(model, plan, eos_ids=(ref[k],))
    h.submit("stops", PROMPTS[0])
    h.submit("goes-on", PROMPTS[0], ignore_eos=True)
    h.run()
    stops = h.done("stops")
    assert stops["finish_reason"] == "eos"
    assert stops["token_ids"] == ref[: k + 1]  # the eos id counts as generated
    assert stops["text"] == model.tokenizer.decode(ref[:k])
    assert stops["usage"]["completion_tokens"] == k + 1
    goes_on = h.done("goes-on")
    assert goes_on["finish_reason"] == "length" and goes_on["token_ids"] == ref
    assert h.idle()


def test_the_models_own_eos_id_ends_a_request(model: Model, plan: Plan) -> None:
    assert model.eos_ids == (0,)
    h = Harness(model, plan)
    h.submit("a", "ROMEO:")
    h.admit()
    (prefill,) = h.queue
    h.queue.clear()
    _, (decode,) = h.deliver(prefill[0].with_tokens([199]))  # "\n"
    h.queue.clear()
    _, steps = h.deliver(decode[0].with_tokens([0]))
    assert steps == []
    done = h.done("a")
    assert (done["finish_reason"], done["text"], done["token_ids"]) == ("eos", "\n", [199, 0])
    assert h.idle()


def test_stop_strings_cut_the_text(model: Model, plan: Plan, harness: Harness) -> None:
    first = Harness(model, plan)
    first.submit("ref", PROMPTS[0], ignore_eos=True)
    first.run()
    ref = first.done("ref")["token_ids"]
    text = model.tokenizer.decode(ref)
    stop = text[4:9]  # spans several tokens
    n = next(i for i in range(1, len(ref) + 1) if stop in model.tokenizer.decode(ref[:i]))
    assert n > 2
    h = harness
    h.submit("s", PROMPTS[0], stop=("never there", stop))
    h.submit("quiet", PROMPTS[0], stop=(stop,), stream=False)
    h.run()
    done = h.done("s")
    assert done["finish_reason"] == "stop"
    assert done["text"] == text[: text.find(stop)]
    assert done["token_ids"] == ref[:n]  # up to the token that completed the stop string
    deltas = [m for _, m in h.replies if m["type"] == "token" and m["id"] == "s"]
    assert deltas and "".join(m["text"] for m in deltas) == done["text"]
    assert not any(stop in m["text"] for m in deltas)
    quiet = h.done("quiet")
    assert not [m for _, m in h.replies if m["type"] == "token" and m["id"] == "quiet"]
    assert (quiet["finish_reason"], quiet["text"], quiet["token_ids"]) == (
        "stop",
        done["text"],
        done["token_ids"],
    )


def test_cancel_a_waiting_and_a_running_request(harness: Harness) -> None:
    h = harness
    for i in range(4):
        h.submit(f"r{i}", PROMPTS[i], ignore_eos=True)
    h.submit("waits", PROMPTS[0])
    h.admit()
    h.clock.now = 5.0
    replies = h.scheduler.cancel(C1, "waits")
    h.replies.extend(replies)
    (message,) = replies
    assert message == (C1, h.done("waits"))
    assert (message[1]["finish_reason"], message[1]["text"], message[1]["token_ids"]) == (
        "cancelled",
        "",
        [],
    )
    assert message[1]["usage"]["queued_s"] == message[1]["usage"]["total_s"] == 5.0
    for _ in range(8):
        h.tick()
    h.replies.extend(h.scheduler.cancel(C1, "r1"))
    cancelled = h.done("r1")
    assert cancelled["finish_reason"] == "cancelled"
    assert 1 <= len(cancelled["token_ids"]) < 16
    with pytest.raises(ProtocolError) as info:
        h.scheduler.cancel(C1, "r1")
    assert info.value.code == UNKNOWN_ID
    h.run()
    assert terminals(h.replies)[C1, "r1"] == cancelled  # nothing more for r1
    for rid in ("r0", "r2", "r3"):
        assert len(h.done(rid)["token_ids"]) == 16


# ----------------------------------------------------------------- errors


def test_duplicate_ids_are_per_client(harness: Harness) -> None:
    h = harness
    h.submit("a", PROMPTS[0], 2)
    with pytest.raises(ProtocolError) as info:
        h.submit("a", PROMPTS[1], 2)
    error = info.value
    assert (error.code, error.field, error.request_id) == (DUPLICATE_ID, "id", "a")
    assert error.message == 'request "a" is still running'
    h.submit("a", PROMPTS[1], 3, client=C2)
    h.run()
    assert len(h.done("a", C1)["token_ids"]) == 2 and len(h.done("a", C2)["token_ids"]) == 3
    h.submit("a", PROMPTS[1], 2)  # the id is free again once its request ended
    h.replies.clear()
    h.run()
    assert len(h.done("a")["token_ids"]) == 2


def test_prompt_length_limits(harness: Harness) -> None:
    s = harness.scheduler
    with pytest.raises(ProtocolError) as info:
        s.submit(C1, GenerateRequest("long", "x", 4), list(range(1, 34)))
    error = info.value
    assert (error.code, error.field, error.request_id) == (PROMPT_TOO_LONG, "prompt", "long")
    assert error.message == "prompt is 33 tokens; the plan allows 32"
    with pytest.raises(ProtocolError) as info:
        s.submit(C1, GenerateRequest("empty", "x", 4), [])
    assert (info.value.code, info.value.message) == (PROMPT_TOO_LONG, "prompt encodes to no tokens")
    assert info.value.request_id == "empty"
    assert not s.waiting and not s.by_key  # rejected requests leave nothing behind


def test_cancel_of_an_unknown_id(harness: Harness) -> None:
    harness.submit("mine", PROMPTS[0], 2)
    for client, rid in [(C1, "other"), (C2, "mine")]:
        with pytest.raises(ProtocolError) as info:
            harness.scheduler.cancel(client, rid)
        error = info.value
        assert (error.code, error.field, error.request_id) == (UNKNOWN_ID, "id", rid)
        assert error.message == f'no running request "{rid}"'
    harness.run()


def test_full_queue_is_overloaded(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.serve.scheduler, "MAX_QUEUED", 2)
    h = harness
    h.submit("a", PROMPTS[0], 2)
    h.submit("b", PROMPTS[0], 2)
    with pytest.raises(ProtocolError) as info:
        h.submit("c", PROMPTS[0], 2)
    error = info.value
    assert (error.code, error.field, error.request_id) == (OVERLOADED, None, "c")
    assert error.message == "2 requests are waiting; retry later"
    h.admit()  # both leave the queue for group 0
    h.submit("c", PROMPTS[0], 2)  # not a duplicate: the rejected one left no trace
    h.run()
    assert {rid for _, rid in terminals(h.replies)} == {"a", "b", "c"}


def test_one_clients_cap_is_overloaded_while_others_still_queue(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime.serve.scheduler, "MAX_QUEUED_PER_CLIENT", 3)
    h = harness
    for n in range(3):
        h.submit(f"a{n}", PROMPTS[0], 2, client=C1)
    with pytest.raises(ProtocolError) as info:
        h.submit("a3", PROMPTS[0], 2, client=C1)
    assert (info.value.code, info.value.request_id) == (OVERLOADED, "a3")
    assert "3 requests waiting, the most one client may queue" in info.value.message
    h.submit("b0", PROMPTS[0], 2, client=C2)  # another client is not capped by C1's queue
    h.run()
    assert len(terminals(h.replies)) == 4


def test_a_flooding_client_does_not_starve_another(harness: Harness) -> None:
    """C1 queues 12 requests, then C2 sends one: C2's is admitted in the next free group (the
    round-robin takes one of each client's in turn), not after C1's twelve."""
    h = harness
    for n in range(12):
        h.submit(f"a{n}", PROMPTS[0], 4, client=C1, ignore_eos=True)
    h.admit()  # groups 0 and 1 take a0-a3
    h.submit("b", PROMPTS[1], 4, client=C2, ignore_eos=True)
    order: list[tuple[bytes, str]] = []

    def note_admissions(_: int) -> None:
        for key, active in h.scheduler.by_key.items():
            if active.admitted is not None and key not in order:
                order.append(key)

    h.run(on_tick=note_admissions)
    assert order.index((C2, "b")) <= 5, order  # right after a0-a3 and one more of C1's
    assert [rid for client, rid in order if client == C1] == [f"a{n}" for n in range(12)]


def test_a_failed_group_errors_its_requests_once_and_is_reused(harness: Harness) -> None:
    h = harness
    h.submit("short", PROMPTS[0], 2, ignore_eos=True)
    h.submit("long", PROMPTS[1], 16, ignore_eos=True)
    h.admit()  # group 0
    h.submit("other", PROMPTS[2], 8, ignore_eos=True)
    h.admit()  # group 1
    for _ in range(6):
        h.tick()
    assert h.done("short")["finish_reason"] == "length"
    in_flight = [h.compute(step) for step in h.queue]  # the stages ran them; results pending
    h.queue.clear()
    assert sorted(r.group for r in in_flight) == [0, 1]
    replies = h.scheduler.fail_group(0, INTERNAL, "stage 1 could not run a step: boom")
    assert replies == [
        (
            C1,
            {
                "type": "error",
                "id": "long",
                "code": INTERNAL,
                "message": "stage 1 could not run a step: boom",
            },
        )
    ]
    h.replies.extend(replies)
    assert terminals(h.replies)[C1, "long"] == replies[0][1]
    h.replies = [r for r in h.replies if r[1]["id"] != "long"]  # the id is sent again below
    assert h.scheduler.fail_group(0, INTERNAL, "again") == []
    assert h.scheduler.fail_group(7, INTERNAL, "no such group") == []
    h.submit("next", PROMPTS[3], 4, ignore_eos=True)
    h.submit("long", PROMPTS[1], 4, ignore_eos=True)  # the failed id may be sent again
    stale = next(r for r in in_flight if r.group == 0)
    assert h.deliver(stale) == ([], [])  # the failed step's result is ignored
    assert [a.request.id for a in h.scheduler.groups[0].rows] == ["next", "long"]
    for result in in_flight:
        if result.group == 1:
            h.deliver(result)
    h.run()
    assert len(h.done("next")["token_ids"]) == 4 and len(h.done("long")["token_ids"]) == 4
    assert len(h.done("other")["token_ids"]) == 8


def test_fail_all_errors_every_request_once_then_serves_again(harness: Harness) -> None:
    h = harness
    for i in range(5):
        h.submit(f"r{i}", PROMPTS[i % 4], 8)
    h.admit()
    for _ in range(3):
        h.tick()
    in_flight = [h.compute(step) for step in h.queue]
    h.queue.clear()
    replies = h.scheduler.fail_all(STAGE_FAILED, "stage 1 stopped answering")
    assert sorted(m["id"] for _, m in replies) == ["r0", "r1", "r2", "r3", "r4"]
    assert all(m["code"] == STAGE_FAILED and m["type"] == "error" for _, m in replies)
    assert h.scheduler.fail_all(STAGE_FAILED, "again") == []
    for result in in_flight:
        assert h.deliver(result) == ([], [])
    h.replies = []
    h.submit("r0", PROMPTS[0], 3)
    h.run()
    assert len(h.done("r0")["token_ids"]) == 3


def test_stale_and_malformed_results_are_ignored(harness: Harness) -> None:
    h = harness
    h.submit("a", PROMPTS[0], 4, ignore_eos=True)
    h.admit()
    result = h.compute(h.queue.popleft())
    assert h.deliver(result.with_tokens([])) == ([], [])  # no tokens: still pending
    assert h.deliver(StepHeader(9, result.seq, "prefill", (0, 1), 0, (0,), ())) == ([], [])
    vocab = h.plan.model.vocab_size
    h.scheduler.vocab_size = vocab
    assert h.deliver(result.with_tokens([vocab])) == ([], [])  # past the vocabulary
    assert h.deliver(result.with_tokens([-1])) == ([], [])
    moved = replace(result, slots=(3, 4))  # rows the group does not have
    assert h.deliver(moved) == ([], [])
    assert h.scheduler.dropped_results == 5
    _, steps = h.deliver(result)
    assert len(steps) == 1
    assert h.deliver(result) == ([], [])  # a second copy of the same result
    h.run()
    assert len(h.done("a")["token_ids"]) == 4


def test_a_forgotten_client_gets_no_more_replies(harness: Harness) -> None:
    h = harness
    h.submit("x", PROMPTS[0], 16, ignore_eos=True)
    h.admit()  # group 0
    h.submit("z", PROMPTS[1], 6, client=C2, ignore_eos=True)
    h.admit()  # group 1
    h.submit("y", PROMPTS[2], 4)  # waits
    h.submit("w", PROMPTS[3], 4, client=C2)  # waits
    for _ in range(3):
        h.tick()
    h.scheduler.forget_client(C1)
    before = len(h.replies)
    assert [a.request.id for a in h.scheduler.waiting] == ["w"]
    h.run()
    assert all(client == C2 for client, _ in h.replies[before:])
    assert set(terminals(h.replies)) == {(C2, "z"), (C2, "w")}
    assert len(h.done("w", C2)["token_ids"]) == 4
    h.replies.clear()
    h.submit("x", PROMPTS[0], 2)  # the client is welcome back with the same ids
    h.run()
    assert len(h.done("x")["token_ids"]) == 2


# ----------------------------------------------------------------- steps


def test_step_headers_follow_the_plans_layout(model: Model) -> None:
    plan = serving_plan("bard-tiny", [0, 4], batch=8, prompt_len=32, max_new=16, decode=4)
    h = Harness(model, plan)
    options: list[dict[str, Any]] = [
        {"temperature": 0.8, "top_k": 20, "top_p": 0.9, "seed": 5},
        {"temperature": 1.5, "top_p": 0.5},  # the scheduler picks the seed
        {},
        {"stop": (",",)},
        {"temperature": 0.7, "seed": MAX_SEED},
    ]
    prompts = [*PROMPTS, "JULIET:"]
    max_new = [16, 5, 7, 16, 3]
    for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
        h.submit(f"r{i}", prompt, max_new[i], ignore_eos=True, **opts)
    h.run()
    lengths = [len(model.tokenizer.encode(p)) for p in prompts]
    groups = {0: (0, 4), 1: (4, 8)}
    members = {0: [0, 1, 2, 3], 1: [4]}
    done = {i: h.done(f"r{i}") for i in range(5)}
    for group, (lo, hi) in groups.items():
        headers = [s for s in h.sent if s.group == group]
        rows = members[group]
        longest = max(lengths[i] for i in rows)
        prefill = [s for s in headers if s.phase == "prefill"]
        decode = [s for s in headers if s.phase == "decode"]
        assert headers == prefill + decode
        expected_chunks = [(lo + a, lo + min(a + 2, len(rows))) for a in range(0, len(rows), 2)]
        assert [s.slots for s in prefill] == expected_chunks
        assert all(s.past == 0 for s in prefill)
        pads = tuple(longest - lengths[i] for i in rows)
        assert sum((s.pad for s in prefill), ()) == pads
        assert all(s.slots == (lo, lo + len(rows)) and s.pad == pads for s in decode)
        assert [s.past for s in decode] == list(range(longest, longest + len(decode)))
        assert lo <= min(s.slots[0] for s in headers) and max(s.slots[1] for s in headers) <= hi
        generated = {i: len(done[i]["token_ids"]) for i in rows}
        assert len(decode) == max(generated.values()) - 1
        for step_index, s in enumerate([prefill, *([d] for d in decode)]):
            sample = sum((header.sample for header in s), ())
            for row, i in enumerate(rows):
                opts = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, **options[i]}
                expected = (
                    opts["temperature"],
                    opts["top_k"],
                    opts["top_p"],
                    done[i]["usage"]["seed"],
                    min(step_index, generated[i]),
                )
                assert sample[row] == expected
    seeds = [d["usage"]["seed"] for d in done.values()]
    assert seeds[0] == 5 and seeds[4] == MAX_SEED and 0 <= seeds[1] <= MAX_SEED
    assert [len(d["token_ids"]) for d in done.values()][:3] == [16, 5, 7]
    # Sampling replays per (seed, step): the same request alone in the other group, later.
    replay = Harness(model, plan)
    replay.submit("first", "x", 1)
    replay.admit()
    replay.submit("again", PROMPTS[0], 16, ignore_eos=True, **options[0])
    replay.run()
    assert replay.done("again")["token_ids"] == done[0]["token_ids"]
    assert [s.group for s in replay.sent if s.phase == "prefill"] == [0, 1]


def test_free_capacity_counts_the_slots_of_idle_groups(harness: Harness) -> None:
    h = harness
    total = h.scheduler.free_capacity()
    assert total == h.plan.workload.global_batch
    h.submit("a", PROMPTS[0], 4, ignore_eos=True)
    h.admit()  # the first group is now busy
    first = h.scheduler.groups[0].slots
    assert h.scheduler.free_capacity() == total - (first[1] - first[0])
    h.run()
    assert h.scheduler.free_capacity() == total
