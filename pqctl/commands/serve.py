"""``pqctl apply`` / ``generate`` / ``stop`` / ``keys``: serving a plan from the command line.

The gateway starts through :mod:`runtime.serve.launcher` (as the dashboard starts it), the
tables it shows come from :mod:`pqctl.render.deployment`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape

from planner.plan import Plan, PlanValidationError, Stage
from pqctl.exits import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_STAGE_FAILED,
    EXIT_UNREACHABLE,
    fail,
    load_plan,
)
from pqctl.render.console import make_console
from pqctl.render.deployment import (
    deployment_row,
    deployments_table,
    loading_lines,
    loading_view,
    serving_summary,
    stage_table,
)
from runtime.model.arch import SERVED_FAMILIES
from runtime.serve.client import Client, ConnectionLost, NotAuthorized, ServerError
from runtime.serve.deployment import (
    DEFAULT_NAME,
    DeploymentError,
    DeploymentState,
    check_name,
    pid_alive,
    running_deployments,
    state_dir,
    stop_deployment,
)
from runtime.serve.keys import CurveKeys, init_keys
from runtime.serve.launcher import (
    API_KEY_ENV,
    BEAT_INTERVAL_S,
    BEAT_TIMEOUT_S,
    MAX_RESTARTS,
    RESTART_WINDOW_S,
    GatewayExited,
    GatewayLaunch,
    log_tail,
    start_gateway,
    wait_for_gateway,
)
from runtime.serve.monitor import Monitor

DEFAULT_ENDPOINT = "tcp://127.0.0.1:7460"
LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}

NameOption = Annotated[
    str, typer.Option("--name", help="Deployment name (several can run side by side).")
]
KeysOption = Annotated[
    Path | None,
    typer.Option(
        "--keys",
        help="CURVE key directory (pqctl keys init): encrypt and authenticate sockets.",
        file_okay=False,
    ),
]


def _local_hosts() -> set[str]:
    return LOCAL_HOSTS | {socket.gethostname(), socket.getfqdn()}


def _check_name(name: str) -> str:
    try:
        return check_name(name)
    except DeploymentError as exc:
        raise fail("bad option", f"--name: {exc}", EXIT_BAD_INPUT) from exc


def apply(
    plan_file: Annotated[Path, typer.Argument(help="plan.json from pqctl plan.", dir_okay=False)],
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="Return once serving; stop with pqctl stop.")
    ] = False,
    endpoint: Annotated[
        str,
        typer.Option("--endpoint", help="Client endpoint to bind (ZeroMQ; port * = any free)."),
    ] = DEFAULT_ENDPOINT,
    name: NameOption = DEFAULT_NAME,
    keys: KeysOption = None,
    ready_timeout: Annotated[
        float, typer.Option("--ready-timeout", help="Seconds to wait for every stage to load.")
    ] = 600.0,
    restarts: Annotated[
        int,
        typer.Option(
            "--restarts",
            help="Stage failures restarted within --restart-window; one more ends the deployment.",
            min=0,
        ),
    ] = MAX_RESTARTS,
    restart_window: Annotated[
        float,
        typer.Option(
            "--restart-window",
            help="Seconds over which stage failures are counted (older ones are forgotten).",
        ),
    ] = RESTART_WINDOW_S,
    heartbeat_interval: Annotated[
        float,
        typer.Option("--heartbeat-interval", help="Seconds between a stage's heartbeats."),
    ] = BEAT_INTERVAL_S,
    heartbeat_timeout: Annotated[
        float,
        typer.Option(
            "--heartbeat-timeout",
            help="A serving stage silent this long is lost: its requests fail and it restarts. "
            "Longer than one step of the plan's (a stage beats between steps).",
        ),
    ] = BEAT_TIMEOUT_S,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the deployment's state as JSON once serving.")
    ] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Start each stage on its host through the Ray cluster at HOST:PORT (or auto); "
            "the gateway runs here. Needs pip install 'pqctl[ray]'.",
        ),
    ] = None,
    replan_on_loss: Annotated[
        bool,
        typer.Option(
            "--replan-on-loss",
            help="With --ray: when a host is lost, re-plan on the hosts left (same model, "
            "workload and quality target) and serve the new plan; requests meanwhile are "
            "refused as re-planning.",
        ),
    ] = False,
    http: Annotated[
        str | None,
        typer.Option(
            "--http",
            help="Also serve the OpenAI-compatible HTTP API on HOST:PORT (e.g. 127.0.0.1:8000): "
            "/v1/models, /v1/completions, /v1/chat/completions, /health, /metrics "
            "(docs/http.md).",
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar=API_KEY_ENV,
            show_envvar=True,
            help="With --http: the key every route but /health requires (Authorization: Bearer "
            "KEY). Prefer the environment variable: a command line is visible to other users.",
        ),
    ] = None,
) -> None:
    """Serve a plan: one process per stage (here, or on its host with --ray), a gateway here.

    Then, unless --detach, a live table of measured vs predicted tokens/s per stage until Ctrl-C.
    """
    plan = load_plan(plan_file)
    if plan.model.family not in SERVED_FAMILIES:
        raise fail(
            "unsupported architecture",
            f"the plan is for a {plan.model.family} model; pqctl serves the "
            f"{', '.join(SERVED_FAMILIES)} families (Llama also covers Mistral and Qwen2)",
            EXIT_BAD_INPUT,
        )
    name = _check_name(name)
    supervision = _check_supervision(
        heartbeat_interval, heartbeat_timeout, restart_window, plan.stages
    )
    remote = [s for s in plan.stages if s.device.host not in _local_hosts()]
    if replan_on_loss and ray is None:
        raise fail("bad option", "--replan-on-loss needs --ray", EXIT_BAD_INPUT)
    _check_endpoint_free(endpoint)
    if http is not None:
        _check_http_free(http)
    if ray is not None:
        ray = _check_ray_hosts(ray, plan)
    elif remote:
        hosts = ", ".join(sorted({s.device.host for s in remote}))
        raise fail(
            "cannot start stages",
            f"the plan puts stages on {hosts}, not this host ({socket.gethostname()}); "
            "start them through Ray (pqctl apply --ray HOST:PORT), or plan with --local to "
            "serve here.",
            EXIT_BAD_INPUT,
        )
    if ray is None:
        _check_local_devices(plan)
        _check_checkpoint(plan)
    try:
        running = DeploymentState.load(name)
    except DeploymentError:
        running = None
    if running is not None:
        raise fail(
            "already running",
            f'deployment "{name}" is serving at {running.client_endpoint} (pid {running.pid}); '
            f"stop it with pqctl stop --name {name} or pick another --name",
            EXIT_BAD_INPUT,
        )
    if keys is not None:
        try:
            CurveKeys.load(keys)
        except ValueError as exc:
            raise fail("bad keys", str(exc), EXIT_BAD_INPUT) from exc
    console = make_console(stderr=True)
    process, log = _start_gateway(
        plan_file, name, endpoint, keys, restarts, ray, replan_on_loss, supervision, http, api_key
    )
    state = _wait_for_state(process, name, log)
    monitor = _monitor(state)
    try:
        if not _wait_until_serving(monitor, process, plan, ready_timeout, console, log):
            _stop_quietly(state)
            raise typer.Exit(EXIT_STAGE_FAILED)
        if as_json:
            typer.echo(json.dumps(_state_dict(state), indent=2))
        else:
            flag = _name_flag(name)
            console.print(
                f"[bold green]serving[/] {plan.model.source} ({_stages(len(plan.stages))}) at "
                f"[bold]{state.client_endpoint}[/]"
                + (f" and [bold]http://{http}/v1[/] (OpenAI API)" if http else "")
                + "\n"
                f'  try: pqctl generate{flag} "ROMEO:"   stop: pqctl stop{flag}',
                highlight=False,
            )
        if detach:
            return
        code = _live_table(monitor, process, plan, state)
    finally:
        monitor.close()
    raise typer.Exit(code)


def _stages(n: int) -> str:
    return f"{n} stage" if n == 1 else f"{n} stages"


def _name_flag(name: str) -> str:
    return "" if name == DEFAULT_NAME else f" --name {name}"


def _state_dict(state: DeploymentState) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(state)


def _check_ray_hosts(address: str, plan: Plan) -> str:
    """The resolved Ray address, once Ray answers there and has every host of the plan (exit 2
    naming the address or the hosts otherwise)."""
    from runtime.cluster.ray_nodes import RayClusterError, connected
    from runtime.serve.ray_launcher import RayLaunchError, nodes_for

    try:
        with connected(address) as resolved:
            nodes_for(plan)
    except RayClusterError as exc:
        raise fail("Ray cluster", str(exc), EXIT_BAD_INPUT) from exc
    except RayLaunchError as exc:
        raise fail(exc.title, str(exc), EXIT_BAD_INPUT) from exc
    return resolved


def _check_endpoint_free(endpoint: str) -> None:
    """Exit 2 naming --endpoint when it is not a tcp:// or ipc:// endpoint, or its port is
    already taken (the gateway would fail to bind it only after starting)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "ipc") or not rest:
        raise fail(
            "bad option",
            f"--endpoint: {endpoint!r} is not tcp://HOST:PORT or ipc://PATH",
            EXIT_BAD_INPUT,
        )
    if scheme != "tcp":
        return
    host, sep, port_text = rest.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port_text == "*" or port_text.isdigit()):
        raise fail("bad option", f"--endpoint: {endpoint!r} is not tcp://HOST:PORT", EXIT_BAD_INPUT)
    if port_text == "*":
        return
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise fail("bad option", f"--endpoint: port {port} is outside 1..65535", EXIT_BAD_INPUT)
    hint = (
        "another deployment may hold it (pqctl status lists them): give another port, or "
        "port * for any free one"
    )
    _check_port_free("--endpoint", None if host == "*" else host, port, endpoint, hint)


