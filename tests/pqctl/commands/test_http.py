"""The OpenAI-compatible HTTP endpoint (``pqctl apply --http``), driven by OpenAI's own Python
client: one deployment, started and stopped with the CLI as a user does, serves every test."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from runtime.serve.deployment import DeploymentState
from tests.runtime.serve.plans import serving_plan, write_plan

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[3]
KEY = "test-key-0123"
NAME = "httptest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pqctl(state: Path, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PQCTL_STATE_DIR=str(state))
    env.pop("PQCTL_API_KEY", None)
    if key is not None:
        env["PQCTL_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "pqctl", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def _http(
    base: str, method: str, path: str, body: object = None, key: str | None = None
) -> tuple[int, str]:
    """One request with the standard library's client: status and body text."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        connection.request(method, path, None if body is None else json.dumps(body), headers)
        reply = connection.getresponse()
        return reply.status, reply.read().decode()
    finally:
        connection.close()


LONG = 400
"""The plan's new tokens a request may ask for (64 + 400 within bard-tiny's 512 positions)."""


class Served:
    def __init__(self, state: Path, base: str) -> None:
        self.state, self.base = state, base

    def client(self, key: str | None = KEY, **options: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, **options)  # type: ignore[arg-type]

    def metrics(self) -> str:
        status, text = _http(self.base, "GET", "/metrics", key=KEY)
        assert status == 200
        return text


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("http")
    state = tmp / "state"
    plan_file = write_plan(
        serving_plan("bard-tiny", [0, 4], batch=8, prompt_len=64, max_new=LONG, decode=4), tmp
    )
    port = _free_port()
    up = _pqctl(
        state,
        "apply", str(plan_file), "--detach", "--name", NAME,
        "--endpoint", "tcp://127.0.0.1:*", "--http", f"127.0.0.1:{port}",
        key=KEY,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert f"http://127.0.0.1:{port}/v1 (OpenAI API)" in up.stderr
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the endpoint binds at once, serves once ready
            try:
                if _http(base, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("the HTTP endpoint never reported healthy")
        assert DeploymentState.load(NAME, state).http_endpoint == f"127.0.0.1:{port}"
        listed = _pqctl(state, "status", "--json", "--name", NAME)
        assert [row["http"] for row in json.loads(listed.stdout)] == [f"{base}/v1"]
        yield Served(state, base)
    finally:
        down = _pqctl(state, "stop", "--name", NAME)
        assert down.returncode in (0, 5), down.stderr
        if up.returncode == 0:
            assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 10  # nothing of the deployment keeps the port
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    pass
            except OSError:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the HTTP endpoint outlived pqctl stop")


def test_greedy_completions_equal_pqctl_generate(served: Served) -> None:
    cli = _pqctl(served.state, "generate", "--name", NAME, "--max-new", "12", "--json", "ROMEO:")
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    client = served.client()
    whole = client.completions.create(
        model="bard-tiny", prompt="ROMEO:", max_tokens=12, temperature=0
    )
    assert whole.choices[0].text == expected["text"]
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    parts = client.completions.create(
        model="bard-tiny", prompt="ROMEO:", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in parts) == expected["text"]
    models = client.models.list()
    assert [m.id for m in models.data] == ["bard-tiny"]


def test_chat_streams_what_it_answers_whole(served: Served) -> None:
    client = served.client()
    messages = [
        {"role": "system", "content": "You are a player."},
        {"role": "user", "content": "Speak, [Exit] 100%"},
    ]
    whole = client.chat.completions.create(
        model="bard-tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        seed=3,  # type: ignore[arg-type]
    )
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content
    assert whole.usage is not None and whole.usage.completion_tokens <= 10
    stream = client.chat.completions.create(
        model="bard-tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    # a stop string ends the answer before it, as OpenAI's does
    cut = client.chat.completions.create(
        model="bard-tiny",
        messages=messages,
        max_tokens=10,
        temperature=0,
        stop=[text[3:6]],  # type: ignore[arg-type]
    )
    assert cut.choices[0].message.content == text[: text.index(text[3:6])]
    assert cut.choices[0].finish_reason == "stop"


def test_bad_fields_missing_key_and_other_models_are_refused_as_openai_does(
    served: Served,
) -> None:
    client = served.client()
    for fields, param in (
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10_000}, "max_tokens"),  # past the plan's max_new_tokens
        ({"temperature": 5}, "temperature"),
        ({"n": 2}, "n"),
        ({"top_p": "x"}, "top_p"),
        ({"logprobs": 3}, "logprobs"),
        ({"extra_body": {"bogus": 1}}, "bogus"),
    ):
        with pytest.raises(openai.BadRequestError) as bad:
            client.completions.create(model="bard-tiny", prompt="ROMEO:", **fields)  # type: ignore[call-overload]
        assert bad.value.status_code == 400
        assert bad.value.body["param"] == param, (fields, bad.value.body)  # type: ignore[index]
        assert param in bad.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="bard-tiny", messages=[], max_tokens=4)
    assert bad.value.body["param"] == "messages"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="ROMEO:", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").completions.create(model="bard-tiny", prompt="x", max_tokens=2)
    assert _http(served.base, "POST", "/v1/completions", {})[0] == 401
    assert _http(served.base, "GET", "/metrics")[0] == 401
    health = _http(served.base, "GET", "/health")  # no key needed
    assert health[0] == 200 and json.loads(health[1]) == {"status": "serving"}


