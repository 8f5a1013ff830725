"""The served pipeline, end to end: real stage processes, real sockets, the real client."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import zmq
from transformers import AutoModelForCausalLM, AutoTokenizer
from zmq.utils.monitor import recv_monitor_message

from runtime.model.assets import builtin_model_dir
from runtime.model.local_chain import LocalChain
from runtime.model.stages import load_plan_stage
from runtime.quant import native
from runtime.serve.client import Client, NotAuthorized, ServerError
from runtime.serve.keys import CurveKeys, init_keys, secure_client
from runtime.serve.monitor import Monitor
from runtime.serve.protocol import pack, unpack
from tests.runtime.serve.conftest import Served, start_gateway, stop_gateway
from tests.runtime.serve.plans import serving_plan, write_plan

pytestmark = pytest.mark.multiproc

PROMPTS = ["ROMEO:", "HAMLET:\nTo be, or not to be", "First Citizen:\nWe are", "KING LEAR:\nO"]


@pytest.fixture(scope="module")
def reference() -> dict[str, list[int]]:
    """transformers generate, fp32, greedy, each prompt alone: 12 new tokens."""
    directory = builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    out = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(
                **ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        out[prompt] = gen[0, ids["input_ids"].shape[1] :].tolist()
    return out


def serve(
    tmp_path: Path, state_dir: Path, gateways: list[Served], splits: list[int], **kw
) -> Served:  # type: ignore[no-untyped-def]
    impl = kw.pop("impl", "auto")
    restarts = str(kw.pop("restarts", 3))
    extra = kw.pop("extra", ())
    plan = write_plan(serving_plan("bard-tiny", splits, **kw), tmp_path)
    served = start_gateway(plan, state_dir, "t", "--impl", impl, "--restarts", restarts, *extra)
    gateways.append(served)
    return served


def stage_metrics(served: Served, stages: int) -> dict[int, dict]:  # type: ignore[type-arg]
    """Each stage's latest metrics as the deployment publishes them (waits up to 10 s)."""
    monitor = Monitor(served.state.status_endpoint)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(monitor.metrics) < stages:
            monitor.poll(0.5)
        return dict(monitor.metrics)
    finally:
        monitor.close()


def cores() -> int:
    """The cores this host hands its stages, as an operator would count them."""
    n = len(os.sched_getaffinity(0))
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return min(n, int(cap)) if cap.isdigit() and int(cap) > 0 else n


