"""The ``pqctl profile`` command: parse, call :func:`pqctl.device_profiles.run_profile`, render."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from planner.errors import ModelConfigError, PlannerError
from planner.plan import ALL_BITS
from planner.profiles import default_profile_dir
from pqctl import STARTED
from pqctl.commands.options import int_list, say_step
from pqctl.commands.progress import progress
from pqctl.exits import EXIT_BAD_INPUT, EXIT_FAILURE, fail
from pqctl.render.console import make_console
from runtime.errors import CheckpointError, RuntimeFailure, UnsupportedArchitectureError
from runtime.measure.grid import FULL_GRID, MIN_POINTS, QUICK_GRID, ProfileGrid

if TYPE_CHECKING:  # the measuring code loads torch: it is imported when a profile runs
    from pqctl.device_profiles import ProfileOutcome, ProfileRequest

GRIDS = {"quick": QUICK_GRID, "full": FULL_GRID}


def _grid(
    name: str,
    prefill_batches: str | None,
    prompt_lens: str | None,
    decode_batches: str | None,
    contexts: str | None,
    repeats: int | None,
) -> ProfileGrid:
    if name not in GRIDS:
        raise fail(
            "bad option", f'--grid: "{name}" is not one of {", ".join(GRIDS)}', EXIT_BAD_INPUT
        )
    grid = GRIDS[name]
    if prefill_batches is not None:
        grid = replace(grid, prefill_batches=int_list(prefill_batches, "--prefill-batches"))
    if prompt_lens is not None:
        grid = replace(grid, prompt_lens=int_list(prompt_lens, "--prompt-lens"))
    if decode_batches is not None:
        grid = replace(grid, decode_batches=int_list(decode_batches, "--decode-batches"))
    if contexts is not None:
        grid = replace(grid, contexts=int_list(contexts, "--contexts"))
    if repeats is not None:
        if repeats < 1:
            raise fail(
                "bad option", f"--repeats: must be at least 1, got {repeats}", EXIT_BAD_INPUT
            )
        grid = replace(grid, repeats=repeats)
    for phase, flags in (
        ("prefill", "--prefill-batches × --prompt-lens"),
        ("decode", "--decode-batches × --contexts"),
    ):
        have, need = len(grid.points(phase)), MIN_POINTS[phase]  # type: ignore[arg-type]
        if have < need:
            raise fail(
                "bad option",
                f"{flags}: {have} {phase} points, the fit needs at least {need}",
                EXIT_BAD_INPUT,
            )
    return grid


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _render(outcomes: list[ProfileOutcome]) -> None:
    console = make_console()
    for o in outcomes:
        m = o.measurement
        unavailable = ", ".join(f"{b} ({why})" for b, why in sorted(m.unavailable.items()))
        transfer = o.profile.transfer
        console.print(
            f"[bold]{o.target.torch_device}[/] ({o.target.device_type}): {o.path}\n"
            f"  {len(o.profile.samples)} layer samples in {m.elapsed_s:.1f} s"
            + (f", {m.trimmed} grid points left out for the time budget" if m.trimmed else "")
            + f"\n  unavailable: {unavailable or 'none'}"
            + (
                f"\n  activation hop (ZeroMQ, loopback): {1e6 * transfer.latency_s:.0f} µs + "
                f"{transfer.bandwidth_gb_s:.2f} GB/s"
                if transfer is not None
                else ""
            ),
            highlight=False,
        )
        table = Table(title="fit held-out error (leave-one-out MAPE)", title_justify="left")
        for column in ("fit", "phase", "samples", "held-out error"):
            table.add_column(column, justify="left" if column in ("fit", "phase") else "right")
        for e in o.fit_errors:
            table.add_row(e.what, e.phase, str(e.samples), _pct(e.held_out_mape))
        console.print(table)


def _as_json(outcomes: list[ProfileOutcome]) -> str:
    return json.dumps(
        [
            {
                "device": o.target.torch_device,
                "device_type": o.target.device_type,
                "file": str(o.path),
                "unavailable_bits": {str(b): w for b, w in o.measurement.unavailable.items()},
                "points_trimmed": o.measurement.trimmed,
                "elapsed_s": round(o.measurement.elapsed_s, 3),
                "fit_error": [
                    {
                        "fit": e.what,
                        "phase": e.phase,
                        "samples": e.samples,
                        "held_out_mape": e.held_out_mape,
                    }
                    for e in o.fit_errors
                ],
            }
            for o in outcomes
        ],
        indent=2,
    )


def _left_of(budget_s: float | None) -> float | None:
    """What is left of the command's --time-budget once it has started (loading torch and the
    measuring code takes seconds of it), so the whole command keeps to the budget."""
    if budget_s is None:
        return None
    return max(0.0, budget_s - (time.monotonic() - STARTED))


def profile(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Checkpoint directory, config.json or example name; only the "
            "shape matters (weights are random). Default: the built-in model.",
        ),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", "-d", help="cpu, cuda:N, or all (every GPU and the CPU).")
    ] = "all",
    bits: Annotated[
        str, typer.Option("--bits", help="Precisions to measure, comma-separated.")
    ] = "16,8,4,3,2",
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            help="Seconds for the whole run: the grid is trimmed to fit, "
            "keeping the points each fit needs.",
        ),
    ] = None,
    grid: Annotated[
        str, typer.Option("--grid", help="quick or full; the options below override parts.")
    ] = "quick",
    prefill_batches: Annotated[
        str | None, typer.Option("--prefill-batches", help="Prefill micro-batch sizes, e.g. 1,2,4.")
    ] = None,
    prompt_lens: Annotated[
        str | None, typer.Option("--prompt-lens", help="Prefill prompt lengths, e.g. 64,128,256.")
    ] = None,
    decode_batches: Annotated[
        str | None, typer.Option("--decode-batches", help="Decode micro-batch sizes.")
    ] = None,
    contexts: Annotated[
        str | None, typer.Option("--contexts", help="Decode context lengths (past + 1).")
    ] = None,
    repeats: Annotated[
        int | None,
        typer.Option("--repeats", help="Passes over the grid (the shortest time counts)."),
    ] = None,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", help="Quantization group size; default as pqctl plan's."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            file_okay=False,
            help="Directory for the profile files. Default: $PQCTL_PROFILE_DIR or "
            "~/.cache/pqctl/profiles (where pqctl plan looks).",
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            help="torch threads while measuring; default torch's own, as the stage workers run.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Profile a Ray cluster instead of this host: one node of each device type "
            "(HOST:PORT of the head, or auto); the files are written here.",
        ),
    ] = None,
) -> None:
    """Measure this host's devices (or, with --ray, one of each device type of a Ray cluster)
    for a model shape and write the profiles pqctl plan uses.

    Times one decoder layer per precision (prefill and decode grids), the embedding, the head
    and the activation hop between stages.
    """
    if time_budget is not None and not time_budget > 0:
        raise fail(
            "bad option", f"--time-budget: must be positive, got {time_budget}", EXIT_BAD_INPUT
        )
    if threads is not None and threads <= 0:
        raise fail("bad option", f"--threads: must be positive, got {threads}", EXIT_BAD_INPUT)
    if group_size is not None and group_size <= 0:
        raise fail(
            "bad option", f"--group-size: must be positive, got {group_size}", EXIT_BAD_INPUT
        )
    from pqctl.device_profiles import ProfileRequest, run_profile  # loads torch: seconds

    request = ProfileRequest(
        model=model,
        devices=device,
        bits=int_list(bits, "--bits", ALL_BITS),
        grid=_grid(grid, prefill_batches, prompt_lens, decode_batches, contexts, repeats),
        budget_s=_left_of(time_budget),
        output_dir=output if output is not None else default_profile_dir(),
        group_size=group_size,
        threads=threads,
    )
    if ray is not None:
        if device != "all":
            raise fail(
                "bad option",
                "--device and --ray exclude each other: --ray profiles one device of each type",
                EXIT_BAD_INPUT,
            )
        _profile_over_ray(ray, request, as_json)
        return
    points = sum(len(request.grid.points(phase)) for phase in ("prefill", "decode"))
    bits_text = ",".join(map(str, request.bits))
    make_console(stderr=True).print(
        f"profiling {device} at {bits_text} bits: {points} grid points per precision"
        + (
            f", trimmed to keep the whole run within --time-budget {time_budget:g} s"
            if time_budget is not None
            else f", {request.grid.repeats}+ passes each; no time limit (--time-budget bounds it)"
        ),
        highlight=False,
    )
    try:
        with progress("samples") as update:
            outcomes = run_profile(request, lambda what, *n: update(f"profiling {what}", *n))
    except ModelConfigError as exc:
        raise fail(exc.title, f"--model: {exc.msg}", EXIT_BAD_INPUT) from exc
    except PlannerError as exc:
        raise fail(exc.title, exc.msg, EXIT_BAD_INPUT) from exc
    except (UnsupportedArchitectureError, CheckpointError) as exc:
        raise fail(exc.title, f"--model: {exc.msg}", EXIT_BAD_INPUT) from exc
    except RuntimeFailure as exc:
        raise fail(exc.title, exc.msg, EXIT_FAILURE) from exc
    except OSError as exc:
        raise fail("cannot write profiles", f"--output: {exc}", EXIT_BAD_INPUT) from exc
    if as_json:
        typer.echo(_as_json(outcomes))
    else:
        _render(outcomes)


def _profile_over_ray(address: str, request: ProfileRequest, as_json: bool) -> None:
    from pqctl.ray_profiles import ray_profiles
    from runtime.cluster.ray_nodes import RayClusterError

    try:
        done = ray_profiles(address, request, say_step)
    except RayClusterError as exc:
        raise fail("Ray cluster", str(exc), EXIT_BAD_INPUT) from exc
    if as_json:
        rows = [
            {"host": r.host, "device": r.device, "device_type": r.device_type, "path": str(r.path)}
            for r in done
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="Profiles measured over Ray", title_justify="left")
    for column in ("device type", "measured on", "file"):
        table.add_column(column)
    for r in done:
        table.add_row(r.device_type, f"{r.host}/{r.device}", str(r.path))
    make_console().print(table)
