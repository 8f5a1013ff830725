"""Time of one activation hop between two stage processes of this host, over ZeroMQ.

The data path of a pipeline is PUSH/PULL over TCP; this module measures it as the serving code
uses it: a small header frame and a raw payload frame sent with ``copy=False`` from this
process to a child Python process over loopback TCP, which sends both frames straight back.
Half the round trip (the shortest of ``repeats``) is one hop. Every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

import zmq

from runtime.errors import RuntimeFailure

_ECHO = """
import sys, zmq
ctx = zmq.Context()
pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
for s in (pull, push):
    s.linger = 0
pull.connect(sys.argv[1]); push.connect(sys.argv[2])
if pull.poll(int(sys.argv[3])):
    while True:
        frames = pull.recv_multipart(copy=False)
        if len(frames) == 1:
            break
        push.send_multipart(frames, copy=False)
        if not pull.poll(int(sys.argv[3])):
            break
ctx.destroy(linger=0)
"""


class HopTimingError(RuntimeFailure):
    """The echo process did not answer in time."""

    title = "cannot time the activation hop"


def activation_frame_sizes(hidden_size: int, dtype_bytes: int = 4) -> tuple[int, ...]:
    """Payload sizes of typical hops for a model width, bytes: one decode token, a decode
    micro-batch of 16, and prefill micro-batches of 128 and 2048 tokens."""
    return tuple(hidden_size * dtype_bytes * tokens for tokens in (1, 16, 128, 2048))


def measure_hop(
    sizes_bytes: Sequence[int], repeats: int = 10, timeout_s: float = 10.0
) -> list[tuple[int, float]]:
    """One-way time of a header plus a payload of each size, (bytes, seconds) per size.

    Args:
        sizes_bytes: payload sizes, bytes.
        repeats: timed round trips per size (the shortest counts), after one warm-up.
        timeout_s: longest wait for any one frame or for the echo process, seconds.

    Raises:
        HopTimingError: the echo process did not start or answer within ``timeout_s``.
    """
    ctx = zmq.Context()
    out, back = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for sock in (out, back):
        sock.linger = 0
    out_port = out.bind_to_random_port("tcp://127.0.0.1")
    back_port = back.bind_to_random_port("tcp://127.0.0.1")
    wait_ms = int(timeout_s * 1000)
    args = [f"tcp://127.0.0.1:{out_port}", f"tcp://127.0.0.1:{back_port}", str(wait_ms)]
    echo = subprocess.Popen([sys.executable, "-c", _ECHO, *args])
    try:
        return [(n, _one_way_s(out, back, n, repeats, wait_ms)) for n in sizes_bytes]
    finally:
        out.send(b"stop")
        try:
            echo.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            echo.kill()
            echo.wait(timeout=timeout_s)
        ctx.destroy(linger=0)


def _one_way_s(
    out: zmq.Socket[bytes], back: zmq.Socket[bytes], size: int, repeats: int, wait_ms: int
) -> float:
    header = b'{"shape": [%d], "dtype": "uint8"}' % size
    payload = bytearray(size)
    best = float("inf")
    for k in range(repeats + 1):
        start = time.perf_counter()
        out.send_multipart([header, payload], copy=False)
        if not back.poll(wait_ms):
            raise HopTimingError(f"no echo of a {size}-byte frame within {wait_ms} ms")
        back.recv_multipart(copy=False)
        if k:
            best = min(best, (time.perf_counter() - start) / 2)
    return best
