"""The ``pqctl calibrate`` and ``pqctl eval`` commands: parse, call :mod:`pqctl.model_quality`,
render."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from planner.cost_model import default_group_size
from planner.errors import PlannerError
from planner.plan import ALL_BITS, Plan
from pqctl import model_quality
from pqctl.exits import EXIT_BAD_INPUT, fail, load_plan
from runtime.errors import RuntimeFailure
from runtime.model.assets import BUILTIN_MODEL_NAME
from runtime.model.source import checked_checkpoint, resolve_checkpoint

PARTS = ("evaluation", "calibration", "all")

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help=f"Hugging Face checkpoint directory or hub id. Default: {BUILTIN_MODEL_NAME}.",
    ),
]
TextOption = Annotated[
    Path | None,
    typer.Option("--text", help="UTF-8 text file to read.", dir_okay=False),
]
TokensOption = Annotated[
    int | None, typer.Option("--tokens", help="Read at most this many predicted tokens.")
]
SeqLenOption = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
DeviceOption = Annotated[str, typer.Option("--device", help="cpu or cuda:N.")]
PassOption = Annotated[
    int | None,
    typer.Option(
        "--layers-per-pass",
        help="Decoder layers loaded at a time. Default: as many as fit in half the free memory.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _check_sizes(tokens: int | None, seq_len: int) -> None:
    if tokens is not None and tokens < 1:
        raise fail("bad option", f"--tokens: must be positive, got {tokens}", EXIT_BAD_INPUT)
    if seq_len < 1:
        raise fail("bad option", f"--seq-len: must be positive, got {seq_len}", EXIT_BAD_INPUT)


@contextmanager
def _failing_as(title: str) -> Iterator[None]:
    """Runtime, planner and value errors of the work inside as exit 2 under ``title``."""
    try:
        yield
    except (RuntimeFailure, PlannerError) as exc:
        raise fail(title, exc.msg, EXIT_BAD_INPUT) from exc
    except ValueError as exc:
        raise fail(title, str(exc), EXIT_BAD_INPUT) from exc


@contextmanager
def _progress_bar(show: bool) -> Iterator[model_quality.Progress | None]:
    """A rich progress bar on stderr (TTY only); yields the callback, or None."""
    if not show:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("loading", total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        yield update


def calibrate(
    model: ModelOption = None,
    text: TextOption = None,
    tokens: TokensOption = None,
    seq_len: SeqLenOption = 128,
    group_size: Annotated[
        int | None,
        typer.Option("--group-size", help="Quantization group size. Default: the planner's."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Statistics file to write. Default: $PQCTL_STATS_DIR or ~/.cache/pqctl/stats, "
            "<model key>.json, where pqctl plan finds it.",
            dir_okay=False,
        ),
    ] = None,
    mixed_plans: Annotated[
        int,
        typer.Option(
            "--mixed-plans",
            help="Seeded random mixed-precision assignments measured for the perplexity "
            "mapping, besides uniform 8/4/3/2 bits.",
        ),
    ] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the mixed assignments.")] = 0,
    layers_per_pass: PassOption = None,
    device: DeviceOption = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Collect the quality indicator's statistics and fit Σω ↔ perplexity increase.

    Reads the text (default: the calibration part of the built-in held-out play) a range of
    layers at a time, then measures perplexity under a few precision assignments.
    """
    _check_sizes(tokens, seq_len)
    if mixed_plans < 0:
        raise fail("bad option", "--mixed-plans: must be 0 or more", EXIT_BAD_INPUT)
    if group_size is not None and group_size < 1:
        raise fail("bad option", "--group-size: must be positive", EXIT_BAD_INPUT)
    request = model_quality.CalibrateRequest(
        model, text, tokens, seq_len, group_size, output, layers_per_pass, device, mixed_plans, seed
    )
    with _failing_as("cannot calibrate"), _progress_bar(sys.stderr.isatty()) as progress:
        outcome = model_quality.calibrate(request, progress)
    mapping = outcome.mapping
    if as_json:
        typer.echo(json.dumps({"path": str(outcome.path), **mapping.to_dict()}, indent=2))
        return
    console = Console()
    console.print(
        f"statistics of {outcome.stats['tokens']} tokens ({mapping.text}) written to "
        f"{outcome.path}",
        highlight=False,
    )
    console.print(
        f"16-bit perplexity {mapping.baseline_perplexity:.3f}; mapping ln(ppl/ppl16) = "
        f"{mapping.slope:.4g}·Σω (least squares: {mapping.fit_slope:.4g}), "
        f"indicator {mapping.indicator}",
        highlight=False,
    )
    for point in mapping.points:
        increase = point.perplexity / mapping.baseline_perplexity - 1
        bits = ",".join(map(str, point.layer_bits))
        console.print(
            f"  Σω {point.omega:.4f}  ppl {point.perplexity:.3f} (+{increase:.2%})  [{bits}]",
            highlight=False,
        )


