"""Cost-model accuracy: per-stage prefill and decode time predicted from a fresh profile vs
measured by running the same stage shards, in one run.

For each model (the built-in bard-tiny and a random-weight Llama, hidden 1024, 8 layers):

1. ``pqctl profile`` (``pqctl.profiling.run_profile``) measures this CPU for the model's shape
   into a temporary directory;
2. for several plans (1-3 stages; uniform and mixed precisions) the planner's cost model
   (``planner.problem.build_tables`` + ``planner.simulator.evaluate``, reading that profile)
   predicts each stage's time per prefill and per decode micro-batch;
3. the stages are loaded with ``runtime.shard.load_shard`` (every layer at its planned
   precision) and run in this process with the plan's micro-batch layout: prefill micro-batches
   of ``prefill_size`` prompts, then decode steps of ``decode_size`` sequences for the expected
   new tokens. The plans take turns: a warm-up run, then at least ``repeats`` runs of each,
   more until they span the grid's ``spread_s``, as the profile's passes do. Each stage call
   (step context + forward) is timed as the profile times a grid point: the shorter of two
   back-to-back calls within a run, the shortest over runs (seconds apart), per (micro-batch,
   step); then averaged over micro-batches and steps.

Printed: predicted and measured ms per stage and the mean absolute percentage error (MAPE) per
model and phase (target ≤ 6 %), plus each profile fit's held-out error. Both sides estimate
the uncontended time (the best over runs spread in time: on a shared cloud CPU the speed
drifts for hundreds of milliseconds at a time, see ``runtime/profiling.py``), on one torch
thread (``--threads``): on a CPU shared with other processes a second thread is often
descheduled and stalls every op. The load average is printed at start and end; figures are
only comparable within one run.

Usage: python bench/costmodel.py [--quick] [--json] [--threads 1] [--repeats 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.cost_model import default_group_size  # noqa: E402
from planner.indicator import prior_indicator  # noqa: E402
from planner.local_host import local_cluster  # noqa: E402
from planner.model_spec import load_model_spec  # noqa: E402
from planner.plan import Workload  # noqa: E402
from planner.problem import PlanningProblem, build_tables  # noqa: E402
from planner.profiles import load_profiles  # noqa: E402
from planner.simulator import StageAssignment, evaluate  # noqa: E402
from pqctl.profiling import ProfileRequest, run_profile  # noqa: E402
from runtime.arch import ArchConfig, arch_from_config, read_config  # noqa: E402
from runtime.assets import builtin_model_dir  # noqa: E402
from runtime.profiling import (  # noqa: E402
    CALLS_PER_PASS,
    MAX_PASS_FACTOR,
    ProfileGrid,
    write_random_checkpoint,
)
from runtime.shard import StageShard, StageSpec, load_shard  # noqa: E402

WORKLOAD = Workload(global_batch=4, prompt_len=64, max_new_tokens=32, expected_new_tokens=32)
GRID = ProfileGrid((1, 2, 4), (32, 64, 128), (1, 2, 4), (64, 96, 128), repeats=8, spread_s=10.0)
RANDOM_LLAMA = {
    "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
    "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8,
    "vocab_size": 4096, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "hidden_act": "silu",
}  # fmt: skip


@dataclass(frozen=True)
class PlanCase:
    """Stages as per-layer precisions, and the micro-batch sizes (prefill, decode)."""

    name: str
    stages: tuple[tuple[int, ...], ...]
    prefill_size: int
    decode_size: int


def plan_cases(quick: bool) -> list[PlanCase]:
    """Plans of an 8-layer model: 1-3 stages, uniform and mixed precisions."""
    cases = [
        PlanCase("1 stage, 16 bits", ((16,) * 8,), 2, 4),
        PlanCase("1 stage, 4 bits", ((4,) * 8,), 4, 4),
        PlanCase("2 stages, 16 | 8", ((16,) * 4, (8,) * 4), 2, 2),
        PlanCase("3 stages, mixed", ((16, 16, 8), (8, 4, 4), (4, 16)), 1, 2),
    ]
    if not quick:
        cases += [
            PlanCase("2 stages, 3/2 | 4/8", ((3, 3, 2, 2, 3), (4, 8, 4)), 2, 4),
            PlanCase("3 stages, 8 | 4 | 3", ((8, 8), (4, 4, 4), (3, 3, 3)), 4, 2),
        ]
    return cases


def used_bits(cases: list[PlanCase]) -> tuple[int, ...]:
    return tuple(sorted({b for c in cases for s in c.stages for b in s}, reverse=True))


# --------------------------------------------------------------------------- measurement


def load_stages(directory: Path, arch: ArchConfig, case: PlanCase, group: int) -> list[StageShard]:
    shards, start = [], 0
    for k, bits in enumerate(case.stages):
        spec = StageSpec(
            (start, start + len(bits)), bits, k == 0, k == len(case.stages) - 1, group,
            WORKLOAD.global_batch, WORKLOAD.max_context,
        )  # fmt: skip
        shards.append(load_shard(directory, arch, spec))
        start += len(bits)
    return shards


def timed_pass(
    shards: list[StageShard], ids: torch.Tensor, slots: tuple[int, int], past: int
) -> list[float]:
    """One micro-batch through every stage, as the pipeline runs it; seconds per stage, the
    shorter of :data:`CALLS_PER_PASS` calls (a repeated call rewrites the same cache
    positions with the same values)."""
    b, new = ids.shape
    positions = torch.arange(past, past + new).expand(b, new)
    key_valid = torch.ones(b, past + new, dtype=torch.bool)
    x: torch.Tensor = ids
    times = []
    for shard in shards:
        best, y = float("inf"), x
        for _ in range(CALLS_PER_PASS):  # as the profile times a point within a pass
            start = time.perf_counter()
            y = shard(x, shard.context(slots, past, positions, key_valid))
            best = min(best, time.perf_counter() - start)
        times.append(best)
        x = y
    return times


class CaseRuns:
    """One plan's stages and every run's stage times per prefill micro-batch and decode step."""

    def __init__(self, shards: list[StageShard], arch: ArchConfig, case: PlanCase) -> None:
        self.shards, self.case = shards, case
        gen = torch.Generator().manual_seed(0)
        shape = (WORKLOAD.global_batch, WORKLOAD.prompt_len)
        self.ids = torch.randint(0, arch.vocab_size, shape, generator=gen)
        self.prefill: dict[int, list[list[float]]] = {}
        self.decode: dict[tuple[int, int], list[list[float]]] = {}

    def run(self) -> None:
        """The plan's prefill micro-batches, then its decode steps, as the pipeline runs them."""
        batch, prompt, case = WORKLOAD.global_batch, WORKLOAD.prompt_len, self.case
        for m, start in enumerate(range(0, batch, case.prefill_size)):
            rows = (start, start + case.prefill_size)
            times = timed_pass(self.shards, self.ids[rows[0] : rows[1]], rows, 0)
            self.prefill.setdefault(m, []).append(times)
        for step in range(WORKLOAD.expected_new_tokens - 1):
            for m, start in enumerate(range(0, batch, case.decode_size)):
                rows = (start, start + case.decode_size)
                token = self.ids[rows[0] : rows[1], -1:]
                times = timed_pass(self.shards, token, rows, prompt + step)
                self.decode.setdefault((step, m), []).append(times)

    def result(self) -> tuple[list[float], list[float]]:
        """Per-stage mean seconds per prefill and per decode micro-batch: the best run of each
        call (the first run, a warm-up, dropped), averaged."""
        return _best_mean(self.prefill.values()), _best_mean(self.decode.values())


