"""Fuzzing a running deployment's client endpoint: malformed and mutated messages at full speed.

The built-in model in two 16-bit stages, served by a real gateway and stage processes on this
host. One connection sends N messages (default 20 000): random bytes, several frames at once,
msgpack values of every kind, and valid ``generate`` / ``cancel`` / ``info`` messages with one
to three fields replaced by random values or removed; meanwhile it reads every reply. Printed:
messages/s, replies (and by error code), crashes (a gateway or stage process that exited or was
restarted), the gateway's resident memory before and after, and whether a valid request sent
afterwards is served. A crash or a lost valid request makes the run fail (exit 1).

Usage: python bench/fuzz.py [--quick] [--messages 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving_util import start_deployment  # noqa: E402
from runtime.serve.client import Client  # noqa: E402
from runtime.serve.monitor import Monitor  # noqa: E402
from tests.runtime.serve.conftest import stop_gateway  # noqa: E402
from tests.runtime.serve.plans import serving_plan, write_plan  # noqa: E402

VALID: list[dict[str, Any]] = [
    {"type": "generate", "id": "g", "prompt": "ROMEO:", "max_new_tokens": 4},
    {"type": "generate", "id": "s", "prompt": "KING:", "max_new_tokens": 2, "stream": False,
     "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3, "stop": ["\n"]},
    {"type": "cancel", "id": "g"},
    {"type": "info", "id": "i"},
]  # fmt: skip
FIELDS = ["type", "id", "prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
          "stop", "stream", "ignore_eos", "junk"]  # fmt: skip


def random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 2**64 - 1, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.0, -1.5, 1e308, float("inf"), float("nan"), rng.random() * 200])
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return rng.randbytes(rng.randrange(0, 40))
    if kind == 6:
        return "x" * rng.choice([0, 1, 128, 129, 5000])
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {str(random_value(rng, 2)): random_value(rng, depth + 1) for _ in range(3)}


def fuzzed(rng: random.Random, n: int) -> list[bytes]:
    """One fuzzed message: its frames."""
    roll = rng.random()
    if roll < 0.1:
        return [rng.randbytes(rng.randrange(0, 200))]
    if roll < 0.15:
        return [msgpack.packb(random_value(rng), use_bin_type=True) for _ in range(2)]
    if roll < 0.25:
        return [msgpack.packb(random_value(rng), use_bin_type=True)]
    message = dict(rng.choice(VALID))
    message["id"] = f"{message['id']}{n}"
    for _ in range(rng.randrange(1, 4)):
        name = rng.choice(FIELDS)
        if rng.random() < 0.25:
            message.pop(name, None)
        else:
            message[name] = random_value(rng)
    return [msgpack.packb(message, use_bin_type=True)]


def gateway_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    return 0


def restarts(endpoint: str) -> int:
    monitor = Monitor(endpoint)
    try:
        deadline = time.monotonic() + 5
        while monitor.status is None and time.monotonic() < deadline:
            monitor.poll(0.2)
        stages = (monitor.status or {}).get("stages", [])
        return sum(int(s.get("restarts", 0)) for s in stages)
    finally:
        monitor.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 000 messages")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    total = 2_000 if args.quick else args.messages
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = serving_plan("bard-tiny", [0, 4], batch=4, max_new=8)
        served = start_deployment(write_plan(plan, root), root, "fuzz", {})
        try:
            state = served.state
            before = gateway_rss(served.process.pid)
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(state.client_endpoint)
            codes: collections.Counter[str] = collections.Counter()
            replies = 0
            started = time.monotonic()
            for n in range(total):
                sock.send_multipart(fuzzed(rng, n))
                while sock.poll(0):
                    reply = msgpack.unpackb(sock.recv(), raw=False)
                    replies += 1
                    codes[reply.get("code") or reply.get("type")] += 1
            sent_s = time.monotonic() - started
            quiet = time.monotonic()
            while time.monotonic() - quiet < 3:  # read until 3 s pass without a reply
                if sock.poll(200):
                    reply = msgpack.unpackb(sock.recv(), raw=False)
                    replies += 1
                    codes[reply.get("code") or reply.get("type")] += 1
                    quiet = time.monotonic()
            ctx.destroy(linger=0)
            after = gateway_rss(served.process.pid)
            crashes = int(served.process.poll() is not None) + restarts(state.status_endpoint)
            with Client(state.client_endpoint, timeout_s=60) as client:
                done = client.generate("ROMEO:", max_new_tokens=4)
            served_ok = done.usage["completion_tokens"] >= 1
        finally:
            stop_gateway(served.process)
    common = ", ".join(f"{code} {count}" for code, count in codes.most_common(8))
    print(f"sent {total} messages in {sent_s:.1f} s: {total / sent_s:,.0f} messages/s")
    print(f"replies {replies}: {common}")
    print(f"gateway RSS {before / 2**20:.0f} MiB before, {after / 2**20:.0f} MiB after")
    print(f"crashes {crashes}; a valid request afterwards: {'served' if served_ok else 'FAILED'}")
    return 0 if crashes == 0 and served_ok else 1


if __name__ == "__main__":
    sys.exit(main())
