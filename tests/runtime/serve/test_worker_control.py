"""A stage worker's control messages to the gateway, seen from a real ROUTER socket: it says
where it listens, reports load progress part by part, then that it is ready."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from runtime.serve.frames import StepHeader, decode_step, encode_step
from tests.runtime.serve.plans import serving_plan, write_plan

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[3]


def test_worker_reports_load_progress_then_ready(tmp_path: Path) -> None:
    plan = write_plan(serving_plan("bard-tiny", [0, 3]), tmp_path)  # stage 1: layers 3–7 + head
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    argv = [sys.executable, "-m", "runtime.serve.worker", "--plan", str(plan), "--stage", "1"]
    argv += ["--control", f"tcp://127.0.0.1:{port}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    worker = subprocess.Popen(argv, env=env, cwd=ROOT)
    messages: list[dict[str, object]] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(m["type"] == "ready" for m in messages):
            if router.poll(500):
                identity, payload = router.recv_multipart()
                assert identity == b"stage-1"
                messages.append(msgpack.unpackb(payload, raw=False))
            assert worker.poll() is None, "the worker exited while loading"
        kinds = [m["type"] for m in messages]
        assert kinds[:2] == ["hello", "loading"] and kinds[-1] == "ready", kinds
        progress = [(m["done"], m["total"]) for m in messages if m["type"] == "progress"]
        assert progress == [(done, 6) for done in range(7)]  # 5 layers, then the head part
        assert all(m["stage"] == 1 for m in messages)
        router.send_multipart([b"stage-1", msgpack.packb({"type": "stop"})])
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        router.close()
        ctx.term()


def test_cpu_stages_sharing_a_host_split_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.serve.launcher import (
        StageLaunch,
        available_cores,
        stage_threads,
        stages_take_turns,
    )

    assert stage_threads([0], 16) == {}  # one stage keeps torch's default
    assert stage_threads([0, 1], 16) == {0: 8, 1: 8}
    assert stage_threads([0, 1, 2], 2) == {0: 1, 1: 1, 2: 1}  # never below one
    # one micro-batch in the pipeline: the stages compute in turn, each on every core
    assert stages_take_turns(1, 1) and stages_take_turns(4, 4) and not stages_take_turns(8, 4)
    assert stage_threads([0, 1], 2, take_turns=True) == {0: 2, 1: 2}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = available_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the operator's cap
    assert available_cores() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert available_cores() == cores
    launch = StageLaunch(Path("p.json"), 1, "tcp://127.0.0.1:1", threads=4)
    assert launch.argv()[-2:] == ["--threads", "4"]


def _control(router: zmq.Socket[bytes], worker: subprocess.Popen[bytes], kind: str) -> dict:  # type: ignore[type-arg]
    """The worker's next control message of ``kind`` (others skipped), within 90 s."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker exited"
        if router.poll(200):
            _, payload = router.recv_multipart()
            message = msgpack.unpackb(payload, raw=False)
            if message["type"] == kind:
                return message  # type: ignore[no-any-return]
    raise AssertionError(f"no {kind} message")


def test_crafted_data_packets_are_dropped_and_counted_never_fatal(tmp_path: Path) -> None:
    """Steps no gateway would send (a token id past the vocabulary, a negative one, padding
    past the positions, hidden states into the first stage, a decode step of 3 tokens, bytes
    that are no step): each is refused with a step_failed report and counted in the metrics;
    the stage then runs a good step."""
    plan = write_plan(serving_plan("bard-tiny", [0, 3], batch=2, prefill=2, decode=2), tmp_path)
    ctx = zmq.Context()
    router, out, metrics = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PULL), ctx.socket(zmq.SUB)
    push = ctx.socket(zmq.PUSH)
    for sock in (router, out, metrics, push):
        sock.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    out_port = out.bind_to_random_port("tcp://127.0.0.1")
    argv = [sys.executable, "-m", "runtime.serve.worker", "--plan", str(plan), "--stage", "0"]
    argv += ["--control", f"tcp://127.0.0.1:{port}"]
    worker = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    try:
        hello = _control(router, worker, "hello")
        _control(router, worker, "ready")
        router.send_multipart([b"stage-0", msgpack.packb(
            {"type": "connect", "downstream": f"tcp://127.0.0.1:{out_port}"}
        )])  # fmt: skip
        metrics.setsockopt(zmq.SUBSCRIBE, b"")
        metrics.connect(str(hello["metrics"]))
        push.connect(str(hello["data"]))

        def step(tokens: torch.Tensor, phase: str = "prefill", pad: tuple[int, ...] = (0, 0)):  # type: ignore[no-untyped-def]
            header = StepHeader(1, 0, phase, (0, 2), 0, pad, ((0.0, 0, 1.0, 0, 0),) * 2)
            return encode_step(header, tokens)

        ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        crafted = [
            step(torch.tensor([[5, 6, 7], [8, 9, 4096]])),  # vocab is 4096
            step(torch.tensor([[5, 6, 7], [8, -1, 10]])),
            step(ids, pad=(0, 9)),
            step(torch.zeros(2, 3, 192)),
            step(ids, phase="decode"),
            [b"\x93not a step"],
        ]
        for frames in crafted:
            push.send_multipart(frames)
            failed = _control(router, worker, "step_failed")
            assert "Error" in failed["message"], failed
        push.send_multipart(step(ids))
        assert out.poll(30_000), "the good step never came out"
        header, hidden = decode_step(out.recv_multipart())
        assert header.group == 1 and hidden is not None and tuple(hidden.shape) == (2, 3, 192)
        deadline = time.monotonic() + 10
        dropped = None
        while time.monotonic() < deadline and dropped != len(crafted):
            if metrics.poll(500):
                dropped = msgpack.unpackb(metrics.recv(), raw=False)["dropped_steps"]
        assert dropped == len(crafted)
        assert worker.poll() is None
        router.send_multipart([b"stage-0", msgpack.packb({"type": "stop"})])
        assert worker.wait(30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
        for sock in (router, out, metrics, push):
            sock.close()
        ctx.term()
