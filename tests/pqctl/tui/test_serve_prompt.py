"""The Serve and Prompt tabs driven by Textual's pilot with real processes: launch the built-in
model on this host, watch per-stage throughput, stream a prompt, stop. Every wait is bounded and
whatever a test starts is stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from textual.widgets import DataTable, Input, Log

from pqctl.tui.app import PqctlApp
from pqctl.tui.views import prompt as prompt_module
from pqctl.tui.widgets.stage_monitor import StageMonitor
from runtime.serve.deployment import DeploymentState, pid_alive
from tests.pqctl.tui.helpers import HOME_LAB, PLAN_FILE, wait_for
from tests.runtime.serve.plans import serving_plan

ROOT = Path(__file__).resolve().parents[3]


def _kill_leftovers(state_dir: Path) -> None:
    for path in state_dir.glob("*.json"):
        with contextlib.suppress(Exception):
            state = DeploymentState.load(path.stem, state_dir)
            os.killpg(state.pid, signal.SIGKILL)
            state.remove(state_dir)


@pytest.mark.multiproc
async def test_launch_watch_prompt_and_stop_the_builtin_model(dashboard_dirs: Path) -> None:
    state_dir = dashboard_dirs / "state"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    # the embedded default: this host, the built-in model; launched with the HTTP API too
    app = PqctlApp(http=f"127.0.0.1:{http_port}")
    pids: list[int] = []
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_for(pilot, lambda: app.plan_view.plan is not None, 30, "default plan")
            await pilot.press("alt+2")
            for field, value in (("batch", "4"), ("prompt-len", "32"), ("max-new", "16")):
                app.query_one(f"#{field}", Input).value = value
            await pilot.press("enter")
            await wait_for(
                pilot,
                lambda: app.serve_view.plan and app.serve_view.plan.workload.global_batch == 4,
                30,
                "small plan",
            )
            plan = app.serve_view.plan
            assert plan is not None and plan.model.source == "bard-tiny"

            await pilot.press("alt+3", "l")
            await wait_for(pilot, lambda: app.serve_view.phase == "serving", 90, "serving")
            launched = app.serve_view.launched
            assert launched is not None and launched.state.name == "dashboard"
            deployment = DeploymentState.load("dashboard", state_dir)
            assert deployment.pid == launched.state.pid
            assert deployment.http_endpoint == f"127.0.0.1:{http_port}"
            await wait_for(pilot, lambda: _healthy(http_port), 30, "the HTTP API serving")
            pids = [launched.state.pid] + [
                s["pid"] for s in (app.serve_view.status or {}).get("stages", [])
            ]
            monitors = list(app.query(StageMonitor))
            assert len(monitors) == len(plan.stages)
            assert all(m.state == "ready" for m in monitors)

            await pilot.press("alt+4")
            prompt = app.prompt_view
            await wait_for(pilot, lambda: prompt.endpoint is not None, 10, "prompt endpoint")
            assert prompt.endpoint == launched.state.client_endpoint
            await pilot.press(*"ROMEO:", "enter")
            await wait_for(pilot, lambda: prompt.generated, 30, "first tokens")
            await wait_for(pilot, lambda: not prompt.running, 30, "generation done")
            usage = str(app.query_one("#prompt-usage").render())
            assert "length" in usage or "eos" in usage, usage
            assert str(app.query_one("#completion").render()).startswith("ROMEO:")
            # several prompts typed at once go to the real deployment together; the prompts'
            # bracketed text is shown as typed, not read as markup
            await pilot.press("ctrl+u", *"[Exit] ROMEO: || KING:", "enter")
            await wait_for(pilot, lambda: not prompt.running and len(prompt.outputs) == 2, 30,
                           "two replies")  # fmt: skip
            completion = str(app.query_one("#completion").render())
            assert "[Exit] ROMEO:" in completion and "KING:" in completion, completion
            assert "2 requests at once" in str(app.query_one("#prompt-usage").render())

            await wait_for(
                pilot,
                lambda: all(m.measured[1] is not None for m in monitors),
                10,
                "measured decode tokens/s",
            )
            line = str(monitors[-1].render())
            assert "tok/s" in line and "pred" in line
            requests = app.query_one("#serve-requests")
            await wait_for(pilot, lambda: "3 done" in str(requests.render()), 10, "request count")

            await pilot.press("alt+3", "s")
            await wait_for(pilot, lambda: app.serve_view.phase == "idle", 30, "stopped")
            assert app.prompt_view.endpoint is None
        assert pids and not any(pid_alive(pid) for pid in pids)
        assert not list(state_dir.glob("*.json"))
        assert not _healthy(http_port)  # the HTTP API stopped with the deployment
    finally:
        _kill_leftovers(state_dir)


def _healthy(port: int) -> bool:
    """Whether the HTTP API on ``port`` answers /health with 200."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