def _check_http_free(listen: str) -> None:
    """Exit 2 naming --http when it is not HOST:PORT or that port is taken."""
    from runtime.serve.http import split_listen

    try:
        host, port = split_listen(listen)
    except ValueError as exc:
        raise fail("bad option", f"--http: {exc}", EXIT_BAD_INPUT) from exc
    _check_port_free("--http", host, port, listen, "give another port")


def _check_port_free(flag: str, host: str | None, port: int, shown: str, hint: str) -> None:
    """Exit 2 naming ``flag`` when ``host`` does not resolve or ``port`` cannot be listened on
    there (the server would fail to bind it only after starting)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise fail(
            "bad option", f"{flag}: cannot resolve {host} ({exc.strerror})", EXIT_BAD_INPUT
        ) from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers' listeners
        try:
            probe.bind(address)
        except OSError as exc:
            raise fail(
                "bad option",
                f"{flag}: cannot listen on {shown} ({exc.strerror}); {hint}",
                EXIT_BAD_INPUT,
            ) from exc


def _check_local_devices(plan: Plan) -> None:
    """Exit 2 naming the stage when the plan puts a stage on a GPU this host does not have."""
    wanted = [(k, s.device) for k, s in enumerate(plan.stages) if s.device.index >= 0]
    if not wanted:
        return
    from runtime.cluster.discovery import discover_gpus

    found = discover_gpus()
    count = len(found.gpus)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    for k, device in wanted:
        if device.index >= count:
            have = f"{count} NVIDIA GPU{'s' if count != 1 else ''}" if count else "no GPU"
            why = f" ({found.reason})" if found.reason else ""
            raise fail(
                "cannot start stages",
                f"stages[{k}].device is {device.key} but this host has {have}{why}; re-plan "
                "for this host (pqctl plan --local)",
                EXIT_BAD_INPUT,
            )


def _check_checkpoint(plan: Plan) -> None:
    """Exit 2 when the plan's checkpoint, found here, is not the model the plan describes (or
    no family pqctl serves). A hub id not downloaded yet is left to the gateway."""
    from runtime.errors import RuntimeFailure
    from runtime.model.source import checked_checkpoint, is_hub_id

    if is_hub_id(plan.model.source):
        return
    try:
        checked_checkpoint(plan)
    except RuntimeFailure as exc:
        raise fail(exc.title, exc.msg, EXIT_BAD_INPUT) from exc


def _start_gateway(
    plan_file: Path,
    name: str,
    endpoint: str,
    keys: Path | None,
    restarts: int = MAX_RESTARTS,
    ray: str | None = None,
    replan_on_loss: bool = False,
    supervision: tuple[float, float, float] | None = None,
    http: str | None = None,
    api_key: str | None = None,
) -> tuple[subprocess.Popen[bytes], Path]:
    logs = state_dir() / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "gateway.log"
    keys = keys.resolve() if keys is not None else None
    interval, timeout, window = supervision or (None, None, None)
    launch = GatewayLaunch(
        plan_file.resolve(), name, endpoint, restarts, keys, ray, replan_on_loss,
        interval, timeout, window, http, api_key if http else None,
    )  # fmt: skip
    return start_gateway(launch, log), log


def _check_supervision(
    interval: float, timeout: float, window: float, stages: tuple[Stage, ...]
) -> tuple[float, float, float]:
    """The heartbeat and restart options, checked (exit 2 naming the flag)."""
    if not 0.05 <= interval <= 60:
        raise fail("bad option", "--heartbeat-interval: give 0.05 to 60 seconds", EXIT_BAD_INPUT)
    if not 2 * interval <= timeout <= 3600:
        raise fail(
            "bad option",
            f"--heartbeat-timeout: give at least twice --heartbeat-interval ({2 * interval:g} s) "
            "and at most 3600 s",
            EXIT_BAD_INPUT,
        )
    if not 1 <= window <= 10**7:
        raise fail("bad option", "--restart-window: give 1 to 10^7 seconds", EXIT_BAD_INPUT)
    step = max((max(s.predicted.prefill_s, s.predicted.decode_s) for s in stages), default=0.0)
    if step + interval > timeout:
        make_console(stderr=True).print(
            f"[yellow]warning:[/] the plan predicts steps of {step:.1f} s, longer than "
            f"--heartbeat-timeout ({timeout:g} s) allows between heartbeats; a busy stage may "
            f"be taken for a hung one (give --heartbeat-timeout {2 * step + 2 * interval:.0f})",
            highlight=False,
        )
    return interval, timeout, window


def _wait_for_state(process: subprocess.Popen[bytes], name: str, log: Path) -> DeploymentState:
    try:
        state = wait_for_gateway(process, name, 120)
    except GatewayExited as exc:
        raise fail(exc.title, log_tail(log, 12) or exc.msg, EXIT_FAILURE) from exc
    if state is None:
        process.kill()
        raise fail("gateway did not start", f"no state file after 120 s; see {log}", EXIT_FAILURE)
    return state


def _wait_until_serving(
    monitor: Monitor,
    process: subprocess.Popen[bytes],
    plan: Plan,
    timeout_s: float,
    console: Console,
    log: Path,
) -> bool:
    deadline = time.monotonic() + timeout_s
    said: dict[int, str] = {}
    with Live(console=console, transient=True, refresh_per_second=4) as live:
        while time.monotonic() < deadline:
            monitor.poll(0.25)
            status = monitor.status
            if status is not None:
                if console.is_terminal:
                    live.update(loading_view(status, plan))
                else:  # a log: one line each time a stage's state changes
                    for line in loading_lines(status, plan, said):
                        console.print(line, highlight=False, soft_wrap=True)
                if status["phase"] == "serving":
                    return True
                if status["phase"] == "failed":
                    break
            if process.poll() is not None:
                break
    status = monitor.status or {}
    message = status.get("failure") or log_tail(log, 12) or "gateway exited"
    if time.monotonic() >= deadline:
        message = f"stages not ready after {timeout_s:.0f} s"
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    console.print(f"logs: {log.parent}", highlight=False)
    return False


def _live_table(
    monitor: Monitor, process: subprocess.Popen[bytes], plan: Plan, state: DeploymentState
) -> int:
    console = make_console()
    interrupted = False

    def on_sigint(*_: object) -> None:
        nonlocal interrupted
        interrupted = True

    previous = signal.signal(signal.SIGINT, on_sigint)
    shown = None
    try:
        with Live(console=console, refresh_per_second=2) as live:
            while not interrupted and process.poll() is None:
                monitor.poll(1.0)
                note = (monitor.status or {}).get("replan")
                if note and note != shown:  # a host was lost: old and new stages, then the new
                    shown = note
                    live.console.print(f"[bold yellow]{escape(note)}[/]", highlight=False)
                    plan = _current_plan(state, plan)
                live.update(Group(stage_table(monitor, plan), serving_summary(monitor)))
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        console.print("stopping…")
        stop_deployment(state)
        return EXIT_INTERRUPTED
    code = process.wait()
    failure = (monitor.status or {}).get("failure")
    if code != 0 or failure:
        make_console(stderr=True).print(
            f"[bold red]error:[/] {failure or f'gateway exited with {code}'}"
        )
        return EXIT_STAGE_FAILED
    return 0


def _current_plan(state: DeploymentState, plan: Plan) -> Plan:
    """The plan the deployment serves now (another after a re-plan), else ``plan``."""
    try:
        return Plan.load(Path(DeploymentState.load(state.name).plan))
    except (DeploymentError, PlanValidationError, OSError):
        return plan


def _stop_quietly(state: DeploymentState) -> None:
    if pid_alive(state.pid):
        stop_deployment(state)


def stop(
    name: NameOption = DEFAULT_NAME,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds to wait before killing what is left.")
    ] = 20.0,
) -> None:
    """Stop a deployment started with pqctl apply: every stage process and socket."""
    try:
        state = DeploymentState.load(_check_name(name))
    except DeploymentError as exc:
        raise fail("nothing to stop", str(exc), EXIT_UNREACHABLE) from exc
    clean = stop_deployment(state, timeout)
    make_console(stderr=True).print(
        f'stopped "{name}"' if clean else f'"{name}" did not stop in {timeout:.0f} s; killed it'
    )


def status(
    name: Annotated[
        str | None, typer.Option("--name", help="Only this deployment (default: every one).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="A JSON list, one object per deployment.")
    ] = False,
    wait: Annotated[
        float, typer.Option("--wait", help="Seconds to wait for each deployment's status.")
    ] = 2.0,
) -> None:
    """List the deployments running on this host: name, plan, endpoint, stages, pid, uptime,
    requests. Any of them can be used by name (pqctl generate/stop --name)."""
    if name is not None:
        try:
            states = [DeploymentState.load(_check_name(name))]
        except DeploymentError as exc:
            raise fail("no deployment", str(exc), EXIT_UNREACHABLE) from exc
    else:
        states = running_deployments()
    rows = [deployment_row(state, _snapshot(state, wait)) for state in states]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        make_console(stderr=True).print("no deployment is running here; start one with pqctl apply")
        return
    make_console(soft_wrap=True).print(deployments_table(rows))


def _monitor(state: DeploymentState) -> Monitor:
    """A monitor of the deployment, with its own keys (exit 2 when this user cannot read
    them)."""
    try:
        return Monitor.of(state)
    except ValueError as exc:
        raise fail("cannot watch the deployment", str(exc), EXIT_BAD_INPUT) from exc


def _snapshot(state: DeploymentState, wait_s: float) -> dict[str, Any] | None:
    """The deployment's next status message (None when none comes within ``wait_s``)."""
    monitor = _monitor(state)
    try:
        deadline = time.monotonic() + wait_s
        while monitor.status is None and time.monotonic() < deadline:
            monitor.poll(min(0.2, max(0.0, deadline - time.monotonic())))
        return monitor.status
    finally:
        monitor.close()