def _eval_target(
    model: str | None, plan_file: Path | None, bits: int | None, group_size: int | None
) -> tuple[Path, tuple[int, ...], int, Plan | None]:
    """Checkpoint, per-layer bits and group size from --plan or --bits."""
    if (plan_file is None) == (bits is None):
        raise fail("bad option", "give exactly one of --plan and --bits", EXIT_BAD_INPUT)
    if plan_file is not None:
        if group_size is not None:
            raise fail("bad option", "--group-size: the plan gives the group size", EXIT_BAD_INPUT)
        plan = load_plan(plan_file, "--plan")
        checkpoint, _ = checked_checkpoint(plan, resolve_checkpoint(model) if model else None)
        return checkpoint, plan.layer_bits, plan.quantization.group_size, plan
    if bits not in ALL_BITS:
        choices = ", ".join(map(str, ALL_BITS))
        raise fail("bad option", f"--bits: {bits} is not one of {choices}", EXIT_BAD_INPUT)
    spec, checkpoint = model_quality.resolve(model)
    group = group_size or default_group_size(spec)
    return checkpoint, (int(bits),) * spec.num_layers, group, None


def evaluate(
    model: ModelOption = None,
    plan: Annotated[
        Path | None,
        typer.Option("--plan", help="Evaluate this plan's per-layer precisions.", dir_okay=False),
    ] = None,
    bits: Annotated[
        int | None, typer.Option("--bits", help="Evaluate every layer at 16, 8, 4, 3 or 2 bits.")
    ] = None,
    text: TextOption = None,
    part: Annotated[
        str,
        typer.Option(
            "--part",
            help="Part of the built-in held-out play without --text: evaluation (not read by "
            "calibrate), calibration or all.",
        ),
    ] = "evaluation",
    tokens: TokensOption = None,
    seq_len: SeqLenOption = 128,
    group_size: Annotated[
        int | None, typer.Option("--group-size", help="Group size with --bits.")
    ] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline", help="Also measure 16 bits and report the increase.")
    ] = False,
    layers_per_pass: PassOption = None,
    device: DeviceOption = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Perplexity of a text through the runtime's quantized layers, for a plan or a precision."""
    _check_sizes(tokens, seq_len)
    if part not in PARTS:
        raise fail("bad option", f"--part: expected one of {', '.join(PARTS)}", EXIT_BAD_INPUT)
    with _failing_as("cannot evaluate"):
        checkpoint, layer_bits, group, loaded = _eval_target(model, plan, bits, group_size)
        request = model_quality.EvalRequest(
            checkpoint,
            layer_bits,
            group,
            text,
            part,  # type: ignore[arg-type]
            tokens,
            seq_len,
            device,
            layers_per_pass,
            baseline,
        )
        with _progress_bar(sys.stderr.isatty()) as progress:
            outcome = model_quality.evaluate(request, progress)
    _render_eval(outcome, layer_bits, loaded, as_json)


def _render_eval(
    outcome: model_quality.EvalOutcome,
    layer_bits: tuple[int, ...],
    plan: Plan | None,
    as_json: bool,
) -> None:
    target = None if plan is None else plan.quality.max_ppl_increase
    increase = outcome.increase
    meets = None if target is None or increase is None else increase <= target
    report: dict[str, Any] = {
        "text": outcome.text,
        "tokens": outcome.tokens,
        "layer_bits": list(layer_bits),
        "perplexity": outcome.perplexity,
        "baseline_perplexity": outcome.baseline_perplexity,
        "increase": increase,
        "max_ppl_increase": target,
        "meets_target": meets,
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    line = f"perplexity {outcome.perplexity:.3f} on {outcome.tokens} tokens ({outcome.text})"
    if increase is not None:
        line += f"; 16-bit {outcome.baseline_perplexity:.3f}, increase {increase:+.2%}"
    if meets is not None:
        line += f"; target +{target:.2%} {'met' if meets else 'MISSED'}"
    elif target is not None:
        line += f"; the plan's target is +{target:.2%} (add --baseline to check it)"
    Console().print(line, highlight=False)
