"""Plan view: model, workload and quality target in; the pipeline and the baselines out.

Solving runs in a thread worker, the search itself in the solver process
(:mod:`pqctl.tui.solver_process`): a newer request or a cancel bumps ``generation`` and stops the
running search (its CPU use ends within a second); results of older generations are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import DataTable, Input, Label, ProgressBar, Static
from textual.worker import get_current_worker

from planner.errors import PlannerError
from planner.model_spec import example_model_names
from planner.plan import Plan, PlanValidationError
from pqctl.plan_inputs import DEFAULT_WORKLOAD, PlanRequest
from pqctl.tui.messages import PlanReady, SolveFinished, SolveProgress
from pqctl.tui.solver import PlanningSession, SolveJob
from pqctl.tui.widgets.bits_strip import BitsLegend
from pqctl.tui.widgets.field import Field
from pqctl.tui.widgets.figures import count, human_rate, markup_escape
from pqctl.tui.widgets.stage_card import StageCard
from runtime.model.assets import BUILTIN_MODEL_NAME

FIELDS = (  # input id, label, width, placeholder
    ("model", "model", 18, BUILTIN_MODEL_NAME),
    ("batch", "batch", 6, str(DEFAULT_WORKLOAD["batch"])),
    ("prompt-len", "prompt", 6, str(DEFAULT_WORKLOAD["prompt_len"])),
    ("max-new", "new", 5, str(DEFAULT_WORKLOAD["max_new"])),
    ("quality", "quality", 7, "0.05"),
)
QUALITY_CHARACTERS = r"[0-9.eE+-]*%?"
"""What the quality field accepts as it is typed: a Σω budget (0.05) or a perplexity increase
(1%): a text field, since a number field refuses the "%"."""
OMEGA_DEFAULT, PPL_DEFAULT = "0.05", "1%"
"""The quality target when the field is empty: a 1 % perplexity increase where the model has
calibration with a perplexity mapping, else a Σω budget of 0.05 (about uniform 4 bits)."""


class PlanFormError(ValueError):
    """A field of the plan form holds a bad value; ``field`` is the input's id."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def bottlenecks(plan: Plan) -> dict[int, str]:
    """Stage index -> "prefill", "decode" or "prefill & decode" for the slowest stages."""
    if len(plan.stages) < 2:
        return {}
    marks: dict[int, list[str]] = {}
    for phase in ("prefill", "decode"):
        slowest = max(
            range(len(plan.stages)),
            key=lambda k: getattr(plan.stages[k].predicted, f"{phase}_s"),
        )
        marks.setdefault(slowest, []).append(phase)
    return {k: " & ".join(v) for k, v in marks.items()}


