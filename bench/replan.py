"""Re-planning after a host is lost: how long the planner takes as clusters grow, and on a real
Ray cluster how long a deployment takes from losing a node to serving again.

1. Planner: synthetic clusters of 8 / 16 / 32 / 64 GPUs of 4-6 types on 2 / 4 / 8 / 16 hosts
   (``tests.planner.instances.synthetic_cluster``: four GPUs a host, racks of four hosts),
   Llama-3.1-70B, B = 32, s = 512, n = 100, Σω ≤ 0.05: the first plan, then the re-plan without
   the last host, in the same run; the ratio re-plan ÷ plan, the layer grouping the search had
   to use, and the time per doubling.
2. Ray (skipped with ``--quick``, or where no network namespace can be made): a 3-node Ray
   cluster in a network namespace of its own, the built-in model in three 16-bit stages, one a
   host, served by ``pqctl apply --ray --replan-on-loss``; one node removed; the time until a
   request is refused as re-planning, and until one is answered again, against the
   deployment's cold start (``apply`` until serving) measured in the same run.

Usage: python bench/replan.py [--quick] [--sizes 8,16]
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.indicator import prior_indicator  # noqa: E402
from planner.model_spec import load_model_spec  # noqa: E402
from planner.plan import Workload  # noqa: E402
from planner.problem import PlanningProblem  # noqa: E402
from planner.search import SearchOptions, search  # noqa: E402
from tests.planner.instances import SYNTHETIC_SIZES, synthetic_cluster  # noqa: E402

OPTIONS = SearchOptions(time_limit_s=30, mip_rel_gap=1e-3)
PQCTL = [sys.executable, "-m", "pqctl"]


def planner_rows(sizes: list[int]) -> list[tuple[int, int, float, float, int, int]]:
    model = load_model_spec("llama-3.1-70b")
    rows = []
    for n in sizes:
        cluster = synthetic_cluster(n)
        last = cluster.hosts[-1].name
        smaller = cluster.without(d.key for d in cluster.devices if d.host == last)
        smaller = replace(smaller, hosts=cluster.hosts[:-1])
        times, groups = [], []
        for spec in (cluster, smaller):
            problem = PlanningProblem(
                model=model,
                cluster=spec,
                workload=Workload(32, 512, 100, 100),
                indicator=prior_indicator(model, 128),
                quality_budget=0.05,
            )
            started = time.perf_counter()
            result = search(problem, OPTIONS)
            times.append(time.perf_counter() - started)
            groups.append(result.layer_group_size)
        rows.append((n, len(cluster.hosts), times[0], times[1], groups[0], groups[1]))
    return rows


def report_planner(rows: list[tuple[int, int, float, float, int, int]]) -> None:
    print("Planner: plan, then re-plan without the last host (Llama-3.1-70B, count form)")
    print(f"{'devices':>7} {'hosts':>5} {'plan s':>8} {'re-plan s':>9} {'÷ plan':>7} {'group':>6}")
    for n, hosts, first, again, g1, g2 in rows:
        print(f"{n:7d} {hosts:5d} {first:8.2f} {again:9.2f} {again / first:6.2f}× {max(g1, g2):6d}")
    steps = [b[3] / a[3] for a, b in itertools.pairwise(rows)]
    if steps:
        print("re-plan time × per doubling: " + ", ".join(f"{s:.1f}" for s in steps))
    n, _, first, again, _, _ = rows[-1]
    print(f"re-plan ÷ plan, {n} devices: {again / first:.2f}×")


def ray_recovery() -> None:
    from tests.ray_cluster import RayNamespace, namespaces_available
    from tests.runtime.serve.plans import on_hosts, serving_plan

    why = namespaces_available()
    if why:
        print(f"Ray part skipped: {why}")
        return
    with tempfile.TemporaryDirectory() as scratch, RayNamespace(["hostA", "hostB", "hostC"]) as ns:
        base = serving_plan("bard-tiny", [0, 3, 6], batch=4, prefill=2, decode=2, max_new=96)
        moved = on_hosts(base, ns.hosts)
        plan = replace(moved, quality=replace(moved.quality, budget=0.0))
        path = Path(scratch) / "plan.json"
        plan.save(path)
        env = {**ns.env, "PQCTL_STATE_DIR": str(Path(scratch) / "state"), "COLUMNS": "200"}

        def pqctl(*args: str) -> subprocess.CompletedProcess[str]:
            return ns.run([*PQCTL, *args], timeout_s=300, cwd=ROOT, env=env)

        started = time.monotonic()
        up = pqctl("apply", str(path), "--ray", ns.address, "--detach", "--replan-on-loss",
                   "--endpoint", "tcp://127.0.0.1:*")  # fmt: skip
        cold = time.monotonic() - started
        if up.returncode != 0:
            raise SystemExit(f"apply failed: {up.stderr[-800:]}")
        try:
            ask = ("generate", "--max-new", "8", "--json", "--timeout", "30", "ROMEO:")
            if pqctl(*ask).returncode != 0:
                raise SystemExit("no answer before the loss")
            ns.remove("hostC")
            lost = time.monotonic()
            refused = None
            while time.monotonic() - lost < 300:
                done = pqctl(*ask)
                if done.returncode == 0:
                    break
                if refused is None and "re-planning" in done.stderr:
                    refused = time.monotonic() - lost
            back = time.monotonic() - lost
        finally:
            pqctl("stop")
    print("\nRay: 3 nodes in a network namespace, built-in model in 3 stages (one a host)")
    print(f"cold start (apply until serving): {cold:.1f} s")
    if refused is not None:
        print(f"node removed → first request refused as re-planning: {refused:.1f} s")
    print(f"node removed → serving again on 2 hosts: {back:.1f} s ({back / cold:.2f}× cold start)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 and 16 devices; no Ray part")
    parser.add_argument("--sizes", help="synthetic sizes, e.g. 8,16 (default 8,16,32,64)")
    args = parser.parse_args()
    sizes = [int(n) for n in (args.sizes or ("8,16" if args.quick else "8,16,32,64")).split(",")]
    if any(n not in SYNTHETIC_SIZES for n in sizes):
        parser.error(f"--sizes: sizes are {', '.join(map(str, SYNTHETIC_SIZES))}")
    report_planner(planner_rows(sizes))
    if not args.quick:
        ray_recovery()
    return 0


if __name__ == "__main__":
    sys.exit(main())
