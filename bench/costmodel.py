"""Cost-model accuracy: per-stage prefill and decode time predicted from a profile vs measured
by running the same stage shards, in one run.

For each model (the built-in bard-tiny and a random-weight Llama, hidden 1024, 8 layers):

1. the plans' stages (1-3 stages; uniform and mixed precisions) are loaded with
   ``runtime.model.shard.load_shard``, every layer at its planned precision;
2. in each of ``--rounds`` rounds, ``runtime.measure.profiling.measure_device`` (what
   ``pqctl profile`` runs) takes one pass over the profile grid at every precision the plans use,
   then every plan runs once in this process with its micro-batch layout: prefill micro-batches of
   ``prefill_size`` prompts, then decode steps of ``decode_size`` sequences for the expected new
   tokens;
3. each profile timing keeps its shortest time over the rounds (as ``pqctl profile`` keeps the
   shortest over passes) and becomes a profile file (``pqctl.device_profiles.to_profile``); the
   planner's cost model (``planner.problem.build_tables`` + ``planner.simulator.evaluate``,
   reading it) predicts each stage's time per prefill and per decode micro-batch;
4. each measured stage call (step context + forward) is timed as the profile times a grid
   point: the shorter of two back-to-back calls within a round, the shortest over rounds, per
   (micro-batch, step); then averaged over micro-batches and steps.

Why rounds: on a shared cloud CPU the machine's speed drifts, at its best for a minute and
10-20 % slower for the next (``runtime/measure/profiling.py``); a profile taken in one stretch and a
measurement taken in the next compare two machines. Interleaved, both estimate the
uncontended time over the same minutes.

Printed: predicted and measured ms per stage and the mean absolute percentage error (MAPE) per
model and phase (target ≤ 6 %), plus each profile fit's held-out error. One torch thread
(``--threads``): on a CPU shared with other processes a second thread is often descheduled
and stalls every op. The load average is printed at start and end; figures are only
comparable within one run.

``--standard`` is the documented measurement (README, docs/profiling.md): the first four plans
only. ``--quick`` is a smoke-size run that checks the whole path and says little about
accuracy: bard-tiny only, two plans (1 stage at 16 bits, 2 stages at 16 | 8 bits), a smaller
profile grid, one round.

Usage: python bench/costmodel.py [--standard | --quick] [--json] [--threads 1] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.cost_model import default_group_size  # noqa: E402
from planner.indicator import prior_indicator  # noqa: E402
from planner.local_host import local_cluster  # noqa: E402
from planner.model_spec import load_model_spec  # noqa: E402
from planner.plan import Workload  # noqa: E402
from planner.problem import PlanningProblem, build_tables  # noqa: E402
from planner.profiles import (  # noqa: E402
    load_profiles,
    save_profile,
    shape_key,
)
from planner.simulator import StageAssignment, evaluate  # noqa: E402
from pqctl.device_profiles import fit_errors, profile_file_name, to_profile  # noqa: E402
from runtime.measure.profiling import (  # noqa: E402
    DeviceMeasurement,
    ProfileGrid,
    Timing,
    measure_device,
    shortest_call,
    write_random_checkpoint,
)
from runtime.model.arch import ArchConfig, arch_from_config, read_config  # noqa: E402
from runtime.model.assets import builtin_model_dir  # noqa: E402
from runtime.model.shard import StageShard, StageSpec, load_shard  # noqa: E402

WORKLOAD = Workload(global_batch=4, prompt_len=64, max_new_tokens=32, expected_new_tokens=32)
GRID = ProfileGrid((1, 2, 4), (32, 64, 128), (1, 2, 4), (64, 96, 128), repeats=1)
QUICK_GRID = ProfileGrid((1, 2, 4), (32, 64), (1, 2, 4), (64, 96), repeats=1)
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


Mode = Literal["full", "standard", "quick"]


def plan_cases(mode: Mode) -> list[PlanCase]:
    """Plans of an 8-layer model: 1-3 stages, uniform and mixed precisions (module docstring
    for the modes)."""
    if mode == "quick":
        return [
            PlanCase("1 stage, 16 bits", ((16,) * 8,), 2, 4),
            PlanCase("2 stages, 16 | 8", ((16,) * 4, (8,) * 4), 2, 2),
        ]
    cases = [
        PlanCase("1 stage, 16 bits", ((16,) * 8,), 2, 4),
        PlanCase("1 stage, 4 bits", ((4,) * 8,), 4, 4),
        PlanCase("2 stages, 16 | 8", ((16,) * 4, (8,) * 4), 2, 2),
        PlanCase("3 stages, mixed", ((16, 16, 8), (8, 4, 4), (4, 16)), 1, 2),
    ]
    if mode == "full":
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
    """One micro-batch through every stage, as the pipeline runs it; seconds per stage, timed
    as the profile times a grid point (``shortest_call``: a repeated call rewrites the same
    cache positions with the same values)."""
    b, new = ids.shape
    positions = torch.arange(past, past + new).expand(b, new)
    key_valid = torch.ones(b, past + new, dtype=torch.bool)
    x: torch.Tensor = ids
    times = []
    cpu = torch.device("cpu")
    for shard in shards:

        def step(shard: StageShard = shard, x: torch.Tensor = x) -> torch.Tensor:
            out: torch.Tensor = shard(x, shard.context(slots, past, positions, key_valid))
            return out

        best, x = shortest_call(step, cpu)
        times.append(best)
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


TimingKey = tuple[str, str, int, int, int]


def profile_and_measure(
    arch: ArchConfig,
    runs: list[CaseRuns],
    bits: tuple[int, ...],
    group: int,
    rounds: int,
    grid: ProfileGrid = GRID,
) -> DeviceMeasurement:
    """``rounds`` rounds, each one profile pass over every precision (``measure_device``)
    then one run of every plan; the first run of each plan warms it up. Each profile timing
    keeps its shortest time over rounds, as ``pqctl profile`` keeps the shortest over passes,
    so the profile and the measurement sample the same stretch of the machine's time."""
    best: dict[TimingKey, Timing] = {}
    merged = DeviceMeasurement("cpu")
    started = time.perf_counter()
    with torch.inference_mode():
        for case in runs:
            case.run()  # warm-up
    for _ in range(rounds):
        m = measure_device(arch, "cpu", bits, grid, group_size=group)
        merged.unavailable |= m.unavailable
        merged.kernel_paths |= m.kernel_paths
        for t in m.timings:
            key = (t.part, t.phase, t.bits, t.micro_batch, t.context_len)
            if key not in best or t.latency_s < best[key].latency_s:
                best[key] = t
        with torch.inference_mode():
            for case in runs:
                case.run()
    merged.timings = list(best.values())
    merged.elapsed_s = time.perf_counter() - started
    return merged


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
    profile_dir.mkdir()
    runs = [CaseRuns(load_stages(directory, arch, case, group), arch, case) for case in cases]
    grid = QUICK_GRID if args.mode == "quick" else GRID
    measured = profile_and_measure(arch, runs, used_bits(cases), group, args.rounds, grid)
    profile = to_profile("cpu", shape_key(spec), measured)
    save_profile(profile, profile_dir / profile_file_name("cpu", shape_key(spec)))
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
        for e in fit_errors(profile)
    ]
    return {"model": name, "elapsed_s": measured.elapsed_s, "stages": rows,
            "mape": mape, "fit_error": fits}  # fmt: skip


