"""The ``pqctl calibrate`` and ``pqctl eval`` commands: parse, call :mod:`pqctl.model_quality`,
render."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from planner.cost_model import default_group_size
from planner.errors import PlannerError
from planner.model_spec import ModelSpec
from planner.plan import ALL_BITS, Plan
from planner.quality_target import default_stats_path
from pqctl.commands.progress import progress
from pqctl.exits import EXIT_BAD_INPUT, fail, load_plan
from pqctl.plan_inputs import find_stats_file
from pqctl.render.console import make_console
from runtime.errors import RuntimeFailure
from runtime.model.assets import BUILTIN_MODEL_NAME
from runtime.model.source import checked_checkpoint, resolve_checkpoint

if TYPE_CHECKING:  # loads torch: imported when a measurement runs
    from pqctl import model_quality

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
    from pqctl import model_quality

    request = model_quality.CalibrateRequest(
        model, text, tokens, seq_len, group_size, output, layers_per_pass, device, mixed_plans, seed
    )
    with _failing_as("cannot calibrate"):
        spec, _ = model_quality.resolve(model)
    note = _replacement_note(spec, output)
    if note:
        make_console(stderr=True).print(f"note: {note}", highlight=False)
    with _failing_as("cannot calibrate"), progress() as update:
        outcome = model_quality.calibrate(request, update)
    mapping = outcome.mapping
    if as_json:
        typer.echo(json.dumps({"path": str(outcome.path), **mapping.to_dict()}, indent=2))
        return
    console = make_console()
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


def _replacement_note(spec: ModelSpec, output: Path | None) -> str:
    """What the statistics file about to be written replaces for pqctl plan, and the way back;
    "" when it replaces nothing pqctl plan reads."""
    default = default_stats_path(spec.source)
    if output is not None and output.resolve() != default.resolve():
        return ""  # a file of the user's own, read only when given to pqctl plan --stats
    read_now = find_stats_file(spec, None)  # what pqctl plan reads for this model today
    if read_now == default:
        return (
            f"{default} exists and will be replaced; copy it elsewhere first to keep it "
            "(pqctl plan --stats FILE reads any copy)"
        )
    if read_now is not None:
        return (
            f"{default} will replace the calibration shipped with pqctl for {spec.source} in "
            f"pqctl plan; to go back to the shipped one, delete it (rm {default})"
        )
    return ""


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
    from pqctl import model_quality

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
        from pqctl import model_quality

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
        with progress() as update:
            outcome = model_quality.evaluate(request, update)
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
    make_console().print(line, highlight=False)