async def test_a_plan_on_other_hosts_says_at_once_it_needs_ray() -> None:
    """Without --ray, a plan with stages on other hosts is refused at once, saying how to
    launch it; nothing shows "starting"."""
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        app.plan_view.load_plan(PLAN_FILE)
        await pilot.press("alt+3")
        status = str(app.query_one("#serve-status").render())
        assert "gaming-pc" in status and "pqctl --ray" in status
        await pilot.press("l")
        assert app.serve_view.phase == "idle" and app.serve_view.launched is None
        assert not app.serve_view.workers  # no launch was even tried
        assert all(m.state == "not started" for m in app.query(StageMonitor))
        assert "starting" not in str(app.query_one("#serve-status").render())
        assert any("pqctl --ray" in n.message for n in app._notifications)
        assert "not launched" in "\n".join(app.query_one("#serve-log", Log).lines)


class FakeClient:
    """Stands in for runtime.serve.client.Client: every request streams back "[Exit]" in
    brackets and markup-like text, in two tokens, then ends; ``submitted`` keeps the prompts."""

    submitted: ClassVar[list[str]] = []

    def __init__(self, endpoint: str, timeout_s: float = 0.0) -> None:
        self.replies: list[dict[str, Any]] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def submit(self, prompt: str, *, max_new_tokens: int, stream: bool, **_: Any) -> str:
        request_id = str(len(self.submitted))
        self.submitted.append(prompt)
        self.replies += [
            {"id": request_id, "type": "token", "text": " [Exit] pursued"},
            {"id": request_id, "type": "token", "text": " by a [b]bear[/b]"},
        ]
        return request_id

    def receive(self, timeout_s: float) -> dict[str, Any]:
        if not self.replies:  # every token went out: the requests end, in order
            raise TimeoutError
        reply = self.replies.pop(0)
        if not any(r["id"] == reply["id"] for r in self.replies):
            usage = {"completion_tokens": 2, "first_token_s": 0.01, "total_s": 0.02, "seed": 0}
            self.replies.append(
                {"id": reply["id"], "type": "done", "finish_reason": "length", "usage": usage}
            )
        return reply

    def cancel(self, request_id: str) -> None:
        return None


async def test_prompt_output_keeps_brackets_and_several_prompts_go_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(prompt_module, "Client", FakeClient)
    FakeClient.submitted = []
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.prompt_view
        view.set_endpoint("tcp://127.0.0.1:1", "fake", 16)
        await pilot.press("alt+4", *"[Exit] ROMEO:", "enter")
        await wait_for(pilot, lambda: not view.running and view.outputs, 10, "one reply")
        completion = str(app.query_one("#completion").render())
        assert completion == "[Exit] ROMEO: [Exit] pursued by a [b]bear[/b]"
        assert "length · 2 tokens" in str(app.query_one("#prompt-usage").render())

        field = app.query_one("#prompt-text", Input)
        field.focus()
        await pilot.press("ctrl+u", *"[A] one || [B] two", "tab", "backspace", "2", "enter")
        await wait_for(pilot, lambda: len(FakeClient.submitted) == 5, 10, "four more requests")
        await wait_for(pilot, lambda: not view.running, 10, "four replies")
        assert FakeClient.submitted[1:] == ["[A] one", "[A] one", "[B] two", "[B] two"]
        completion = str(app.query_one("#completion").render())
        assert completion.count("[Exit] pursued by a [b]bear[/b]") == 4
        assert "#4 [B] two" in completion
        assert "4 requests at once · 8 tokens" in str(app.query_one("#prompt-usage").render())


async def test_prompt_without_a_deployment_says_what_to_do() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("alt+4", *"hello", "enter")
        assert "launch one on the Serve tab" in str(app.query_one("#prompt-usage").render())
        await pilot.press("alt+3", "s")
        assert any("nothing is running" in n.message for n in app._notifications)


