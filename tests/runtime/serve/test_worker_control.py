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
import zmq

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


def test_cpu_stages_sharing_a_host_split_its_cores() -> None:
    from runtime.serve.launcher import StageLaunch, stage_threads

    assert stage_threads([0], 16) == {}  # one stage keeps torch's default
    assert stage_threads([0, 1], 16) == {0: 8, 1: 8}
    assert stage_threads([0, 1, 2], 2) == {0: 1, 1: 1, 2: 1}  # never below one
    launch = StageLaunch(Path("p.json"), 1, "tcp://127.0.0.1:1", threads=4)
    assert launch.argv()[-2:] == ["--threads", "4"]