def test_32_concurrent_streams_are_all_answered(served: Served) -> None:
    async def one(client: openai.AsyncOpenAI, k: int) -> tuple[str, str | None]:
        stream = await client.completions.create(
            model="bard-tiny", prompt=f"KING {k}:", max_tokens=6, temperature=0, stream=True
        )
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def everyone() -> list[tuple[str, str | None]]:
        client = openai.AsyncOpenAI(
            base_url=served.base + "/v1", api_key=KEY, max_retries=0, timeout=120
        )
        async with client:
            return await asyncio.gather(*(one(client, k) for k in range(32)))

    results = asyncio.run(asyncio.wait_for(everyone(), 150))
    assert len(results) == 32
    assert all(text and finish in ("length", "stop") for text, finish in results), results


def _cancelled(metrics: str) -> float:
    found = re.search(
        r'pqctl:request_success_total\{[^}]*finished_reason="cancelled"[^}]*\} (\S+)', metrics
    )
    return float(found.group(1)) if found else 0.0


def test_a_client_leaving_mid_stream_cancels_its_request(served: Served) -> None:
    before = _cancelled(served.metrics())
    # a long request: it must still be running when the server sees the client gone (48 tokens of
    # bard-tiny could all be sent before that on a loaded machine, and the request end normally)
    body = {"model": "bard-tiny", "prompt": "ROMEO:", "max_tokens": LONG, "stream": True,
            "temperature": 0, "stop": ["never-in-this-text"]}  # fmt: skip
    host, port = served.base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    try:
        connection.request("POST", "/v1/completions", json.dumps(body), headers)
        reply = connection.getresponse()
        assert reply.status == 200
        assert reply.readline().startswith(b"data: ")
    finally:
        connection.close()
    # the connection is closed after one event: the scheduler ends the request as cancelled
    deadline = time.monotonic() + 15
    while _cancelled(served.metrics()) <= before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.3)


def test_metrics_speak_prometheus_with_vllm_names(served: Served) -> None:
    client = served.client()
    client.completions.create(model="bard-tiny", prompt="ROMEO:", max_tokens=4, temperature=0)
    text = ""
    deadline = time.monotonic() + 10
    while 'source="measured"' not in text or "time_to_first_token_seconds_count" not in text:
        assert time.monotonic() < deadline, text
        time.sleep(0.5)
        text = served.metrics()
    for name in (
        "pqctl:num_requests_running",
        "pqctl:num_requests_waiting",
        "pqctl:time_to_first_token_seconds_bucket",
        "pqctl:time_per_output_token_seconds_bucket",
        "pqctl:e2e_request_latency_seconds_bucket",
        "pqctl:generation_tokens_total",
        "pqctl:stage_busy_ratio",
        "pqctl:stage_queue_depth",
        "pqctl:stage_restarts_total",
        "pqctl:gateway_restarts_total",
    ):
        assert name in text, name
    for stage in ("0", "1"):
        for source in ("measured", "predicted"):
            assert re.search(
                rf'pqctl:stage_decode_tokens_per_second\{{[^}}]*source="{source}"[^}}]*stage="{stage}"',
                text,
            ), (stage, source)
    bad = _http(served.base, "POST", "/v1/completions", {"model": "bard-tiny", "prompt": "x"}, KEY)
    assert bad[0] == 200  # max_tokens defaults to OpenAI's 16