@pytest.mark.parametrize(
    ("splits", "prefill"), [([0], 2), ([0, 3], 2), ([0, 2, 5], 2), ([0, 3], 4)]
)
def test_served_tokens_equal_transformers_generate(
    splits: list[int],
    prefill: int,
    reference: dict[str, list[int]],
    tmp_path: Path,
    state_dir: Path,
    gateways: list[Served],
) -> None:
    served = serve(tmp_path, state_dir, gateways, splits, batch=4, prefill=prefill, decode=prefill)
    with Client(served.state.client_endpoint, timeout_s=60) as client:
        done = client.generate_many(PROMPTS, max_new_tokens=12, ignore_eos=True)
    for prompt, completion in zip(PROMPTS, done, strict=True):
        assert completion.token_ids == reference[prompt], prompt
        assert completion.finish_reason == "length"
        assert completion.usage["completion_tokens"] == 12
    if len(splits) > 1:
        # CPU stages on one host run on an even share of its cores each, or on all of them when
        # the whole batch is one micro-batch (the stages then take turns)
        share = cores() if prefill >= 4 else max(1, cores() // len(splits))
        metrics = stage_metrics(served, len(splits))
        assert [metrics[i]["threads"] for i in range(len(splits))] == [share] * len(splits)


def test_3_bit_stages_serve_what_the_same_layers_give_in_one_process(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    plan = serving_plan("bard-tiny", [0, 3], bits=3, batch=4, prefill=4, decode=4)
    served = start_gateway(write_plan(plan, tmp_path), state_dir, "t")
    gateways.append(served)
    chain = LocalChain([load_plan_stage(plan, k) for k in range(2)])
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    with Client(served.state.client_endpoint, timeout_s=60) as client:
        for prompt in PROMPTS[:2]:
            ids = tokenizer(prompt, return_tensors="pt")
            with torch.inference_mode():
                ours = chain.greedy(ids["input_ids"], ids["attention_mask"], 12).tokens[0]
            assert client.generate(prompt, max_new_tokens=12, ignore_eos=True).token_ids == (
                ours.tolist()
            ), prompt
    metrics = stage_metrics(served, 2)
    in_process = {str(k): v for s in chain.shards for k, v in s.kernel_paths().items()}
    assert {**metrics[0]["kernel_paths"], **metrics[1]["kernel_paths"]} == in_process
    kernels = native.kernels()
    if kernels is not None and kernels.stream_dot:  # the 3-bit kernel, not dequantization
        assert {p for paths in in_process.values() for p in paths} == {"native-int3"}


def test_streaming_sampling_stop_and_cancel(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    served = serve(tmp_path, state_dir, gateways, [0, 4], impl="auto", max_new=48)
    with Client(served.state.client_endpoint, timeout_s=60) as client:
        whole = client.generate(
            "ROMEO:", max_new_tokens=40, temperature=0.9, seed=7, ignore_eos=True
        )
        pieces = []
        stream = client.stream(
            "ROMEO:", max_new_tokens=40, temperature=0.9, seed=7, ignore_eos=True
        )
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as end:
                final = end.value
                break
        assert "".join(pieces) == final.text == whole.text  # same seed, same text
        assert final.token_ids == whole.token_ids and len(pieces) > 1

        others = client.generate_many(["ROMEO:"] * 3, max_new_tokens=40, temperature=0.9, seed=8)
        assert len({tuple(c.token_ids) for c in others}) == 1  # batch-mates do not matter
        assert others[0].token_ids != whole.token_ids

        stop = whole.text[10:14]
        cut = client.generate(
            "ROMEO:", max_new_tokens=40, temperature=0.9, seed=7, stop=[stop], ignore_eos=True
        )
        assert cut.finish_reason == "stop"
        assert cut.text == whole.text[: whole.text.index(stop)]

        long_id = client.submit("ROMEO:", max_new_tokens=48, ignore_eos=True, stream=True)
        client.cancel(long_id)
        while (message := client.receive())["type"] != "done":
            assert message["id"] == long_id
        assert message["finish_reason"] == "cancelled"


def test_bad_requests_get_errors_and_service_goes_on(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    served = serve(tmp_path, state_dir, gateways, [0, 4], impl="auto", prompt_len=16, max_new=8)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(served.state.client_endpoint)

    def ask(*frames: bytes) -> dict:  # type: ignore[type-arg]
        sock.send_multipart(list(frames))
        assert sock.poll(10_000), "no reply"
        return unpack(sock.recv())

    good = {"type": "generate", "id": "g", "prompt": "ROMEO:", "max_new_tokens": 4}
    cases = [
        ({**good, "colour": 1}, "unknown_field", "colour"),
        ({**good, "max_new_tokens": 0}, "bad_field", "max_new_tokens"),
        ({**good, "max_new_tokens": 9}, "bad_field", "max_new_tokens"),
        ({**good, "max_new_tokens": "4"}, "bad_field", "max_new_tokens"),
        ({**good, "prompt": ""}, "bad_field", "prompt"),
        ({**good, "prompt": "word " * 40}, "prompt_too_long", "prompt"),
        ({**good, "temperature": -1}, "bad_field", "temperature"),
        ({**good, "top_p": 0}, "bad_field", "top_p"),
        ({**good, "stop": "x"}, "bad_field", "stop"),
        ({k: v for k, v in good.items() if k != "prompt"}, "missing_field", "prompt"),
        ({"type": "fly", "id": "g"}, "unknown_type", "type"),
        ({"type": "cancel", "id": "nope"}, "unknown_id", "id"),
    ]
    try:
        for message, code, field in cases:
            reply = ask(pack(message))
            assert (reply["type"], reply["code"], reply.get("field")) == ("error", code, field)
            assert reply["id"] == message.get("id"), reply
        assert ask(b"\xc1not msgpack")["code"] == "bad_message"
        assert ask(pack([1, 2]))["code"] == "bad_message"
        assert ask(pack(good), pack(good))["code"] == "bad_message"
        assert ask(b"\x00" * ((1 << 20) + 1))["code"] == "frame_too_large"
        reply = ask(pack(good))
        while reply["type"] != "done":
            reply = unpack(sock.recv()) if sock.poll(10_000) else {"type": "timeout"}
        assert reply["finish_reason"] in ("length", "eos") and reply["id"] == "g"
    finally:
        sock.close()
        ctx.term()


def test_a_dead_stage_fails_requests_and_stops_everything(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    served = serve(tmp_path, state_dir, gateways, [0, 4], impl="auto", max_new=48, restarts=0)
    stages = served.stage_pids()
    assert len(stages) == 2
    with Client(served.state.client_endpoint, timeout_s=15) as client:
        first = client.submit("ROMEO:", max_new_tokens=48, ignore_eos=True, stream=True)
        assert client.receive()["type"] == "token"
        os.kill(stages[1], signal.SIGKILL)
        started = time.monotonic()
        while (message := client.receive())["type"] == "token":
            pass
        assert message["type"] == "error" and message["id"] == first
        assert message["code"] == "stage_failed"
        assert "stage 1 (cpu on 127.0.0.1, layers 4–7)" in message["message"]
        assert time.monotonic() - started < 5
    assert served.process.wait(timeout=15) == 4
    assert not (state_dir / "t.json").exists()


def test_a_dead_stage_is_restarted_and_service_resumes(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    served = serve(tmp_path, state_dir, gateways, [0, 4], impl="auto", max_new=48)
    with Client(served.state.client_endpoint, timeout_s=30) as client:
        before = client.generate("KING:", max_new_tokens=16, ignore_eos=True)
        first = client.submit("ROMEO:", max_new_tokens=48, ignore_eos=True, stream=True)
        assert client.receive()["type"] == "token"
        os.kill(served.stage_pids()[0], signal.SIGKILL)
        while (message := client.receive())["type"] == "token":
            pass
        assert (message["type"], message["id"], message["code"]) == ("error", first, "stage_failed")
        assert "stage 0 (cpu on localhost, layers 0–3) exited with code -9" in message["message"]
        # Sent while the stage reloads: waits, then is served by the restarted stage.
        after = client.generate("KING:", max_new_tokens=16, ignore_eos=True)
        assert after.token_ids == before.token_ids
        assert client.info()["state"] == "serving"
    assert served.process.poll() is None
    assert len(served.stage_pids()) == 2


def _wait_serving(client: Client, served: Served, within_s: float = 60) -> None:
    deadline = time.monotonic() + within_s
    while client.info()["state"] != "serving":
        assert served.process.poll() is None, served.log()
        assert time.monotonic() < deadline, served.log()
        time.sleep(0.1)


def _failure_of(client: Client, request: str) -> tuple[dict, float]:  # type: ignore[type-arg]
    """The error that ends a streamed request, and how long after the call it came."""
    started = time.monotonic()
    while (message := client.receive())["type"] == "token":
        pass
    assert (message["type"], message["id"]) == ("error", request), message
    return message, time.monotonic() - started


def test_a_hung_stage_fails_its_requests_within_5_s_and_is_restarted(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    """SIGSTOP: the process lives but answers nothing. With apply's defaults (1 s heartbeats,
    lost after 4 s of silence) the request in flight fails within 5 s, naming the stage and the
    silence; the stage is replaced and the next request is served."""
    served = serve(tmp_path, state_dir, gateways, [0, 4], impl="auto", max_new=48)
    with Client(served.state.client_endpoint, timeout_s=30) as client:
        before = client.generate("KING:", max_new_tokens=16, ignore_eos=True)
        first = client.submit("ROMEO:", max_new_tokens=48, ignore_eos=True, stream=True)
        assert client.receive()["type"] == "token"
        hung = served.stage_pids()[1]
        os.kill(hung, signal.SIGSTOP)
        try:
            message, took = _failure_of(client, first)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        assert message["code"] == "stage_failed" and took < 5, (message, took)
        assert (
            "stage 1 (cpu on 127.0.0.1, layers 4–7) sent no heartbeat for 4 s"
            in (message["message"])
        )
        after = client.generate("KING:", max_new_tokens=16, ignore_eos=True)
        assert after.token_ids == before.token_ids
    assert hung not in served.stage_pids() and len(served.stage_pids()) == 2


def test_stage_failures_count_in_a_sliding_window_each_with_its_own_reason(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    """--restarts 1 --restart-window 4: a failure restarts the stage; another one more than
    4 s later is restarted too (the first one is forgotten) and reported with its own reason;
    a third within 4 s of the second ends the deployment, saying why."""
    served = serve(tmp_path, state_dir, gateways, [0, 4], impl="auto", max_new=48,
                   restarts=1, extra=("--restart-window", "4"))  # fmt: skip
    with Client(served.state.client_endpoint, timeout_s=30) as client:
        request = client.submit("ROMEO:", max_new_tokens=48, ignore_eos=True, stream=True)
        assert client.receive()["type"] == "token"
        os.kill(served.stage_pids()[1], signal.SIGKILL)
        first_failure = time.monotonic()
        message, _ = _failure_of(client, request)
        assert "exited with code -9" in message["message"]
        _wait_serving(client, served)
        time.sleep(max(0.0, first_failure + 4.5 - time.monotonic()))

        request = client.submit("ROMEO:", max_new_tokens=48, ignore_eos=True, stream=True)
        assert client.receive()["type"] == "token"
        hung = served.stage_pids()[1]
        os.kill(hung, signal.SIGSTOP)
        message, _ = _failure_of(client, request)
        assert "sent no heartbeat" in message["message"], message  # not the old reason
        assert "exited with code" not in message["message"], message
        _wait_serving(client, served)
        status = Monitor(served.state.status_endpoint)
        try:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not status.status:
                status.poll(0.5)
            stage = status.status["stages"][1]  # type: ignore[index]
            assert stage["restarts"] == 2 and stage["error"] is None
            assert "sent no heartbeat" in stage["last_failure"]
        finally:
            status.close()

        request = client.submit("ROMEO:", max_new_tokens=48, ignore_eos=True, stream=True)
        assert client.receive()["type"] == "token"
        os.kill(served.stage_pids()[0], signal.SIGKILL)
        message, _ = _failure_of(client, request)
        assert "2 stage failures within 4 s; at most 1 are restarted" in message["message"]
    assert served.process.wait(timeout=15) == 4


def _peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_an_oversize_frame_drops_its_sender_before_the_gateway_holds_it(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    """A 256 MiB frame, 4× the documented 64 MiB limit: the limit is set before the socket
    binds, so the connection is dropped as the frame's size arrives and the gateway's peak
    memory stays well below the frame; other clients are served."""
    served = serve(tmp_path, state_dir, gateways, [0])
    before = _peak_rss_bytes(served.process.pid)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(served.state.client_endpoint)
    try:
        sock.send(bytes(256 << 20), copy=False)
        time.sleep(2)
    finally:
        sock.close()
        ctx.term()
    assert _peak_rss_bytes(served.process.pid) - before < 96 << 20
    with Client(served.state.client_endpoint, timeout_s=30) as client:
        assert len(client.generate("ROMEO:", max_new_tokens=4, ignore_eos=True).token_ids) == 4
    assert served.process.poll() is None


def test_shutdown_leaves_no_process_or_socket(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    served = serve(tmp_path, state_dir, gateways, [0, 4], impl="auto")
    stages = served.stage_pids()
    endpoint = served.state.client_endpoint
    assert stop_gateway(served.process) == 0
    for pid in stages:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (state_dir / "t.json").exists()
    probe = zmq.Context().socket(zmq.REP)
    probe.bind(endpoint)  # the port is free again
    probe.close(linger=0)


def test_server_error_type_in_client(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    served = serve(tmp_path, state_dir, gateways, [0], impl="auto", max_new=8)
    with Client(served.state.client_endpoint, timeout_s=30) as client:
        with pytest.raises(ServerError) as err:
            client.generate("ROMEO:", max_new_tokens=100)
        assert err.value.code == "bad_field" and err.value.field == "max_new_tokens"


def test_curve_keys_admit_only_authorized_clients(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    keys = tmp_path / "keys"
    init_keys(keys)
    plan = write_plan(serving_plan("bard-tiny", [0, 4], max_new=8), tmp_path)
    served = start_gateway(plan, state_dir, "t", keys=keys)
    gateways.append(served)
    with Client(served.state.client_endpoint, keys=keys, timeout_s=30) as client:
        assert client.generate("ROMEO:", max_new_tokens=4).usage["completion_tokens"] >= 1

    stranger = tmp_path / "stranger"
    init_keys(stranger)
    (stranger / "server.key").write_bytes((keys / "server.key").read_bytes())
    for other, why in ((None, "another security mechanism"), (stranger, "refused this client")):
        # plain TCP, or CURVE with a key not in authorized/: refused at once, not left waiting
        started = time.monotonic()
        with (
            Client(served.state.client_endpoint, keys=other, timeout_s=30) as client,
            pytest.raises(NotAuthorized, match=why),
        ):
            client.info()
        assert time.monotonic() - started < 5

    monitor = Monitor.of(served.state)  # the deployment's own keys: a client key is refused
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 1 not in monitor.metrics:
            monitor.poll(0.5)
        assert monitor.status is not None and monitor.status["phase"] == "serving"
        assert monitor.metrics[1]["stage"] == 1  # stage metrics are encrypted too
        status = monitor.status
    finally:
        monitor.close()

    # Roles: the client's key (in the operator's authorized/) reaches the client endpoint only.
    # Every internal socket (the gateway's control and status, each stage's data and metrics)
    # refuses it, so it cannot forge a stage's message; the deployment's own keys are admitted.
    stage = status["stages"][0]
    argv = Path(f"/proc/{stage['pid']}/cmdline").read_bytes().split(b"\0")
    control = argv[argv.index(b"--control") + 1].decode()
    internal = [
        (control, zmq.DEALER),
        (served.state.status_endpoint, zmq.SUB),
        (stage["metrics"], zmq.SUB),
        (status["stages"][1]["metrics"], zmq.SUB),
    ]
    client_keys = CurveKeys.load(keys, "client")
    own_keys = CurveKeys.load(Path(served.state.internal_keys or ""), "client")
    # the client's keypair, even with the internal sockets' public key (public keys leak)
    intruder = replace(client_keys, server_public=own_keys.server_public)
    assert handshake(served.state.client_endpoint, zmq.DEALER, client_keys) == "ok"
    for endpoint, kind in internal:
        assert handshake(endpoint, kind, intruder) == "refused", endpoint
        assert handshake(endpoint, kind, own_keys) == "ok", endpoint
    member = replace(own_keys, server_public=client_keys.server_public)
    assert handshake(served.state.client_endpoint, zmq.DEALER, member) == "refused"


def handshake(endpoint: str, kind: int, keys: CurveKeys) -> str:
    """How a CURVE handshake with ``keys`` at ``endpoint`` ends: "ok" or "refused"."""
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    try:
        secure_client(sock, keys)
        events = sock.get_monitor_socket()
        sock.connect(endpoint)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if events.poll(100):
                event = recv_monitor_message(events)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return "ok"
                if event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                    return "refused"
        return "no handshake"
    finally:
        sock.disable_monitor()
        ctx.destroy(linger=0)


def test_requests_sent_together_are_admitted_together(
    tmp_path: Path, state_dir: Path, gateways: list[Served]
) -> None:
    """One decode group of 4: four prompts sent in a burst (about a millisecond apart) share
    its prefill, so none waits for the others to finish; a fifth, over the batch, waits."""
    served = serve(tmp_path, state_dir, gateways, [0], batch=4, prefill=4, decode=4)
    with Client(served.state.client_endpoint, timeout_s=60) as client:
        ids = []
        for prompt in [*PROMPTS, "MACBETH:"]:
            ids.append(client.submit(prompt, max_new_tokens=12, ignore_eos=True))
            pause = time.perf_counter() + 0.0012
            while time.perf_counter() < pause:  # a busy wait: sleep() may overshoot
                pass
        done = [client.wait(i) for i in ids]
    together, last = done[:4], done[4]
    wave = min(c.usage["total_s"] - c.usage["queued_s"] for c in together)
    assert all(c.usage["queued_s"] < wave / 2 for c in together), [c.usage for c in done]
    assert last.usage["queued_s"] >= wave / 2


def test_a_gateway_that_cannot_start_leaves_no_socket_directory(tmp_path: Path) -> None:
    """A start refused before serving (here a name no deployment may have) exits 1 with the
    reason, and removes the private socket directory it had made for this start."""
    import subprocess
    import sys

    from tests.runtime.serve.conftest import ROOT

    plan = write_plan(serving_plan("bard-tiny", [0]), tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), PQCTL_STATE_DIR=str(tmp_path / "state"))
    env["PYTHONPATH"] = str(ROOT)
    run = subprocess.run(
        [sys.executable, "-m", "runtime.serve.gateway", "--plan", str(plan), "--name", "a b"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert 'deployment name "a b" must be' in run.stderr and "Traceback" not in run.stderr
    assert list(scratch.iterdir()) == []