class PlanView(Vertical):
    """Enter in any field (or F5) solves; Esc cancels; the result replaces the last plan;
    PageUp/PageDown scroll the result from the form too."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
    ]

    DEFAULT_CSS = """
    PlanView #plan-form { height: auto; padding: 0 1; }
    PlanView #plan-form Label { padding: 0 1 0 1; }
    PlanView #plan-form Input { margin: 0 0; }
    PlanView #plan-status-row { height: 1; padding: 0 1; }
    PlanView #solve-progress { width: 24; display: none; }
    PlanView #solve-progress.-solving { display: block; }
    PlanView #solve-status { width: 1fr; }
    PlanView #plan-result { height: 1fr; padding: 0 1; }
    PlanView #plan-summary { height: auto; margin-bottom: 1; }
    PlanView #stages { height: auto; }
    PlanView #baselines { height: auto; max-height: 12; }
    PlanView .section { text-style: bold; color: $primary; }
    """

    def __init__(self, session: PlanningSession, model: str | None = None, **kwargs: object):
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.session = session
        self.initial_model = model
        self.generation = 0
        self.excluded: frozenset[str] = frozenset()
        self.plan: Plan | None = None
        self.sources: dict[str, str] = {}
        self.job: SolveJob | None = None  # the latest search

    def compose(self) -> ComposeResult:
        models = [BUILTIN_MODEL_NAME, *example_model_names()]
        with Horizontal(id="plan-form"):
            for field, label, width, placeholder in FIELDS:
                yield Label(label)
                box = Field(
                    placeholder=placeholder,
                    id=field,
                    compact=True,
                    suggester=SuggestFromList(models) if field == "model" else None,
                    type="text" if field in ("model", "quality") else "number",
                    restrict=QUALITY_CHARACTERS if field == "quality" else None,
                )
                box.styles.width = width
                yield box
        with Horizontal(id="plan-status-row"):
            yield ProgressBar(id="solve-progress", show_eta=False, show_percentage=False)
            yield Static("", id="solve-status")
        with VerticalScroll(id="plan-result"):
            yield Static("no plan yet: Enter in a field or F5 solves", id="plan-summary")
            yield BitsLegend()
            yield Vertical(id="stages")
            yield Label("Baselines (same simulator)", classes="section")
            table: DataTable[str] = DataTable(id="baselines", cursor_type="row")
            for name in ("method", "tok/s", "pqctl×", "prefill s", "decode s", "Σω", "note"):
                table.add_column(name, key=name)
            yield table

    def on_mount(self) -> None:
        if self.initial_model:
            self.query_one("#model", Input).value = self.initial_model

    def on_unmount(self) -> None:
        if self.job is not None:
            self.job.cancel()
        self.session.close()

    def action_page(self, pages: int) -> None:
        result = self.query_one("#plan-result", VerticalScroll)
        if pages > 0:
            result.scroll_page_down(animate=False)
        else:
            result.scroll_page_up(animate=False)

    # ----------------------------------------------------------------- the request
    def _number(self, field: str, kind: type[int] | type[float]) -> int | float | None:
        text = self.query_one(f"#{field}", Input).value.strip()
        if not text:
            return None
        try:
            value = kind(text)
        except ValueError:
            raise PlanFormError(
                field, f'"{text}" is not {"an integer" if kind is int else "a number"}'
            ) from None
        if value <= 0 and not (field == "quality" and value == 0):
            raise PlanFormError(field, f"must be positive, got {text}")
        return value

    def request(self) -> PlanRequest:
        """The planning request the form describes (empty fields: the defaults).

        Raises:
            PlanFormError: a field holds a bad value.
        """
        model = self.query_one("#model", Input).value.strip() or None
        quality, max_ppl_increase = self._quality()
        return PlanRequest(
            model=model,
            batch=self._number("batch", int),  # type: ignore[arg-type]
            prompt_len=self._number("prompt-len", int),  # type: ignore[arg-type]
            max_new=self._number("max-new", int),  # type: ignore[arg-type]
            quality=quality,
            max_ppl_increase=max_ppl_increase,
            exclude=tuple(sorted(self.excluded)),
        )

    def _quality(self) -> tuple[float, float | None]:
        """(Σω budget, maximum perplexity increase or None) from the quality field: "1%" is a
        perplexity increase, a plain number a Σω budget; empty: the placeholder's default."""
        field = self.query_one("#quality", Input)
        text = field.value.strip() or field.placeholder
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                percent = -1.0
            if not 0 < percent < 1000:
                raise PlanFormError("quality", f'"{text}" is not a perplexity increase like 1%')
            return float(OMEGA_DEFAULT), percent / 100
        try:
            budget = float(text)
        except ValueError:
            raise PlanFormError(
                "quality", f'"{text}" is neither a Σω budget (0.05) nor a perplexity increase (1%)'
            ) from None
        if not 0 <= budget <= 1:
            raise PlanFormError("quality", f"a Σω budget is from 0 to 1, got {text}")
        return budget, None

    def set_defaults(
        self, model: str, workload: Mapping[str, int], ppl_target: bool = False
    ) -> None:
        """Show the cluster's defaults (model, workload) as the fields' placeholders, and the
        default quality target: a perplexity increase when ``ppl_target`` (calibration exists)."""
        defaults = {**DEFAULT_WORKLOAD, **workload}
        self.query_one("#model", Input).placeholder = model
        self.query_one("#quality", Input).placeholder = PPL_DEFAULT if ppl_target else OMEGA_DEFAULT
        for field, key in (
            ("batch", "batch"),
            ("prompt-len", "prompt_len"),
            ("max-new", "max_new"),
        ):
            self.query_one(f"#{field}", Input).placeholder = str(defaults[key])

    def set_excluded(self, excluded: frozenset[str], solve: bool = True) -> None:
        self.excluded = excluded
        if solve:
            self.action_solve()

    # ----------------------------------------------------------------- solving
    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_solve()

    def action_solve(self) -> None:
        """Solve the form's request in a worker (an older solve's result will be dropped)."""
        try:
            request = self.request()
        except PlanFormError as exc:
            self._status(f"[$error]{markup_escape(str(exc))}[/]")
            self.query_one(f"#{exc.field}", Input).focus()
            return
        self.generation += 1
        progress = self.query_one("#solve-progress", ProgressBar)
        progress.update(total=None, progress=0)
        progress.add_class("-solving")
        self._status("solving… (Esc cancels)")
        self.solve(self.generation, request)

    def action_cancel_solve(self) -> None:
        if not self.solving:
            return
        self.generation += 1  # whatever the running solve returns is now stale
        self.workers.cancel_group(self, "solve")
        self.query_one("#solve-progress", ProgressBar).remove_class("-solving")
        self._status(
            "[$warning]cancelled[/]" + (": showing the previous plan" if self.plan else "")
        )

    @property
    def solving(self) -> bool:
        return self.query_one("#solve-progress", ProgressBar).has_class("-solving")

    @work(thread=True, exclusive=True, group="solve", exit_on_error=False)
    def solve(self, generation: int, request: PlanRequest) -> None:
        worker = get_current_worker()

        def progress(done: int, total: int) -> None:
            if not worker.is_cancelled:
                self.post_message(SolveProgress(generation, done, total))

        self.job = job = SolveJob(self.session, request, progress)
        while not job.done.wait(0.05):
            if worker.is_cancelled:
                job.cancel()  # the search stops in its process; whatever it returns is dropped
                return
        error, solved = job.error, job.result
        if isinstance(error, PlannerError):
            result = SolveFinished(generation, error_title=error.title, error=error.msg)
        elif error is not None or solved is None:  # reported, never fatal to the dashboard
            result = SolveFinished(generation, error_title="unexpected error", error=repr(error))
        else:
            result = SolveFinished(generation, solved.plan, solved.sources, solved.elapsed_s)
        if not worker.is_cancelled:
            self.post_message(result)

    def on_solve_progress(self, message: SolveProgress) -> None:
        message.stop()
        if message.generation == self.generation:
            self.query_one("#solve-progress", ProgressBar).update(
                total=message.total, progress=message.done
            )
            self._status(f"solving… {message.done}/{message.total} MILPs (Esc cancels)")

    def on_solve_finished(self, message: SolveFinished) -> None:
        message.stop()
        if message.generation != self.generation:
            return  # cancelled or superseded
        self.query_one("#solve-progress", ProgressBar).remove_class("-solving")
        if message.plan is None:
            self._status(
                f"[$error]{markup_escape(message.error_title)}:[/] {markup_escape(message.error)}"
            )
            return
        self.show_plan(message.plan, message.sources, f"solved in {message.elapsed_s:.2f} s")

    # ----------------------------------------------------------------- showing
    def _status(self, markup: str) -> None:
        self.query_one("#solve-status", Static).update(markup)

    def show_plan(self, plan: Plan, sources: dict[str, str], origin: str) -> None:
        """Render ``plan`` and tell the app (Serve launches it, Cluster marks its devices)."""
        self.plan, self.sources = plan, sources
        self._status(f"[$success]{markup_escape(origin)}[/]")
        self.query_one("#plan-summary", Static).update(self._summary(plan, sources))
        stages = self.query_one("#stages", Vertical)
        stages.remove_children()
        marks = bottlenecks(plan)
        stages.mount_all(StageCard(k, s, marks.get(k, "")) for k, s in enumerate(plan.stages))
        self._fill_baselines(plan)
        self.post_message(PlanReady(plan, sources, origin))

    def _summary(self, plan: Plan, sources: dict[str, str]) -> str:
        p, q, s, m, w = (
            plan.prediction,
            plan.quality,
            plan.solver,
            plan.micro_batching,
            plan.workload,
        )
        budget = "no budget" if q.budget is None else f"≤ {q.budget:g}"
        calibrated = "" if q.indicator != "prior" else " (prior: no calibration, ω budget)"
        if q.max_ppl_increase is not None and q.predicted_ppl_increase is not None:
            calibrated = (
                f" · perplexity +{q.predicted_ppl_increase:.2%} predicted, target "
                f"≤ +{q.max_ppl_increase:.2%} ({q.indicator} indicator)"
            )
        used = sorted({st.device.key for st in plan.stages})
        profiled = [k for k in used if sources.get(k) == "profile"]
        figures = f"profile for {', '.join(profiled)}" if profiled else "datasheet"
        return (
            f"[b]{markup_escape(plan.model.source)}[/] · {count(len(plan.stages), 'stage')} · "
            f"[b $success]{human_rate(p.throughput_tokens_per_s)} tokens/s[/] predicted · batch "
            f"{w.global_batch}, prompt {w.prompt_len}, new {w.expected_new_tokens}/"
            f"{w.max_new_tokens}\nprefill {p.prefill_s:,.3f} s + decode {p.decode_s:,.3f} s · "
            f"micro-batches {m.prefill_size}/{m.decode_size} · Σω {q.omega_sum:.4f} {budget}"
            f"{calibrated}\nsolver {markup_escape(s.status)}, gap {s.gap_text}, "
            f"{count(s.milps_solved, 'MILP')}, {s.time_s:.2f} s · latency figures: "
            f"{markup_escape(figures)}"
            + "".join(f"\n[$text-muted]note: {markup_escape(n)}[/]" for n in plan.notes)
        )

    def _fill_baselines(self, plan: Plan) -> None:
        table = self.query_one("#baselines", DataTable)
        table.clear()
        ours = plan.prediction.throughput_tokens_per_s
        table.add_row(
            "pqctl",
            human_rate(ours),
            "1.00",
            f"{plan.prediction.prefill_s:,.3f}",
            f"{plan.prediction.decode_s:,.3f}",
            f"{plan.quality.omega_sum:.4f}",
            "",
            key="pqctl",
        )
        for b in plan.baselines:
            if b.throughput_tokens_per_s is None:
                table.add_row(b.name, "–", "–", "–", "–", "–", b.reason, key=b.name)
                continue
            note = b.reason or ("" if b.within_quality_budget else "over quality budget")
            ratio = ours / b.throughput_tokens_per_s if b.throughput_tokens_per_s else 0.0
            table.add_row(
                b.name,
                human_rate(b.throughput_tokens_per_s),
                f"{ratio:.2f}",
                f"{b.prefill_s or 0:,.3f}",
                f"{b.decode_s or 0:,.3f}",
                f"{b.omega_sum or 0:.4f}",
                note,
                key=b.name,
            )

    # ----------------------------------------------------------------- files
    def save_plan(self, path: Path) -> str:
        """Write the shown plan; a message for the operator."""
        if self.plan is None:
            return "no plan to save yet"
        try:
            self.plan.save(path)
        except OSError as exc:
            return f"could not write {path}: {exc.strerror}"
        return f"plan saved to {path}"

    def load_plan(self, path: Path) -> str:
        """Read, validate and show a plan file; a message for the operator."""
        try:
            plan = Plan.load(path)
        except PlanValidationError as exc:
            return f"invalid plan {path}: {exc.field}: {exc.problem}"
        self.action_cancel_solve()
        w = plan.workload
        values = {
            "model": plan.model.source,
            "batch": str(w.global_batch),
            "prompt-len": str(w.prompt_len),
            "max-new": str(w.max_new_tokens),
            "quality": _quality_text(plan),
        }
        for field, value in values.items():
            self.query_one(f"#{field}", Input).value = value
        self.show_plan(plan, {}, f"loaded from {path}")
        return f"plan loaded from {path}"


def _quality_text(plan: Plan) -> str:
    """The quality field for a loaded plan: its perplexity target, else its Σω budget."""
    q = plan.quality
    if q.max_ppl_increase is not None:
        return f"{100 * q.max_ppl_increase:g}%"
    return "" if q.budget is None else f"{q.budget:g}"