def measure_cases(runs: list[CaseRuns], repeats: int, spread_s: float) -> None:
    """A warm-up run and at least ``repeats`` runs of every plan, the plans taking turns so
    each plan's runs are spread over the whole measurement; more runs (up to
    ``MAX_PASS_FACTOR × repeats``) until they span ``spread_s`` seconds, as the profile's
    passes do."""
    started, done = time.perf_counter(), 0
    while done < MAX_PASS_FACTOR * repeats + 1:
        if done > repeats and time.perf_counter() - started >= spread_s:
            break
        for case in runs:
            case.run()
        done += 1


def _best_mean(runs_per_call: Any) -> list[float]:
    """Per stage: the shortest of each call's runs (the warm-up dropped), averaged."""
    best = [
        [min(run[k] for run in runs[1:]) for k in range(len(runs[0]))] for runs in runs_per_call
    ]
    return [statistics.fmean(b[k] for b in best) for k in range(len(best[0]))]


# --------------------------------------------------------------------------- prediction


def predict_case(directory: Path, profile_dir: Path, case: PlanCase, group: int) -> Any:
    model = load_model_spec(directory)
    profiles = load_profiles(profile_dir)
    cluster = local_cluster("localhost", cpu=_nominal_cpu())
    problem = PlanningProblem(
        model=model, cluster=cluster, workload=WORKLOAD,
        indicator=prior_indicator(model, group), group_size=group, profiles=tuple(profiles),
    )  # fmt: skip
    assert problem.profile_for(cluster.devices[0]) is not None, "profile not picked up"
    tables = build_tables(problem, cluster.devices, case.prefill_size, case.decode_size)
    return evaluate(tables, [StageAssignment(0, bits) for bits in case.stages])