def print_model(result: dict[str, Any]) -> None:
    print(f"\n== {result['model']} (profiled and measured in {result['elapsed_s']:.0f} s)")
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
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--standard", action="store_const", dest="mode", const="standard",
        help="the documented measurement: 4 plans, fewer precisions",
    )  # fmt: skip
    modes.add_argument(
        "--quick", action="store_const", dest="mode", const="quick",
        help="smoke-size run: bard-tiny only, 2 plans, small grid, 1 round",
    )  # fmt: skip
    parser.set_defaults(mode="full")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--rounds", type=int, default=None,
        help="rounds of one profile pass and one run of each plan (default 8; quick 1)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.mode == "quick" else 8
    torch.set_num_threads(args.threads)
    cases = plan_cases(args.mode)
    load_start = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory(prefix="pqctl-costmodel-") as tmp:
        work = Path(tmp)
        results.append(run_model("bard-tiny", builtin_model_dir(), cases, args, work))
        if args.mode != "quick":
            big = work / "llama-h1024"
            big.mkdir()
            (big / "config.json").write_text(json.dumps(RANDOM_LLAMA))
            arch = arch_from_config(dict(RANDOM_LLAMA), "random llama")
            write_random_checkpoint(arch, arch.num_layers, big)
            results.append(run_model("random llama h1024 x8", big, cases, args, work))
    summary = {
        "mode": args.mode, "threads": args.threads, "rounds": args.rounds,
        "workload": str(WORKLOAD),
        "load_average": [load_start, os.getloadavg()[0]], "models": results,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), best of {args.rounds} rounds; "
          f"workload {WORKLOAD}; load average at start {load_start:.2f}")  # fmt: skip
    for result in results:
        print_model(result)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
