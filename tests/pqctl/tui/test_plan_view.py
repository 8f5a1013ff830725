"""The Plan tab driven by Textual's pilot: solve a declared heterogeneous cluster, re-plan on a
new target, cancel, validate the form, save and load plan.json."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
from textual.widgets import Input

from planner.indicator import QualityIndicator, prior_indicator
from planner.model_spec import load_model_spec
from planner.plan import Plan, Workload
from planner.problem import PlanningProblem
from pqctl.plan_inputs import PlanRequest
from pqctl.tui.app import PqctlApp
from pqctl.tui.solver import SolvedPlan
from pqctl.tui.views.plan import bottlenecks
from pqctl.tui.widgets.stage_card import StageCard
from tests.planner.instances import synthetic_cluster
from tests.pqctl.tui.helpers import HOME_LAB, PLAN_FILE, wait_for


async def test_solves_a_heterogeneous_cluster_and_shows_its_stages() -> None:
    app = PqctlApp(cluster=HOME_LAB)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.plan_view.plan is not None, 30, "first plan")
        await pilot.press("2")
        plan = app.plan_view.plan
        assert plan is not None and plan.model.source == "opt-30b"
        cards = list(app.query(StageCard))
        assert [c.stage.device.key for c in cards] == [s.device.key for s in plan.stages]
        assert len(cards) >= 2
        marked = [c for c in cards if c.has_class("-bottleneck")]
        assert marked and all(c.index in bottlenecks(plan) for c in marked)
        baselines = app.query_one("#baselines")
        assert baselines.row_count == 1 + len(plan.baselines)  # type: ignore[attr-defined]
        summary = str(app.query_one("#plan-summary").render())
        assert "tokens/s predicted" in summary and "opt-30b" in summary
        assert "solved in" in str(app.query_one("#solve-status").render())


async def test_a_new_quality_target_replans() -> None:
    app = PqctlApp(cluster=HOME_LAB)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.plan_view.plan is not None, 30, "first plan")
        first = app.plan_view.plan
        assert first is not None
        await pilot.press("2")
        app.query_one("#quality").value = "0.005"  # type: ignore[attr-defined]
        app.query_one("#quality").focus()
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.plan_view.plan is not first, 30, "re-plan")
        second = app.plan_view.plan
        assert second is not None and second.quality.budget == 0.005
        assert second.quality.omega_sum <= 0.005 + 1e-9 < first.quality.omega_sum
        assert max(second.layer_bits) > max(first.layer_bits)  # a tighter target: more bits


async def test_the_target_is_a_perplexity_increase_where_calibration_exists() -> None:
    app = PqctlApp()  # this host and the built-in model, which ships its calibration
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.plan_view.plan is not None, 60, "first plan")
        quality = app.query_one("#quality", Input)
        assert quality.placeholder == "1%"
        first = app.plan_view.plan
        assert first is not None and first.quality.max_ppl_increase == 0.01
        predicted = first.quality.predicted_ppl_increase
        assert predicted is not None and predicted <= 0.01
        assert "target ≤ +1.00%" in str(app.query_one("#plan-summary").render())
        await pilot.press("2")
        quality.value = "lots%"
        await pilot.press("f5")
        await pilot.pause()
        assert "not a perplexity increase" in str(app.query_one("#solve-status").render())
        quality.value = "0.5"  # a Σω budget instead
        await pilot.press("f5")
        await wait_for(pilot, lambda: app.plan_view.plan is not first, 60, "re-plan")
        second = app.plan_view.plan
        assert second is not None and second.quality.max_ppl_increase is None
        assert second.quality.budget == 0.5
    other = PqctlApp(cluster=HOME_LAB, auto_solve=False)  # opt-30b: no calibration
    async with other.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: other.cluster_view.resolved is not None, 30, "cluster")
        await pilot.pause()
        assert other.query_one("#quality", Input).placeholder == "0.05"


async def test_a_bad_field_is_named_and_nothing_is_solved() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        app.query_one("#batch").value = "0"  # type: ignore[attr-defined]
        await pilot.press("f5")
        await pilot.pause()
        assert "batch: must be positive" in str(app.query_one("#solve-status").render())
        assert app.focused is app.query_one("#batch")
        assert app.plan_view.plan is None and app.plan_view.generation == 0


async def test_an_infeasible_target_is_reported_not_fatal() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.cluster_view.resolved is not None, 30, "cluster")
        await pilot.press("2")
        app.query_one("#model").value = "bloom-176b"  # type: ignore[attr-defined]
        app.query_one("#quality").value = "0"  # type: ignore[attr-defined]
        await pilot.press("f5")
        status = app.query_one("#solve-status")
        await wait_for(pilot, lambda: "no feasible plan" in str(status.render()), 30, "error")
        assert app.plan_view.plan is None


async def test_cancel_drops_the_running_solve() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    release = threading.Event()
    started = threading.Event()
    real_solve = app.session.solve

    def slow_solve(request: PlanRequest, *_: object, **__: object) -> SolvedPlan:
        started.set()
        release.wait(10)
        return real_solve(request)

    app.session.solve = slow_solve  # type: ignore[method-assign]
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2")
        await pilot.press("f5")
        await wait_for(pilot, started.is_set, 10, "solve started")
        assert app.plan_view.solving
        await pilot.press("escape")
        assert not app.plan_view.solving
        assert "cancelled" in str(app.query_one("#solve-status").render())
        release.set()  # the solver returns a plan, which must be dropped
        await pilot.pause(1.0)
        assert app.plan_view.plan is None


def _cpu_s(pid: int) -> float | None:
    """CPU seconds process ``pid`` has used (None: it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _hard_problem() -> PlanningProblem:
    """64 GPUs on 16 hosts, per-layer ω: a search that runs to its 30 s limit."""
    model = load_model_spec("llama-3.1-70b")
    shape = np.linspace(2.0, 0.5, model.num_layers)[:, None]
    return PlanningProblem(
        model=model,
        cluster=synthetic_cluster(64),
        workload=Workload(32, 512, 100, 100),
        indicator=QualityIndicator("sloped", prior_indicator(model, 128).omega * shape),
        quality_budget=0.05,
    )


async def test_escape_stops_the_solver_using_the_cpu_within_a_second() -> None:
    """HiGHS itself stops: a cancelled search's process uses no CPU a second after Esc."""
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    problem = _hard_problem()
    app.session.problem = lambda _request: (problem, None, [])  # type: ignore[method-assign]
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("2", "f5")
        solver = app.session.solver
        await wait_for(pilot, lambda: solver.pid is not None, 10, "solver process")
        pid = solver.pid
        assert pid is not None
        await wait_for(pilot, lambda: (_cpu_s(pid) or 0) > 1.0, 20, "the search busy")
        await pilot.press("escape")
        assert "cancelled" in str(app.query_one("#solve-status").render())
        await pilot.pause(1.0)
        before = _cpu_s(pid)
        await pilot.pause(0.5)
        after = _cpu_s(pid)
        assert before is None or after is None or after - before < 0.05, (before, after)
        assert app.plan_view.plan is None


async def test_save_and_load_plan_files(tmp_path: Path) -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("ctrl+o")
        dialog_input = app.screen.query_one("#path")
        dialog_input.value = str(PLAN_FILE)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.pause()
        loaded = app.plan_view.plan
        assert loaded == Plan.load(PLAN_FILE)
        assert app.query_one("#model").value == "opt-30b"  # type: ignore[attr-defined]
        assert len(app.query(StageCard)) == len(loaded.stages)

        target = tmp_path / "saved.json"
        await pilot.press("ctrl+s")
        app.screen.query_one("#path").value = str(target)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.pause()
        assert Plan.load(target) == loaded

        broken = tmp_path / "broken.json"
        broken.write_text('{"schema_version": 1}')
        await pilot.press("ctrl+o")
        app.screen.query_one("#path").value = str(broken)  # type: ignore[attr-defined]
        await pilot.press("enter")
        await pilot.pause()
        assert app.plan_view.plan == loaded  # a bad file leaves the plan alone
        assert any("invalid plan" in n.message for n in app._notifications)


async def test_quitting_does_not_wait_for_a_running_solve() -> None:
    app = PqctlApp(cluster=HOME_LAB, auto_solve=False)
    release, started = threading.Event(), threading.Event()

    def stuck_solve(request: PlanRequest, *_: object, **__: object) -> SolvedPlan:
        started.set()
        release.wait(30)
        raise AssertionError("never reached in time")

    app.session.solve = stuck_solve  # type: ignore[method-assign]
    try:
        async with app.run_test(size=(100, 30)) as pilot:
            await pilot.press("2", "f5")
            await wait_for(pilot, started.is_set, 10, "solve started")
            began = time.monotonic()
            await pilot.press("ctrl+q")
        assert time.monotonic() - began < 5
    finally:
        release.set()


async def test_a_one_stage_plan_says_1_stage() -> None:
    app = PqctlApp(cluster=HOME_LAB.parent / "cluster-01.toml")  # one GPU
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.plan_view.plan is not None, 30, "first plan")
        await pilot.press("2")
        summary = str(app.query_one("#plan-summary").render())
        assert " · 1 stage · " in summary and "1 stages" not in summary
        await pilot.press("alt+3")
        assert "(1 stage)" in str(app.query_one("#serve-status").render())