def _nominal_cpu() -> Any:
    from planner.catalogue import cpu_device_type

    # the profile replaces every latency figure; memory and bandwidth only size the problem
    return cpu_device_type(2, 64 * 1024**3, 10.0, 0.1, native_bf16=True)


# --------------------------------------------------------------------------- driver


def run_model(
    name: str, directory: Path, cases: list[PlanCase], args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    arch = arch_from_config(read_config(directory), str(directory))
    spec = load_model_spec(directory)
    group = default_group_size(spec)
    profile_dir = work / f"profiles-{name}"
    grid = replace(GRID, repeats=args.repeats)
    outcome = run_profile(
        ProfileRequest(str(directory), "cpu", used_bits(cases), grid, None, profile_dir,
                       threads=args.threads)
    )[0]  # fmt: skip
    runs = [CaseRuns(load_stages(directory, arch, case, group), arch, case) for case in cases]
    with torch.inference_mode():
        measure_cases(runs, args.repeats, grid.spread_s)
    rows = []
    for case, case_runs in zip(cases, runs, strict=True):
        predicted = predict_case(directory, profile_dir, case, group)
        prefill, decode = case_runs.result()
        for k in range(len(case.stages)):
            rows.append({
                "plan": case.name, "stage": k,
                "prefill_pred_ms": 1e3 * predicted.stage_prefill_s[k],
                "prefill_meas_ms": 1e3 * prefill[k],
                "decode_pred_ms": 1e3 * predicted.stage_decode_s[k],
                "decode_meas_ms": 1e3 * decode[k],
            })  # fmt: skip
    mape = {
        phase: statistics.fmean(
            abs(r[f"{phase}_pred_ms"] - r[f"{phase}_meas_ms"]) / r[f"{phase}_meas_ms"] for r in rows
        )
        for phase in ("prefill", "decode")
    }
    fits = [
        {"fit": e.what, "phase": e.phase, "held_out_mape": e.held_out_mape}
        for e in outcome.fit_errors
    ]
    return {"model": name, "profile_s": outcome.measurement.elapsed_s, "stages": rows,
            "mape": mape, "fit_error": fits}  # fmt: skip


def print_model(result: dict[str, Any]) -> None:
    print(f"\n== {result['model']} (profiled in {result['profile_s']:.0f} s)")
    print(f"{'plan':<22} {'st':>2} {'prefill pred':>12} {'meas':>8} {'err':>7}"
          f" {'decode pred':>12} {'meas':>8} {'err':>7}")  # fmt: skip
    for r in result["stages"]:
        pe = (r["prefill_pred_ms"] - r["prefill_meas_ms"]) / r["prefill_meas_ms"]
        de = (r["decode_pred_ms"] - r["decode_meas_ms"]) / r["decode_meas_ms"]
        print(
            f"{r['plan']:<22} {r['stage']:>2} {r['prefill_pred_ms']:12.2f} "
            f"{r['prefill_meas_ms']:8.2f} {100 * pe:+6.1f}% {r['decode_pred_ms']:12.3f} "
            f"{r['decode_meas_ms']:8.3f} {100 * de:+6.1f}%"
        )
    m = result["mape"]
    print(f"MAPE: prefill {100 * m['prefill']:.1f} %, decode {100 * m['decode']:.1f} % "
          "(target ≤ 6 %)")  # fmt: skip
    held = ", ".join(
        f"{f['fit']} {f['phase']} {100 * f['held_out_mape']:.1f}%"
        for f in result["fit_error"]
        if f["held_out_mape"] is not None
    )
    print(f"profile fits, held-out error: {held}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 plans, fewer precisions")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--repeats", type=int, default=GRID.repeats,
        help="profile passes and measured runs (default %(default)s)",
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = plan_cases(args.quick)
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="pqctl-costmodel-") as tmp:
        work = Path(tmp)
        results.append(run_model("bard-tiny", builtin_model_dir(), cases, args, work))
        big = work / "llama-h1024"
        big.mkdir()
        (big / "config.json").write_text(json.dumps(RANDOM_LLAMA))
        arch = arch_from_config(dict(RANDOM_LLAMA), "random llama")
        write_random_checkpoint(arch, arch.num_layers, big)
        results.append(run_model("random llama h1024 x8", big, cases, args, work))
    summary = {
        "threads": args.threads, "repeats": args.repeats, "workload": str(WORKLOAD),
        "load_average": [load_start, os.getloadavg()[0]], "models": results,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats}; "
          f"workload {WORKLOAD}; load average at start {load_start:.2f}")  # fmt: skip
    for result in results:
        print_model(result)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
