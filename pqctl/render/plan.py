"""Rich rendering of a plan: the stages, the prediction and the baselines."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from planner.plan import Plan, Stage

GIB = 1024**3


def precision_mix(bits: tuple[int, ...]) -> str:
    """E.g. ``"16×3 8×5"``: how many layers run at each precision, highest first."""
    counts = Counter(bits)
    return " ".join(f"{b}×{counts[b]}" for b in sorted(counts, reverse=True))


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.1f}" if ms >= 100 else f"{ms:.2f}"


def _memory(stage: Stage) -> str:
    used, total = stage.predicted.memory_bytes / GIB, stage.predicted.memory_capacity_bytes / GIB
    return f"{used:,.2f}/{total:,.1f}"


def _process(stage: Stage) -> str:
    process = stage.predicted.process_bytes
    return f"{process / GIB:,.2f}" if process else "–"


def stage_table(plan: Plan) -> Table:
    """One row per stage (times per micro-batch); the slowest decode stage is highlighted."""
    table = Table(title="Pipeline stages", title_justify="left", expand=False)
    for name, justify in (
        ("#", "right"),
        ("device", "left"),
        ("type", "left"),
        ("layers", "left"),
        ("bits×n", "left"),
        ("pre ms", "right"),
        ("dec ms", "right"),
        ("GiB", "right"),
        ("process GiB", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    slowest = max(range(len(plan.stages)), key=lambda k: plan.stages[k].predicted.decode_s)
    for k, stage in enumerate(plan.stages):
        rng = stage.layer_range
        ends = "e" * stage.holds_embedding + "h" * stage.holds_lm_head
        table.add_row(
            str(k),
            stage.device.key,
            stage.device.device_type,
            f"{rng.start}–{rng.stop - 1}{' ' + ends if ends else ''}",
            precision_mix(stage.layer_bits),
            _ms(stage.predicted.prefill_s),
            _ms(stage.predicted.decode_s),
            _memory(stage),
            _process(stage),
            style="bold yellow" if k == slowest and len(plan.stages) > 1 else None,
        )
    table.caption = "e/h: embedding / LM head here; ms per micro-batch; GiB used/usable"
    return table


def figures_line(plan: Plan, sources: Mapping[str, str]) -> str:
    """Which devices' latency comes from a measured profile and which from the datasheet."""
    used = {s.device.key for s in plan.stages}
    profiled = sorted(k for k in used if sources.get(k) == "profile")
    if not profiled:
        return "latency figures: datasheet roofline (run pqctl profile to measure)"
    rest = sorted(used - set(profiled))
    return f"latency figures: profile for {', '.join(profiled)}" + (
        f"; datasheet for {', '.join(rest)}" if rest else ""
    )


def _ppl_target(plan: Plan) -> str:
    q = plan.quality
    if q.max_ppl_increase is None or q.predicted_ppl_increase is None:
        return ""
    return (
        f"; perplexity target +{q.max_ppl_increase:.2%}, predicted "
        f"+{q.predicted_ppl_increase:.2%} (confirm with pqctl eval --plan)"
    )


def summary(plan: Plan, sources: Mapping[str, str]) -> Text:
    """Micro-batches, predicted times and throughput, quality, solver."""
    p, q, s, m = plan.prediction, plan.quality, plan.solver, plan.micro_batching
    w = plan.workload
    budget = "none" if q.budget is None else f"{q.budget:.3g}"
    lines = [
        f"model {plan.model.source} ({plan.model.family}, {plan.model.num_layers} layers); "
        f"batch {w.global_batch}, prompt {w.prompt_len}, new tokens {w.expected_new_tokens} "
        f"of max {w.max_new_tokens}",
        f"micro-batches: prefill {m.prefill_size}, decode {m.decode_size}",
        f"predicted: prefill {p.prefill_s:,.3f} s + decode {p.decode_s:,.3f} s = "
        f"{p.total_s:,.3f} s  →  {p.throughput_tokens_per_s:,.1f} tokens/s",
        f"quality: Σω = {q.omega_sum:.4f} (budget {budget}, θ {q.theta_s:g} s, "
        f"indicator {q.indicator})" + _ppl_target(plan),
        _solver_line(plan),
        *([s.order_text] if s.order_text else []),
        figures_line(plan, sources),
    ]
    return Text("\n".join(lines))


def _solver_line(plan: Plan) -> str:
    """How the solver did, in words: "proven optimal in 0.04 s" rather than its counters."""
    s = plan.solver
    if s.status == "optimal":
        close = s.mip_gap is None or s.mip_gap < 5e-5
        outcome = "proven optimal" if close else f"optimal within {s.gap_text}"
    elif s.mip_gap is not None:
        outcome = f"{s.status}: at most {s.gap_text} from optimal"
    else:
        outcome = f"{s.status} (nothing bounds how far from optimal it is)"
    solves = (
        f"{s.milps_solved} full solve{'s' * (s.milps_solved != 1)}"
        if s.milps_solved
        else "settled by bounds alone"
    )
    if s.orders_tried:
        solves += f" over {s.orders_tried} device order{'s' * (s.orders_tried != 1)}"
    grouped = f", layers in groups of {s.layer_group_size}" if s.layer_group_size > 1 else ""
    return f"solver: {outcome} in {s.time_s:.2f} s ({solves}{grouped})"


def baseline_table(plan: Plan) -> Table:
    """Each baseline's predicted throughput, and pqctl's plan relative to it."""
    table = Table(title="Baselines (same simulator)", title_justify="left")
    for name, justify in (
        ("method", "left"),
        ("tok/s", "right"),
        ("pqctl×", "right"),
        ("prefill s", "right"),
        ("decode s", "right"),
        ("Σω", "right"),
        ("note", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    ours = plan.prediction.throughput_tokens_per_s
    table.add_row(
        "pqctl",
        f"{ours:,.1f}",
        "1.00",
        f"{plan.prediction.prefill_s:,.3f}",
        f"{plan.prediction.decode_s:,.3f}",
        f"{plan.quality.omega_sum:.4f}",
        "",
        style="bold",
    )
    for b in plan.baselines:
        if b.throughput_tokens_per_s is None:
            table.add_row(b.name, "—", "—", "—", "—", "—", b.reason)
            continue
        note = b.reason or ("" if b.within_quality_budget else "over quality budget")
        table.add_row(
            b.name,
            f"{b.throughput_tokens_per_s:,.1f}",
            f"{ours / b.throughput_tokens_per_s:.2f}",
            f"{b.prefill_s or 0:,.3f}",
            f"{b.decode_s or 0:,.3f}",
            f"{b.omega_sum or 0:.4f}",
            note,
        )
    return table


def render_plan(plan: Plan, sources: Mapping[str, str]) -> RenderableType:
    """Everything a human reads after ``pqctl plan``."""
    parts: list[RenderableType] = [summary(plan, sources), stage_table(plan), baseline_table(plan)]
    parts += [Text(f"note: {n}", style="dim") for n in plan.notes]
    return Group(*parts)
