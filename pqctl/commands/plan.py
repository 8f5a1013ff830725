"""``pqctl plan`` and ``pqctl show``: parse, resolve the problem (:mod:`pqctl.plan_inputs`),
solve (:func:`planner.make_plan.make_plan`), render (:mod:`pqctl.render.plan`)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from planner.errors import InfeasiblePlanError, PlannerError
from planner.make_plan import make_plan
from planner.plan import ALL_BITS, Plan
from planner.quality_target import parse_ppl_increase
from planner.search import SearchOptions
from pqctl.commands.options import RAY_OPTION_HELP, int_list, say_step
from pqctl.commands.progress import progress
from pqctl.exits import EXIT_BAD_INPUT, EXIT_INFEASIBLE, fail, load_plan
from pqctl.plan_inputs import PlanRequest, build_problem, figures_source, record_ppl_target
from pqctl.render.console import make_console
from pqctl.render.plan import render_plan
from runtime.model.assets import BUILTIN_MODEL_NAME


def ppl_increase_option(text: str | None) -> float | None:
    """``--max-ppl-increase`` as a fraction (exit 2 naming the flag when malformed)."""
    if text is None:
        return None
    try:
        return parse_ppl_increase(text)
    except ValueError as exc:
        raise fail("bad option", f"--max-ppl-increase: {exc}", EXIT_BAD_INPUT) from exc


def _solve_with_progress(
    request: PlanRequest, options: SearchOptions, show: bool
) -> tuple[Plan, dict[str, str]]:
    problem, resolved = build_problem(request, say_step if request.ray else None)
    notes = list(resolved.notes)
    if not show:
        plan = make_plan(problem, options)
    else:
        with progress("solves") as update:
            label = f"solving {problem.model.source} on {resolved.source}"
            plan = make_plan(problem, options, lambda done, total: update(label, done, total))
    plan = record_ppl_target(plan, resolved.ppl_target)
    return replace(plan, notes=plan.notes + tuple(notes)), figures_source(problem)


def plan(
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Hugging Face checkpoint directory, config.json, hub id, or an "
            f"example under examples/models. Default: the cluster file's model, else "
            f"{BUILTIN_MODEL_NAME} (built in).",
        ),
    ] = None,
    cluster: Annotated[
        Path | None,
        typer.Option(
            "--cluster", "-c", help="Cluster file (TOML, see docs/cluster-file.md).", dir_okay=False
        ),
    ] = None,
    ray: Annotated[str | None, typer.Option("--ray", help=RAY_OPTION_HELP)] = None,
    local: Annotated[
        bool,
        typer.Option(
            "--local",
            help="Plan for this host: its NVIDIA GPUs, else its CPU (the default "
            "when no --cluster is given).",
        ),
    ] = False,
    batch: Annotated[
        int | None,
        typer.Option(
            "--batch",
            "-b",
            help="Global batch: prompts served together. Default: the cluster file's, else 8.",
        ),
    ] = None,
    prompt_len: Annotated[
        int | None,
        typer.Option(
            "--prompt-len", "-s", help="Tokens per prompt. Default: the cluster file's, else 128."
        ),
    ] = None,
    max_new: Annotated[
        int | None,
        typer.Option(
            "--max-new",
            "-n",
            help="Most new tokens per prompt (sizes the KV cache). Default: "
            "the cluster file's, else 64.",
        ),
    ] = None,
    expected_new: Annotated[
        int | None,
        typer.Option(
            "--expected-new",
            help="Expected new tokens per prompt (≤ --max-new); the decode "
            "prediction uses it. Default: --max-new.",
        ),
    ] = None,
    quality: Annotated[
        float | None,
        typer.Option(
            "--quality",
            "-q",
            help="Quality budget: most Σω allowed, 0 (every layer 16-bit) to "
            "1 (every layer 2-bit). Negative: no budget. Default: 0.05.",
        ),
    ] = None,
    max_ppl_increase: Annotated[
        str | None,
        typer.Option(
            "--max-ppl-increase",
            help='Quality target as a perplexity increase over 16 bits ("2%" or 0.02), '
            "turned into a Σω budget by the model's calibration (pqctl calibrate); "
            "excludes --quality.",
        ),
    ] = None,
    theta: Annotated[
        float,
        typer.Option(
            "--theta", help="Trade-off: seconds of batch latency one unit of Σω is worth."
        ),
    ] = 0.0,
    bits: Annotated[
        str, typer.Option("--bits", help="Precisions the planner may use, comma-separated.")
    ] = "16,8,4,3,2",
    group_size: Annotated[
        int | None,
        typer.Option(
            "--group-size",
            help="Quantization group size (input weights per scale). Default: the largest of "
            "128, 64, 32 that divides every layer's input width.",
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(
            "--stats",
            help="Calibration statistics (pqctl calibrate) for the variance "
            "indicator; default: the documented prior.",
            dir_okay=False,
        ),
    ] = None,
    profiles: Annotated[
        Path | None,
        typer.Option(
            "--profiles",
            help="Directory of latency profiles. Default: $PQCTL_PROFILE_DIR or "
            "~/.cache/pqctl/profiles.",
            file_okay=False,
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", "-x", help="Leave a device out, e.g. node-a/cuda:1 (repeatable)."
        ),
    ] = None,
    time_limit: Annotated[
        float, typer.Option("--time-limit", help="Wall-clock limit of the search, seconds.")
    ] = 60.0,
    gap: Annotated[
        float, typer.Option("--gap", help="Relative MIP gap at which a solve stops.")
    ] = 1e-3,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the plan here (JSON).", dir_okay=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show HiGHS's log.")] = False,
) -> None:
    """Plan a deployment: partition, per-layer precision and micro-batch sizes."""
    if sum((local, cluster is not None, ray is not None)) > 1:
        raise fail("bad option", "--local, --cluster and --ray exclude each other", EXIT_BAD_INPUT)
    if time_limit <= 0 or not 0 <= gap < 1:
        raise fail(
            "bad option", "--time-limit must be positive and --gap in [0, 1)", EXIT_BAD_INPUT
        )
    if quality is not None and max_ppl_increase is not None:
        raise fail(
            "bad option", "--quality and --max-ppl-increase exclude each other", EXIT_BAD_INPUT
        )
    request = PlanRequest(
        model=model,
        cluster_file=cluster,
        ray=ray,
        batch=batch,
        prompt_len=prompt_len,
        max_new=max_new,
        expected_new=expected_new,
        quality=0.05 if quality is None else (quality if quality >= 0 else None),
        max_ppl_increase=ppl_increase_option(max_ppl_increase),
        theta_s=theta,
        bits=int_list(bits, "--bits", ALL_BITS),
        group_size=group_size,
        stats_file=stats,
        profile_dir=profiles,
        exclude=tuple(exclude or ()),
    )
    options = SearchOptions(time_limit_s=time_limit, mip_rel_gap=gap, verbose=verbose)
    try:
        result, sources = _solve_with_progress(
            request, options, show=sys.stderr.isatty() and not verbose
        )
    except InfeasiblePlanError as exc:
        raise fail(exc.title, exc.msg, EXIT_INFEASIBLE) from exc
    except PlannerError as exc:
        raise fail(exc.title, exc.msg, EXIT_BAD_INPUT) from exc
    if output is not None:
        result.save(output)
    if as_json:
        typer.echo(result.to_json(), nl=False)
        return
    make_console().print(render_plan(result, sources))
    if output is not None:
        make_console().print(f"plan written to {output}")


def show(
    plan_file: Annotated[
        Path, typer.Argument(help="A plan.json written by pqctl plan.", dir_okay=False)
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the validated plan as JSON.")
    ] = False,
) -> None:
    """Validate a plan file and show it."""
    loaded = load_plan(plan_file)
    if as_json:
        typer.echo(json.dumps(loaded.to_dict(), indent=2))
        return
    make_console().print(render_plan(loaded, {}))
