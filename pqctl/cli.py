"""The ``pqctl`` command line: the dashboard with no command, and the command groups of
:mod:`pqctl.commands`, each a thin adapter over ``planner`` and ``runtime``.

Exit codes: 0 success, 1 unexpected failure, 2 bad input (options or files), 3 no feasible
plan, 4 a stage failed while serving, 5 no deployment reachable, 130 interrupted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from pqctl.commands import cluster, plan, profile, quality, serve
from pqctl.exits import EXIT_BAD_INPUT, fail
from pqctl.render.console import make_console

app = typer.Typer(
    name="pqctl",
    help="Serve large language models on heterogeneous clusters: one solver picks the pipeline "
    "partition, every layer's weight precision and the micro-batch sizes. With no command, pqctl "
    "opens its dashboard in this terminal.",
    no_args_is_help=False,
    invoke_without_command=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def dashboard(
    ctx: typer.Context,
    theme: Annotated[
        str | None,
        typer.Option(
            help="Dashboard theme: pqctl-dark, pqctl-light, pqctl-high-contrast or a "
            "user theme's name (remembered; see docs/themes.md)."
        ),
    ] = None,
    cluster: Annotated[
        Path | None,
        typer.Option(help="Cluster file for the dashboard (default: this host).", dir_okay=False),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model the dashboard plans (default: the built-in one)."),
    ] = None,
    ray: Annotated[
        str | None,
        typer.Option(
            help="The dashboard over a Ray cluster: HOST:PORT of its head, or auto (every "
            "node's devices with live figures, plans over them, launch through Ray)."
        ),
    ] = None,
    attach: Annotated[
        str | None,
        typer.Option(
            help="Open the dashboard on the running deployment NAME (started by pqctl apply or "
            "another dashboard; pqctl status lists them); it keeps running when you quit."
        ),
    ] = None,
    http: Annotated[
        str | None,
        typer.Option(
            help="A deployment the dashboard launches also serves the OpenAI-compatible HTTP "
            "API on HOST:PORT (guarded by $PQCTL_API_KEY when set; docs/http.md)."
        ),
    ] = None,
) -> None:
    """With no command, open the dashboard: cluster, plans, serving and prompts in one terminal
    UI. The commands below do the same from scripts."""
    if ctx.invoked_subcommand is not None:
        if (theme, cluster, model, ray, attach, http) != (None,) * 6:
            raise fail(
                "bad option",
                "--theme, --cluster, --model, --ray, --attach and --http before a command apply "
                "to the dashboard only; give the command's own options after its name",
                EXIT_BAD_INPUT,
            )
        return
    from pqctl.tui.app import DashboardError, run_dashboard  # Textual loads only for the UI

    try:
        run_dashboard(theme, cluster, model, ray, attach, http)
    except DashboardError as exc:
        raise fail("cannot open the dashboard", str(exc), EXIT_BAD_INPUT) from exc


app.command()(cluster.cluster)
app.command()(plan.plan)
app.command()(plan.show)
app.command()(quality.calibrate)
app.command(name="eval")(quality.evaluate)
app.command()(serve.apply)
app.command()(serve.generate)
app.command()(serve.stop)
app.command()(serve.status)
app.command()(profile.profile)
app.add_typer(serve.keys_app, name="keys")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        make_console(stderr=True).print("interrupted")
        sys.exit(130)