def generate(
    prompts: Annotated[
        list[str], typer.Argument(help='Prompt(s); "-" reads one prompt from standard input.')
    ],
    max_new: Annotated[int, typer.Option("--max-new", "-n", help="Most new tokens.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", "-t", help="0 = greedy.")] = 0.0,
    top_k: Annotated[
        int, typer.Option("--top-k", help="Sample from the k likeliest (0 = off).")
    ] = 0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Seed for reproducible sampling.")
    ] = None,
    stop_strings: Annotated[
        list[str] | None, typer.Option("--stop", help="Stop before this text (repeatable).")
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Keep going past end-of-sequence tokens.")
    ] = False,
    stream: Annotated[
        bool, typer.Option("--stream/--no-stream", help="Print tokens as they arrive.")
    ] = True,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per prompt: text, tokens, usage.")
    ] = False,
    name: NameOption = DEFAULT_NAME,
    endpoint: Annotated[
        str | None, typer.Option("--endpoint", help="Connect here instead of to --name.")
    ] = None,
    keys: KeysOption = None,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Longest wait for a reply, seconds.")
    ] = 120.0,
) -> None:
    """Send prompts to a running deployment and print what it generates."""
    texts = [sys.stdin.read() if p == "-" else p for p in prompts]
    options: dict[str, Any] = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "ignore_eos": ignore_eos,
    }
    if seed is not None:
        options["seed"] = seed
    if stop_strings:
        options["stop"] = list(stop_strings)
    try:
        client = Client(endpoint, name=_check_name(name), keys=keys, timeout_s=timeout)
    except (DeploymentError, ValueError) as exc:
        raise fail("no deployment", str(exc), EXIT_UNREACHABLE) from exc
    out = make_console(highlight=False, soft_wrap=True)
    try:
        if stream and not as_json and len(texts) == 1:
            pieces = client.stream(texts[0], max_new_tokens=max_new, **options)
            first = next(pieces, "")  # the request is accepted before anything is printed
            out.print(texts[0], end="", style="bold")
            out.print(first, end="")
            for piece in pieces:
                out.print(piece, end="")
            out.print()
            return
        done = client.generate_many(texts, max_new_tokens=max_new, **options)
        for prompt, completion in zip(texts, done, strict=True):
            if as_json:
                typer.echo(json.dumps({"prompt": prompt, **_completion_dict(completion)}))
            else:
                out.print(prompt, end="", style="bold")
                out.print(completion.text)
    except ServerError as exc:
        where = f" ({exc.field})" if exc.field else ""
        raise fail(f"request rejected: {exc.code}{where}", exc.message, EXIT_BAD_INPUT) from exc
    except NotAuthorized as exc:
        raise fail("not authorized", f"{exc}; give --keys", EXIT_UNREACHABLE) from exc
    except ConnectionLost as exc:
        raise fail("connection lost", str(exc), EXIT_UNREACHABLE) from exc
    except TimeoutError as exc:
        raise fail("no reply", f"{exc}; is the deployment running?", EXIT_UNREACHABLE) from exc
    finally:
        client.close()


def _completion_dict(c: Any) -> dict[str, Any]:
    return {
        "text": c.text,
        "token_ids": c.token_ids,
        "finish_reason": c.finish_reason,
        "usage": c.usage,
    }


keys_app = typer.Typer(help="CURVE keys that encrypt and authenticate a deployment's sockets.")


@keys_app.command("init")
def keys_init(
    directory: Annotated[Path, typer.Argument(help="Directory to create.", file_okay=False)],
) -> None:
    """Create a key directory for pqctl apply --keys (see runtime/serve/keys.py for its layout)."""
    try:
        written = init_keys(directory)
    except FileExistsError as exc:
        raise fail("keys exist", str(exc), EXIT_BAD_INPUT) from exc
    for path in written:
        typer.echo(str(path))
