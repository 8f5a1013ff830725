"""The ``pqctl`` dashboard: the App wires the five views, themes, bindings and commands.

Views own their workers (solving, sampling, launching, streaming); the App holds what they
share (the planning session) and forwards their messages to each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import ClassVar

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, TabbedContent, TabPane, Tabs
from textual.worker import get_current_worker

from planner.errors import PlannerError
from pqctl.tui.launch import DEFAULT_ENDPOINT
from pqctl.tui.messages import (
    ClusterResolved,
    DeploymentSnapshot,
    DeploymentStarted,
    DeploymentStopped,
    EndpointChanged,
    ExclusionChanged,
    PlanReady,
)
from pqctl.tui.screens.help import HelpScreen
from pqctl.tui.screens.path_dialog import PathDialog
from pqctl.tui.settings import Settings, load_settings, save_settings, user_theme_dir
from pqctl.tui.solver import PlanningSession
from pqctl.tui.views.cluster import ClusterView
from pqctl.tui.views.logs import LogsView
from pqctl.tui.views.plan import PlanView
from pqctl.tui.views.prompt import PromptView
from pqctl.tui.views.requests import RequestsView
from pqctl.tui.views.serve import ServeView
from pqctl.tui.widgets.field import ALT_DIGIT_KEYS
from themes import BUILTIN_THEMES, DEFAULT_THEME, THEME_ALIASES, load_theme_dir

TABS = (
    ("cluster", "Cluster"),
    ("plan", "Plan"),
    ("serve", "Serve"),
    ("prompt", "Prompt"),
    ("logs", "Logs"),
    ("requests", "Requests"),
)
FIRST_FOCUS = {
    "cluster": "#devices",
    "plan": "#model",
    "serve": "#stage-monitors",
    "prompt": "#prompt-text",
    "logs": "#log-lines",
    "requests": "#request-table",
}


TAB_ACTIONS = {"exclude": "cluster", "solve": "plan", "launch": "serve", "stop": "serve"}
"""Actions bound to a key that only works on (and shows in the footer of) one tab."""


class DashboardError(Exception):
    """The dashboard cannot start (e.g. an unknown ``--theme``); the message says why."""


class PqctlApp(App[None]):
    """Cluster, Plan, Serve, Prompt and Logs tabs over one planning session and one
    deployment."""

    TITLE = "pqctl"
    SUB_TITLE = "plan and serve LLMs on heterogeneous clusters"
    CSS_PATH = "app.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        *(
            Binding(str(n), f"show_tab('{tab}')", label, show=False)
            for n, (tab, label) in enumerate(TABS, 1)
        ),
        *(  # priority: they switch tabs from inside a text field too
            Binding(f"alt+{n},{alt}", f"show_tab('{tab}')", label, show=False, priority=True)
            for n, ((tab, label), alt) in enumerate(zip(TABS, ALT_DIGIT_KEYS, strict=True), 1)
        ),
        Binding("ctrl+pagedown", "next_tab(1)", "Next tab", show=False, priority=True),
        Binding("ctrl+pageup", "next_tab(-1)", "Previous tab", show=False, priority=True),
        Binding("x", "exclude", "Exclude device"),
        Binding("f5", "solve", "Solve"),
        Binding("l", "launch", "Launch"),
        Binding("s", "stop", "Stop"),
        Binding("escape", "escape", "Cancel / leave field", show=False),
        Binding("question_mark", "help", "Help"),
        Binding("f1", "help", "Help", show=False),
        Binding("ctrl+s", "save_plan", "Save plan"),
        Binding("ctrl+o", "load_plan", "Load plan"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        theme: str | None = None,
        cluster: Path | None = None,
        model: str | None = None,
        *,
        endpoint: str = DEFAULT_ENDPOINT,
        auto_solve: bool = True,
        ray: str | None = None,
        attach: str | None = None,
        http: str | None = None,
    ) -> None:
        """Raises DashboardError for a theme name that is neither built in nor a user theme."""
        super().__init__()
        self.ray = ray
        self.http = http
        self.attach_to = attach
        self.session = PlanningSession(cluster, ray=ray)
        self.model_name = model
        self.endpoint = endpoint
        self.auto_solve = auto_solve
        self.startup_warnings: list[str] = []
        self.serve: ServeView | None = None
        for builtin in BUILTIN_THEMES.values():
            self.register_theme(builtin)
        loaded = load_theme_dir(user_theme_dir(), reserved=self.available_themes)
        for user_theme in loaded.themes:
            self.register_theme(user_theme)
        self.own_themes = [*BUILTIN_THEMES, *(t.name for t in loaded.themes)]
        self.startup_warnings += [f"theme file skipped: {e}" for e in loaded.errors]
        self.settings, warning = load_settings()
        if warning:
            self.startup_warnings.append(warning)
        self.initial_theme = self._initial_theme(theme)
        self.remember_initial = theme is not None

    def _initial_theme(self, requested: str | None) -> str:
        if requested is not None:
            name = self.theme_name(requested)
            if name is None:
                ours = ", ".join([*THEME_ALIASES][:3] + self.own_themes[len(BUILTIN_THEMES) :])
                raise DashboardError(
                    f'--theme: no theme "{requested}"; use {ours} (or pqctl-dark, pqctl-light, '
                    "pqctl-high-contrast), a Textual theme such as nord or gruvbox, or a theme "
                    "file in the config directory (docs/themes.md)"
                )
            return name
        remembered = self.settings.theme
        if remembered is None:
            return DEFAULT_THEME
        name = self.theme_name(remembered)
        if name is None:
            self.startup_warnings.append(f'remembered theme "{remembered}" is gone; using default')
        return name or DEFAULT_THEME

    def theme_name(self, name: str) -> str | None:
        """The registered theme called ``name`` (or by its alias, e.g. "light")."""
        name = THEME_ALIASES.get(name, name)
        return name if name in self.available_themes else None

    def compose(self) -> ComposeResult:
        yield Header()
        with TabbedContent(initial="cluster", id="tabs"):
            for n, (tab, label) in enumerate(TABS, 1):
                with TabPane(f"{n} {label}", id=tab):
                    yield self._view(tab)
        yield Footer()

    def _view(
        self, tab: str
    ) -> ClusterView | PlanView | ServeView | PromptView | LogsView | RequestsView:
        if tab == "cluster":
            return ClusterView(id="cluster-view")
        if tab == "plan":
            return PlanView(self.session, self.model_name, id="plan-view")
        if tab == "serve":
            self.serve = ServeView(self.endpoint, id="serve-view")  # outlives the DOM at exit
            return self.serve
        if tab == "logs":
            return LogsView(id="logs-view")
        if tab == "requests":
            return RequestsView(id="requests-view")
        return PromptView(id="prompt-view")

    def on_mount(self) -> None:
        self.theme = self.initial_theme
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        if self.remember_initial:
            self._remember_theme(self.current_theme)
        for warning in self.startup_warnings:
            self.notify(warning, severity="warning", timeout=15)
        self.query_one("#devices", DataTable).focus()
        self.resolve_cluster()
        if self.attach_to is not None:
            self.action_show_tab("serve")
            self.serve_view.attach(self.attach_to)

    def _remember_theme(self, theme: object) -> None:
        name = getattr(theme, "name", None)
        if name and name != self.settings.theme:
            self.settings = Settings(theme=name)
            warning = save_settings(self.settings)
            if warning:
                self.notify(warning, severity="warning")

    # ----------------------------------------------------------------- views
    @property
    def cluster_view(self) -> ClusterView:
        return self.query_one(ClusterView)

    @property
    def plan_view(self) -> PlanView:
        return self.query_one(PlanView)

    @property
    def serve_view(self) -> ServeView:
        return self.query_one(ServeView)

    @property
    def prompt_view(self) -> PromptView:
        return self.query_one(PromptView)

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self._focus_tab(tab)

    def action_next_tab(self, step: int) -> None:
        names = [tab for tab, _ in TABS]
        self.action_show_tab(names[(names.index(self.active_tab) + step) % len(names)])

    def _focus_tab(self, tab: str) -> None:
        self.query_one(FIRST_FOCUS[tab]).focus()

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_bindings()
        if isinstance(self.focused, Tabs | None) and event.pane.id in FIRST_FOCUS:
            self.call_after_refresh(self._focus_tab, event.pane.id)

    # ----------------------------------------------------------------- cluster
    def resolve_cluster(self) -> None:
        self.run_worker(self._resolve, thread=True, group="resolve", exit_on_error=False)

    def _resolve(self) -> None:
        """Resolve the cluster (measures this host's CPU) and its devices' figure sources."""
        worker = get_current_worker()
        try:
            resolved = self.session.resolved()
        except PlannerError as exc:
            self.post_message(ClusterResolved(None, error=f"{exc.title}: {exc.msg}"))
            return
        except Exception as exc:  # reported, never a silently dead worker
            self.post_message(ClusterResolved(None, error=f"cannot read the cluster: {exc!r}"))
            return
        try:
            sources = self.session.sources(self.model_name)
            ppl_target = self.session.has_ppl_mapping(self.model_name)
        except PlannerError:
            sources, ppl_target = {}, False  # a bad model is reported when solving
        if not worker.is_cancelled:
            self.post_message(ClusterResolved(resolved, sources, ppl_target=ppl_target))

    def on_cluster_resolved(self, message: ClusterResolved) -> None:
        if message.resolved is None:
            self.notify(message.error or "cannot read the cluster", severity="error", timeout=30)
            return
        self.cluster_view.show_cluster(message.resolved, message.sources)
        self.plan_view.set_defaults(
            self.session.default_model(), message.resolved.workload, message.ppl_target
        )
        if self.auto_solve:
            self.plan_view.action_solve()

    def on_exclusion_changed(self, message: ExclusionChanged) -> None:
        self.plan_view.set_excluded(message.excluded)

    def on_plan_ready(self, message: PlanReady) -> None:
        stage_of = {s.device.key: k for k, s in enumerate(message.plan.stages)}
        self.cluster_view.sources.update(message.sources)  # the planned model's figures
        self.cluster_view.set_plan_devices(stage_of)
        self.serve_view.set_plan(message.plan)

    def on_deployment_started(self, message: DeploymentStarted) -> None:
        self.query_one(LogsView).show_dir(message.launched.log_dir)
        self.query_one(RequestsView).watch_deployment(message.launched.state)

    def on_deployment_snapshot(self, message: DeploymentSnapshot) -> None:
        rows = (message.status or {}).get("request_list")
        if isinstance(rows, list):
            self.query_one(RequestsView).show_rows(rows)

    def on_deployment_stopped(self, message: DeploymentStopped) -> None:
        self.query_one(RequestsView).watch_deployment(None)

    def on_endpoint_changed(self, message: EndpointChanged) -> None:
        self.prompt_view.set_endpoint(message.endpoint, message.name, message.max_new_tokens)

    # ----------------------------------------------------------------- actions
    @property
    def active_tab(self) -> str:
        return str(self.query_one(TabbedContent).active)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Tab actions (x, F5, l, s) are live, and in the footer, on their own tab only."""
        tab = TAB_ACTIONS.get(action)
        tabs = self.query(TabbedContent)
        return tab is None or not tabs or tabs.first().active == tab

    def action_exclude(self) -> None:
        self.cluster_view.action_toggle_exclude()

    def action_escape(self) -> None:
        """Cancel what runs on this tab (a solve, a generation), else leave the text field."""
        tab = self.active_tab
        if tab == "plan" and self.plan_view.solving:
            self.plan_view.action_cancel_solve()
        elif tab == "prompt" and self.prompt_view.running:
            self.prompt_view.action_cancel()
        elif isinstance(self.focused, Input):
            self.query_one(Tabs).focus()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def action_save_plan(self) -> None:
        if self.plan_view.plan is None:
            self.notify("no plan to save yet", severity="warning")
            return
        self.push_screen(PathDialog("Save the plan to:", "plan.json"), self._save_to)

    def _save_to(self, path: Path | None) -> None:
        if path is not None:
            self.notify(self.plan_view.save_plan(path))

    def action_load_plan(self) -> None:
        self.push_screen(PathDialog("Load a plan from:", "plan.json"), self._load_from)

    def _load_from(self, path: Path | None) -> None:
        if path is not None:
            message = self.plan_view.load_plan(path)
            self.notify(message, severity="information" if "loaded" in message else "error")
            self.action_show_tab("plan")

    def action_launch(self) -> None:
        if self.active_tab != "serve":
            self.action_show_tab("serve")
        self.serve_view.action_launch()

    def action_stop(self) -> None:
        self.serve_view.action_stop()

    def action_solve(self) -> None:
        if self.active_tab != "plan":
            self.action_show_tab("plan")
        self.plan_view.action_solve()

    async def action_quit(self) -> None:
        """Stop the deployment this dashboard launched (off the UI loop), then exit."""
        if self.serve_view.owns_deployment:
            self.notify("stopping the deployment…")
            await self.run_worker(self.serve_view.stop_now, thread=True, group="quit").wait()
        self.exit()

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab, label in TABS:
            yield SystemCommand(
                f"Show {label}", f"Go to the {label} tab", partial(self.action_show_tab, tab)
            )
        yield SystemCommand("Solve plan", "Plan the form's model and workload", self.action_solve)
        yield SystemCommand(
            "Cancel solving", "Drop the running solve", partial(self.plan_view.action_cancel_solve)
        )
        yield SystemCommand(
            "Save plan", "Write the plan to a plan.json file", self.action_save_plan
        )
        yield SystemCommand("Load plan", "Read a plan.json file", self.action_load_plan)
        yield SystemCommand("Launch plan", "Serve the plan on this host", self.action_launch)
        yield SystemCommand("Stop deployment", "Stop what the dashboard launched", self.action_stop)
        yield SystemCommand("Help", "Keys and what each tab does", self.action_help)
        for name in self.own_themes:
            yield SystemCommand(
                f"Theme: {name}",
                "Switch to this theme (remembered)",
                partial(setattr, self, "theme", name),
                discover=False,
            )


def run_dashboard(
    theme: str | None,
    cluster: Path | None,
    model: str | None,
    ray: str | None = None,
    attach: str | None = None,
    http: str | None = None,
) -> None:
    """Open the dashboard in this terminal; returns when the operator quits. With ``http``
    (HOST:PORT), a deployment it launches also serves the OpenAI-compatible HTTP API there.

    Raises:
        DashboardError: no such cluster file, an unknown theme, a bad --http, or no terminal.
    """
    if http is not None:
        from runtime.serve.http import split_listen

        try:
            split_listen(http)
        except ValueError as exc:
            raise DashboardError(f"--http: {exc}") from exc
    if cluster is not None and not cluster.is_file():
        raise DashboardError(f"--cluster: no file {cluster}")
    if cluster is not None and ray is not None:
        raise DashboardError("--cluster and --ray exclude each other")
    app = PqctlApp(theme=theme, cluster=cluster, model=model, ray=ray, attach=attach, http=http)
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise DashboardError(
            "the dashboard needs a terminal; for scripts use pqctl plan / apply / generate "
            "(pqctl --help lists the commands)"
        )
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM)}

    def leave(_signum: int, _frame: object) -> None:  # terminal closed, or kill: exit cleanly
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_soon_threadsafe(app.exit)

    for sig in previous:
        signal.signal(sig, leave)
    try:
        app.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        app.session.close()  # the solver process
        if app.serve is not None:
            app.serve.stop_now()  # never leave the deployment behind, however the app ended
