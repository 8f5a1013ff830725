"""Planner benchmark on the LLM-PQ paper's 11 clusters (examples/clusters/).

For each cluster: the full search (every device order × every micro-batch pair, no layer
grouping) with the paper's workload (B = 32, s = 512, n = 100) and a quality budget of 0.05,
its wall time, its MIP gap, and pqctl's predicted throughput divided by each baseline's, all
scored by the same simulator in the same run. Targets: search ≤ 2 s, gap ≤ 0.1 %, pqctl never
predicted slower than a baseline that meets the same quality budget.

``--per-layer`` also times the per-layer formulation (layers scored differently: a synthetic
indicator whose sensitivity is highest at the first and last layers, as calibration usually
finds), still without grouping.

Usage: python bench/plan_search.py [--per-layer] [--clusters 3,5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.cluster_file import load_cluster_file  # noqa: E402
from planner.indicator import QualityIndicator, prior_indicator  # noqa: E402
from planner.model_spec import load_model_spec  # noqa: E402
from planner.plan import Workload  # noqa: E402
from planner.problem import PlanningProblem  # noqa: E402
from planner.search import SearchOptions, search  # noqa: E402

BASELINES = ("uniform", "pipeedge", "adabits", "memory-proportional")
BUDGET = 0.05
OPTIONS = SearchOptions(time_limit_s=300, mip_rel_gap=1e-3, max_unit_binaries=10**9)


def depth_profile(indicator: QualityIndicator) -> QualityIndicator:
    """The prior reshaped so the first and last layers are up to 3× as sensitive."""
    layers = indicator.num_layers
    shape = 1 + 2 * np.cos(np.linspace(0, np.pi, layers)) ** 4
    return QualityIndicator("depth-profile", indicator.omega * (shape / shape.mean())[:, None])


def problem_for(number: int, per_layer: bool) -> PlanningProblem:
    spec = load_cluster_file(ROOT / "examples" / "clusters" / f"cluster-{number:02d}.toml")
    assert spec.model is not None
    model = load_model_spec(spec.model)
    indicator = prior_indicator(model, 128)
    return PlanningProblem(
        model=model,
        cluster=spec.cluster,
        workload=Workload(32, 512, 100, 100),
        indicator=depth_profile(indicator) if per_layer else indicator,
        quality_budget=BUDGET,
    )


def run_cluster(number: int, per_layer: bool) -> dict[str, object]:
    problem = problem_for(number, per_layer)
    started = time.perf_counter()
    result = search(problem, OPTIONS)
    elapsed = time.perf_counter() - started
    ours = result.evaluation.throughput_tokens_per_s
    ratios: dict[str, float | None] = {}
    slower = False
    for b in result.baselines:
        ev = b.evaluation
        if ev is None or not ev.fits_memory:
            ratios[b.name] = None
            continue
        ratios[b.name] = ours / ev.throughput_tokens_per_s
        if ev.within_budget and ours < ev.throughput_tokens_per_s * (1 - 1e-3):
            slower = True
    devices = " + ".join(
        f"{n}×{t}" for t, n in _counts([d.type.name for d in problem.cluster.devices]).items()
    )
    return {
        "cluster": number,
        "model": problem.model.source,
        "devices": devices,
        "time_s": elapsed,
        "gap": result.mip_gap,
        "milps": result.milps_solved,
        "throughput": ours,
        "ratios": ratios,
        "slower": slower,
        "status": result.status,
    }


def _counts(names: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def _ratio(value: float | None) -> str:
    return "   —  " if value is None else f"{value:6.2f}"


def report(rows: list[dict[str, object]], title: str) -> bool:
    print(f"\n{title}")
    head = f"{'#':>2} {'model':<11} {'devices':<20} {'search s':>8} {'gap %':>7} {'MILPs':>5} "
    head += f"{'tok/s':>8} " + " ".join(f"{'÷' + b[:10]:>11}" for b in BASELINES)
    print(head)
    ok = True
    for r in rows:
        ratios = r["ratios"]
        assert isinstance(ratios, dict)
        line = (
            f"{r['cluster']:>2} {r['model']!s:<11} {r['devices']!s:<20} "
            f"{r['time_s']:>8.2f} {100 * float(r['gap']):>7.3f} {r['milps']:>5} "  # type: ignore[arg-type]
            f"{r['throughput']:>8.1f} "
        )
        line += " ".join(f"{_ratio(ratios.get(b)):>11}" for b in BASELINES)
        print(line)
        ok &= float(r["time_s"]) <= 2.0 and float(r["gap"]) <= 1e-3 and not r["slower"]  # type: ignore[arg-type]
    worst_time = max(float(r["time_s"]) for r in rows)  # type: ignore[arg-type]
    worst_gap = max(float(r["gap"]) for r in rows)  # type: ignore[arg-type]
    never_slower = not any(r["slower"] for r in rows)
    print(
        f"slowest search {worst_time:.2f} s (target ≤ 2 s), largest gap {100 * worst_gap:.3f} % "
        f"(target ≤ 0.1 %), never slower than a baseline within budget: {never_slower}"
    )
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--per-layer", action="store_true", help="also time the per-layer formulation"
    )
    parser.add_argument("--clusters", default="1,2,3,4,5,6,7,8,9,10,11")
    args = parser.parse_args()
    numbers = [int(n) for n in args.clusters.split(",")]
    print(
        f"pqctl planner benchmark: B=32, s=512, n=100, quality budget {BUDGET}, "
        "ratios = pqctl predicted throughput ÷ baseline (— = baseline does not fit)"
    )
    ok = report(
        [run_cluster(n, False) for n in numbers],
        "Prior indicator (every layer alike: count formulation)",
    )
    if args.per_layer:
        report(
            [run_cluster(n, True) for n in numbers],
            "Depth-profile indicator (per-layer formulation, no grouping)",
        )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
