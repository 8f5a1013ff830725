"""Serve view: launch the plan on this host, watch each stage load and then its measured
prefill/decode throughput beside the prediction; stop it.

The dashboard owns the deployment it launched and stops it on exit; one it attached to by name
(``pqctl --attach NAME``: started by ``pqctl apply`` or another dashboard) keeps running.
Launching, watching (ZeroMQ SUB via :class:`runtime.serve.monitor.Monitor`) and stopping run in
thread workers.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Log, Static
from textual.worker import get_current_worker

from planner.plan import Plan, PlanValidationError
from pqctl.tui import launch as launching
from pqctl.tui.messages import (
    DeploymentFailed,
    DeploymentSnapshot,
    DeploymentStarted,
    DeploymentStopped,
    EndpointChanged,
)
from pqctl.tui.widgets.figures import count, human_rate, markup_escape, spark
from pqctl.tui.widgets.stage_chart import PHASES, StageChart, StageSeries
from pqctl.tui.widgets.stage_monitor import StageMonitor
from runtime.serve.monitor import Monitor, predicted_rates

SNAPSHOT_INTERVAL_S = 0.5


class ServeView(Vertical):
    """``l`` launches the current plan, ``s`` stops the deployment, ``c`` shows the decode
    chart, then the prefill chart, then none."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("c", "cycle_chart", "Chart")]
    DEFAULT_CSS = """
    ServeView #serve-status { height: auto; padding: 0 1; }
    ServeView #serve-requests { height: auto; padding: 0 1; color: $text-muted; }
    ServeView #stage-monitors { height: 1fr; padding: 0 1; }
    ServeView #serve-chart { height: 1fr; }
    ServeView #serve-log { height: 5; border-top: solid $panel; }
    """

    def __init__(self, endpoint: str = launching.DEFAULT_ENDPOINT, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.endpoint = endpoint
        self.plan: Plan | None = None
        self.serving_plan: Plan | None = None
        self.launched: launching.Launched | None = None
        self.phase = "idle"  # idle, starting, loading, serving, stopping, failed
        self.status: dict[str, Any] | None = None
        self.monitors: dict[int, StageMonitor] = {}
        self.generation_rate: deque[float | None] = deque(maxlen=60)
        self.last_generated: tuple[float, int] | None = None
        self.chart_phase: str | None = PHASES[0]

    def compose(self) -> ComposeResult:
        yield Static("no plan yet: solve or load one on the Plan tab", id="serve-status")
        yield Static("", id="serve-requests")
        yield VerticalScroll(id="stage-monitors")
        yield StageChart(id="serve-chart")
        yield Log(id="serve-log", max_lines=500)

    def on_mount(self) -> None:
        self.query_one("#serve-log", Log).write_line("launch progress, errors and stops show here")

    # ----------------------------------------------------------------- state
    def set_plan(self, plan: Plan) -> None:
        """The plan ``l`` will launch (a running deployment keeps its own plan)."""
        self.plan = plan
        if self.launched is None and self.phase != "starting":
            self._show_stages(plan, "not started")
            self._show_status()

    def _show_stages(self, plan: Plan, state: str) -> None:
        """One monitor per stage of ``plan``, showing the plan's predicted tokens/s."""
        container = self.query_one("#stage-monitors", VerticalScroll)
        container.remove_children()
        rates = predicted_rates(plan)
        self.monitors = {
            k: StageMonitor(k, s, (rates[k].prefill_tokens_per_s, rates[k].decode_tokens_per_s))
            for k, s in enumerate(plan.stages)
        }
        for monitor in self.monitors.values():
            monitor.state = state
        container.mount_all(self.monitors.values())
        self._show_chart()

    def action_cycle_chart(self) -> None:
        """Decode chart, prefill chart, no chart (the monitors get the room)."""
        order = [*PHASES, None]
        self.chart_phase = order[(order.index(self.chart_phase) + 1) % len(order)]
        self._show_chart()

    def _show_chart(self) -> None:
        chart = self.query_one("#serve-chart", StageChart)
        measured = any(m.times for m in self.monitors.values())
        chart.display = self.chart_phase is not None and measured  # before: the room is theirs
        if self.chart_phase is None or not measured:
            return
        phase = self.chart_phase
        start = min((m.times[0] for m in self.monitors.values() if m.times), default=0.0)
        chart.show(
            phase,
            [
                StageSeries(
                    f"stage {k}",
                    [t - start for t in m.times],
                    list(getattr(m, phase)),
                    m.predicted_prefill if phase == "prefill" else m.predicted_decode,
                )
                for k, m in self.monitors.items()
            ],
        )

    @property
    def running(self) -> bool:
        return self.launched is not None

    @property
    def owns_deployment(self) -> bool:
        """Whether a deployment this dashboard started is running (stopped when it quits)."""
        return self.launched is not None and self.launched.owned

    @property
    def client_endpoint(self) -> str | None:
        """Where clients reach the dashboard's deployment, once it serves."""
        if self.launched is None or self.phase != "serving":
            return None
        return self.launched.state.client_endpoint

    def log_line(self, text: str) -> None:
        self.query_one("#serve-log", Log).write_line(f"{clock()} {text}")

    def _show_status(self) -> None:
        if self.launched is None:
            if self.plan is None:
                text = "no plan yet: solve or load one on the Plan tab"
            else:
                remote = self._unreachable_hosts(self.plan)
                ray = getattr(self.app, "ray", None)
                where = (
                    f"[$warning]{markup_escape(_needs_ray(remote))}[/]"
                    if remote
                    else f"l launches it over Ray ({markup_escape(ray)})"
                    if ray
                    else "l launches it on this host"
                )
                stages = count(len(self.plan.stages), "stage")
                text = (
                    f"ready to launch {markup_escape(self.plan.model.source)} ({stages}) · {where}"
                )
            if self.phase == "failed":
                text = "[$error]failed[/] (see the log below) · " + text
        else:
            state = self.launched.state
            colour = {"serving": "$success", "failed": "$error"}.get(self.phase, "$warning")
            text = (
                f"[{colour}]{self.phase}[/] [b]{markup_escape(state.name)}[/] at "
                f"[b]{markup_escape(state.client_endpoint)}[/] · s stops · logs "
                f"{markup_escape(state.log_dir)}"
            )
        self.query_one("#serve-status", Static).update(text)

    # ----------------------------------------------------------------- launch
    def action_launch(self) -> None:
        if self.launched is not None or self.phase == "starting":
            self.app.notify("a deployment is already running: s stops it", severity="warning")
            return
        if self.plan is None:
            self.app.notify("no plan to launch: solve one on the Plan tab", severity="warning")
            return
        remote = self._unreachable_hosts(self.plan)
        if remote:  # refused at once: nothing is started, nothing shows "starting"
            self.log_line(f"not launched: {_needs_ray(remote)}")
            self.app.notify(_needs_ray(remote), title="cannot launch here", severity="error")
            return
        self.serving_plan = self.plan
        self.phase = "starting"
        self.generation_rate.clear()
        self.last_generated = None
        n = len(self.plan.stages)
        self.log_line(f"launching {self.plan.model.source} ({count(n, 'stage')})")
        self.query_one("#serve-status", Static).update("[$warning]starting the gateway…[/]")
        self._show_stages(self.plan, "starting")
        self.start_deployment(self.plan)

    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def start_deployment(self, plan: Plan) -> None:
        worker = get_current_worker()
        try:
            launched = launching.launch(
                plan,
                launching.free_name(),
                self.endpoint,
                cancelled=lambda: worker.is_cancelled,
                ray=getattr(self.app, "ray", None),
                http=getattr(self.app, "http", None),
            )
        except launching.LaunchError as exc:
            self.post_message(DeploymentFailed(str(exc)))
            return
        except Exception as exc:  # reported in the view rather than crashing the dashboard
            self.post_message(DeploymentFailed(f"could not launch: {exc!r}"))
            return
        if worker.is_cancelled:
            launching.stop(launched)
            return
        self.post_message(DeploymentStarted(launched))

    def attach(self, name: str) -> None:
        """Watch the running deployment ``name`` (its plan, stages, requests) as if launched."""
        if self.launched is not None:
            self.app.notify("a deployment is already shown: s stops it", severity="warning")
            return
        try:
            launched = launching.attach(name)
            plan = Plan.load(launched.plan_file)
        except (launching.LaunchError, PlanValidationError) as exc:
            self.log_line(f"cannot attach: {exc}")
            self.app.notify(str(exc), title="cannot attach", severity="error")
            return
        self.serving_plan = plan
        self.generation_rate.clear()
        self.last_generated = None
        self._show_stages(plan, "attaching")
        self.post_message(DeploymentStarted(launched))

    def on_deployment_started(self, message: DeploymentStarted) -> None:
        self.launched = message.launched
        self.phase = "loading"
        state = message.launched.state
        if message.launched.owned:
            self.log_line(f"gateway up (pid {state.pid}); stages loading")
        else:
            self.log_line(
                f'attached to "{state.name}" (pid {state.pid}) at {state.client_endpoint}; '
                "it keeps running when the dashboard quits (s stops it)"
            )
        self._show_status()
        self.watch_deployment(message.launched)

    def _unreachable_hosts(self, plan: Plan) -> list[str]:
        """Hosts of the plan's stages this dashboard cannot start (not this host, no Ray)."""
        return [] if getattr(self.app, "ray", None) else launching.remote_hosts(plan)

    def on_deployment_failed(self, message: DeploymentFailed) -> None:
        for monitor in self.monitors.values():
            monitor.set_state("not started")
        self.phase = "failed"
        self.log_line(f"error: {message.error}")
        self.app.notify(message.error, title="deployment failed", severity="error")
        self._show_status()

    # ----------------------------------------------------------------- watching
    @work(thread=True, exclusive=True, group="monitor", exit_on_error=False)
    def watch_deployment(self, launched: launching.Launched) -> None:
        """Relay the gateway's status and the stages' metrics until it exits or we stop."""
        worker = get_current_worker()
        monitor = Monitor.of(launched.state)
        try:
            next_post = 0.0
            while not worker.is_cancelled:
                monitor.poll(0.1)
                code = launched.exit_code()
                if code is not None:
                    self.post_message(
                        DeploymentSnapshot(monitor.status, dict(monitor.metrics), code)
                    )
                    return
                if time.monotonic() >= next_post:
                    self.post_message(DeploymentSnapshot(monitor.status, dict(monitor.metrics)))
                    next_post = time.monotonic() + SNAPSHOT_INTERVAL_S
        finally:
            monitor.close()

    def on_deployment_snapshot(self, message: DeploymentSnapshot) -> None:
        if self.launched is None:
            return
        status = message.status
        if status is not None:
            self._apply_status(status)
        for index, metrics in message.metrics.items():
            if index in self.monitors:
                self.monitors[index].add_metrics(metrics)
        if message.metrics:
            self._show_chart()
        if message.exit_code is not None and self.phase != "stopping":
            failure = (status or {}).get("failure") or f"gateway exited ({message.exit_code})"
            self.launched = None
            self.phase = "failed"
            self.post_message(EndpointChanged(None))
            self.log_line(f"deployment ended: {failure}")
            self.app.notify(str(failure), title="deployment ended", severity="error")
            self._show_status()
            self.post_message(DeploymentStopped(clean=False))

    def _apply_status(self, status: dict[str, Any]) -> None:
        self.status = status
        phase = str(status.get("phase", "loading"))
        if phase != self.phase and self.phase != "stopping":
            if phase == "serving" and self.launched is not None and self.serving_plan:
                self.log_line("every stage is loaded: serving")
                self.post_message(
                    EndpointChanged(
                        self.launched.state.client_endpoint,
                        self.launched.state.name,
                        self.serving_plan.workload.max_new_tokens,
                    )
                )
            if status.get("failure"):
                self.log_line(f"error: {status['failure']}")
            self.phase = phase
            self._show_status()
        for stage in status.get("stages", []):
            monitor = self.monitors.get(stage.get("index", -1))
            if monitor is not None:
                self._record_events(monitor, stage)
                monitor.set_state(
                    str(stage.get("state")),
                    stage.get("error") or stage.get("last_failure"),
                    stage.get("resident_bytes"),
                    int(stage.get("restarts") or 0),
                    _loaded(stage.get("loaded")),
                )
        r = status.get("requests", {})
        generated, stamp = int(status.get("generated_tokens", 0)), float(status.get("time", 0.0))
        if self.last_generated is None or stamp != self.last_generated[0]:  # a new message
            self.generation_rate.append(self._rate(stamp, generated))
        self.query_one("#serve-requests", Static).update(
            f"requests: {r.get('waiting', 0)} waiting, {r.get('active', 0)} running, "
            f"{r.get('completed', 0)} done · {generated} tokens generated "
            f"[$primary]{spark(list(self.generation_rate), 12)}[/] "
            f"{human_rate(self._last_rate())} tokens/s · the plan predicts "
            f"{human_rate(self._predicted_total())} at full batch"
        )

    def _record_events(self, monitor: StageMonitor, stage: dict[str, Any]) -> None:
        """Write a stage's crash or restart to the event log (before the monitor takes the
        new state)."""
        state, restarts = str(stage.get("state")), int(stage.get("restarts") or 0)
        reason = stage.get("error") or stage.get("last_failure") or "no reason given"
        if state == "failed" and monitor.state != "failed":
            self.log_line(f"stage {monitor.index} ({monitor.stage.device.key}) failed: {reason}")
        if restarts > monitor.restarts:
            self.log_line(
                f"stage {monitor.index} ({monitor.stage.device.key}) restarted "
                f"({restarts}× so far) after: {reason}"
            )

    def _rate(self, now: float, generated: int) -> float | None:
        """Tokens per second generated since the previous status message (None at first)."""
        previous, self.last_generated = self.last_generated, (now, generated)
        if previous is None or now <= previous[0]:
            return None
        return max(0.0, (generated - previous[1]) / (now - previous[0]))

    def _last_rate(self) -> float | None:
        return next((v for v in reversed(self.generation_rate) if v is not None), None)

    def _predicted_total(self) -> float | None:
        plan = self.serving_plan
        return plan.prediction.throughput_tokens_per_s if plan else None

    # ----------------------------------------------------------------- stopping
    def action_stop(self) -> None:
        if self.launched is None:
            self.app.notify("nothing is running", severity="warning")
            return
        self.phase = "stopping"
        self._show_status()
        self.log_line("stopping…")
        self.workers.cancel_group(self, "monitor")
        self.post_message(EndpointChanged(None))
        self.stop_deployment(self.launched)

    @work(thread=True, exclusive=True, group="stop", exit_on_error=False)
    def stop_deployment(self, launched: launching.Launched) -> None:
        self.post_message(DeploymentStopped(launching.stop(launched)))

    def on_deployment_stopped(self, message: DeploymentStopped) -> None:
        if self.phase == "stopping":
            self.launched = None
            self.phase = "idle"
            self.log_line("stopped" if message.clean else "stopped (had to kill what was left)")
            for monitor in self.monitors.values():
                monitor.set_state("stopped")
            self._show_status()

    def on_unmount(self) -> None:
        self.stop_now()  # the dashboard owns its deployment: never leave it behind

    def stop_now(self) -> None:
        """Stop the deployment synchronously (at exit, when the UI is going away)."""
        launched, self.launched = self.launched, None
        if launched is not None and launched.owned and launched.exit_code() is None:
            launching.stop(launched, timeout_s=10.0)


def clock() -> str:
    """The event log's time stamp: the local time of day."""
    return time.strftime("%H:%M:%S")


def _needs_ray(hosts: list[str]) -> str:
    """Why a plan with stages on ``hosts`` is not launched from a dashboard without Ray."""
    return (
        f"stages on {', '.join(hosts)}: this host cannot start them; open the dashboard over "
        "their Ray cluster (pqctl --ray HOST:PORT) to launch there, or plan without a cluster "
        "file to serve on this host"
    )


def _loaded(value: object) -> tuple[int, int] | None:
    """The status's ``loaded`` field, [parts loaded, parts], when well formed."""
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    return None