async def test_stage_cards_show_load_progress() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        app.plan_view.load_plan(PLAN_FILE)
        await pilot.press("alt+3")
        monitors = list(app.query(StageMonitor))
        assert len(monitors) >= 2
        stages = [
            {"index": 0, "state": "loading", "loaded": [3, 9], "resident_bytes": 300 << 20},
            {"index": 1, "state": "loading", "loaded": "3 of 9"},  # malformed: state only
        ]
        app.serve_view._apply_status({"phase": "loading", "stages": stages})
        await pilot.pause()
        assert "loading 3/9" in str(monitors[0].render())
        assert "300" in str(monitors[0].render())  # MiB so far
        second = str(monitors[1].render())
        assert "loading" in second and "3/9" not in second


@pytest.mark.multiproc
async def test_attach_by_name_to_a_deployment_started_elsewhere(
    dashboard_dirs: Path, tmp_path: Path
) -> None:
    """A deployment started by `pqctl apply --detach` is watched by name (`pqctl --attach`),
    outlives a dashboard that quits, is attached to again by another, and stops with `s`."""
    state_dir = dashboard_dirs / "state"
    plan = tmp_path / "plan.json"
    serving_plan("bard-tiny", [0, 4], batch=4, max_new=256).save(plan)
    argv = [sys.executable, "-m", "pqctl", "apply", str(plan), "--detach", "--name", "ext",
            "--endpoint", "tcp://127.0.0.1:*"]  # fmt: skip
    up = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert up.returncode == 0, up.stderr
    state = DeploymentState.load("ext", state_dir)
    try:
        await _attach_and_leave(state, stop=False)
        assert DeploymentState.load("ext", state_dir).pid == state.pid  # quitting left it up
        await _attach_and_leave(state, stop=True)
        assert not pid_alive(state.pid)
        app = PqctlApp(cluster=HOME_LAB, auto_solve=False, attach="ext")
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.pause()
            assert app.serve_view.launched is None
            assert 'no deployment "ext" is running' in str(app.query_one("#serve-log").lines)
    finally:
        _kill_leftovers(state_dir)


async def _cancel_from_the_requests_view(app: PqctlApp, pilot: Any, state: DeploymentState) -> None:
    """Another client's long request is listed in the Requests tab (6) and ``c`` cancels it:
    that client gets ``done`` with finish reason cancelled."""
    from pqctl.tui.views.requests import RequestsView
    from runtime.serve.client import Client

    view = app.query_one(RequestsView)
    with Client(state.client_endpoint, timeout_s=30) as client:
        request_id = client.submit("ROMEO:", max_new_tokens=256, ignore_eos=True, id="long-one")
        await pilot.press("6")
        await pilot.pause()
        assert app.active_tab == "requests", app.focused
        await wait_for(
            pilot,
            lambda: any(r["id"] == request_id and r["state"] == "running" for r in view.rows),
            15,
            "the request listed as running",
        )
        row = next(k for k, r in enumerate(view.rows) if r["id"] == request_id)
        view.query_one("#request-table", DataTable).move_cursor(row=row)
        await pilot.press("c")
        done = client.wait(request_id)
    assert done.finish_reason == "cancelled" and len(done.token_ids) < 256
    await wait_for(
        pilot,
        lambda: any(r["id"] == request_id and r["state"] == "cancelled" for r in view.rows),
        10,
        "the request listed as cancelled",
    )


async def _attach_and_leave(state: DeploymentState, stop: bool) -> None:
    """A dashboard attached to ``state``'s deployment by name: it shows it serving, with its
    stages and endpoint; then quit (ctrl+q) or stop it (s)."""
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False, attach=state.name)
    async with app.run_test(size=(100, 30)) as pilot:
        view = app.serve_view
        await wait_for(pilot, lambda: view.phase == "serving", 30, "attached, serving")
        assert app.active_tab == "serve" and view.launched is not None
        assert not view.launched.owned
        assert len(list(app.query(StageMonitor))) == 2
        await wait_for(pilot, lambda: app.prompt_view.endpoint is not None, 10, "endpoint")
        assert app.prompt_view.endpoint == state.client_endpoint
        if not stop:
            await _cancel_from_the_requests_view(app, pilot, state)
        if stop:
            await pilot.press("s")
            await wait_for(pilot, lambda: view.phase == "idle", 30, "stopped")
        else:
            await pilot.press("ctrl+q")