def test_while_a_stage_restarts_requests_get_503_then_are_served_again(served: Served) -> None:
    """Last in this module: it kills a stage of the shared deployment."""
    listed = json.loads(_pqctl(served.state, "status", "--json", "--name", NAME).stdout)
    stage_pid = listed[0]["stages"][1]["pid"]
    os.kill(stage_pid, signal.SIGKILL)
    body = {"model": "bard-tiny", "prompt": "ROMEO:", "max_tokens": 2}
    refusals: list[str] = []
    deadline = time.monotonic() + 20
    while "unavailable" not in refusals:
        assert time.monotonic() < deadline, refusals
        status, text = _http(served.base, "POST", "/v1/completions", body, KEY)
        assert status in (200, 503), text
        if status == 200:
            assert refusals, "served while the stage was dead"
            break  # the restart finished between two requests: no window left to refuse in
        error = json.loads(text)["error"]
        assert error["type"] == "service_unavailable", error
        refusals.append(error["code"])
        if error["code"] == "stage_failed":  # it was in flight: the error names the stage
            assert "stage 1" in error["message"], error
        else:  # refused while the stage restarts
            assert error["code"] == "unavailable" and "recovering" in error["message"]
            assert _http(served.base, "GET", "/health")[0] == 503
    deadline = time.monotonic() + 90
    while _http(served.base, "GET", "/health")[0] != 200:
        assert time.monotonic() < deadline, "the stage was not restarted"
        time.sleep(0.3)
    answer = served.client().completions.create(model="bard-tiny", prompt="KING:", max_tokens=3)
    assert answer.choices[0].finish_reason in ("length", "stop")
    assert re.search(r'pqctl:stage_restarts_total\{[^}]*stage="1"[^}]*\} 1\.0', served.metrics())


def test_gateway_errors_become_openai_statuses() -> None:
    """Every code of the client protocol maps to the status OpenAI's API uses for it."""
    from runtime.serve.http import APIError
    from runtime.serve.protocol import ERROR_CODES

    expected = {"overloaded": 429, "stage_failed": 503, "replanning": 503, "shutting_down": 503}
    expected |= {"bad_field": 400, "prompt_too_long": 400, "internal": 500}
    for code in ERROR_CODES:
        error = APIError.from_reply({"type": "error", "code": code, "message": "m"})
        assert error.status in (400, 404, 413, 429, 500, 503), code
        assert error.status == expected.get(code, error.status), code
    field = APIError.from_reply(
        {"code": "bad_field", "field": "max_new_tokens", "message": "max_new_tokens must be …"}
    )
    assert (field.param, field.message) == ("max_tokens", "max_tokens must be …")


def test_chat_prompts_use_the_checkpoints_template_else_the_plain_one(tmp_path: Path) -> None:
    """A tokenizer with a chat template renders the messages (its BOS not doubled where the
    tokenizer adds one itself); without one, the documented plain template."""
    from transformers import AutoTokenizer

    from runtime.model.assets import builtin_model_dir
    from runtime.serve.http import ChatTemplate, plain_chat_prompt

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    plain = AutoTokenizer.from_pretrained(str(builtin_model_dir()))
    assert ChatTemplate(plain).name == "plain"
    assert ChatTemplate(plain).prompt(messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert plain_chat_prompt(messages) == ChatTemplate(None).prompt(messages)

    templated = AutoTokenizer.from_pretrained(str(builtin_model_dir()))
    templated.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    templated.bos_token = "<bos>"
    templated.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    chat = ChatTemplate(loaded)
    assert chat.name == "checkpoint"
    rendered = chat.prompt(messages)
    assert rendered.endswith("<system>Be brief.</s><user>Hi</s><assistant>")
    adds_bos = loaded.bos_token_id in loaded("")["input_ids"]
    assert rendered.startswith("<bos>") != adds_bos  # kept only where encoding will not add it

    class AddsBos:  # a tokenizer that adds its BOS itself, as Llama's does
        chat_template, bos_token, bos_token_id = "…", "<s>", 1

        def __call__(self, text: str) -> dict[str, list[int]]:
            return {"input_ids": [1]}

        def apply_chat_template(self, messages: object, **_: object) -> str:
            return "<s>[INST] Hi [/INST]"

    assert ChatTemplate(AddsBos()).prompt(messages) == "[INST] Hi [/INST]"
