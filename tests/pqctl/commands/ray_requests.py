"""A client that keeps asking while a host is lost, from inside a Ray cluster's namespace: run as
``python -m tests.pqctl.commands.ray_requests NAME KEYS PROMPT`` (by ``test_apply_ray.py``).
It prints ``ready`` once a request is answered, then asks every 0.2 s until one is answered
after at least one was refused (150 s at most), and prints one JSON line: each refusal's error
code and how long it took to come, and the tokens of the answer."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from runtime.serve.client import Client, ServerError


def main() -> int:
    name, keys, prompt = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    with Client(name=name, keys=keys, timeout_s=30) as client:
        client.generate(prompt, max_new_tokens=12, ignore_eos=True)
        print("ready", flush=True)
        refusals: list[tuple[str, float]] = []
        answer: list[int] | None = None
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                done = client.generate(prompt, max_new_tokens=12, ignore_eos=True)
            except ServerError as exc:
                refusals.append((exc.code, time.monotonic() - started))
            else:
                if refusals:
                    answer = done.token_ids
                    break
            time.sleep(0.2)
    print(json.dumps({"refusals": refusals, "tokens": answer}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
