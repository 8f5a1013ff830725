"""Quality indicator fidelity and the throughput a perplexity budget buys, measured in one run.

Fidelity. Random mixed-precision assignments of the built-in model ``bard-tiny`` (seeded; a
third draw every layer from 16/8/4/3/2 bits, a third from 16/8/4/3, a third from 16/8/4 with a
20 % chance of 2 bits per layer) are scored by Σω under the model's calibrated indicator (the
statistics ``pqctl plan`` finds: the default statistics directory, else the shipped
``runtime/model/assets/bard-tiny/calibration.json``) and under the prior, and their perplexity
is measured through the runtime's quantized layers (``runtime.measure.evaluate``) on the evaluation
part of the held-out play (text ``pqctl calibrate`` never reads). Reported: Spearman rank
correlation between Σω and the measured relative perplexity increase over 16 bits (target ≥ 0.9),
for both indicators; and how many assignments the calibrated mapping's prediction bounds from above.
Throughput. ``pqctl profile`` measures this host's CPU for the model (quick grid, into a
temporary directory), then ``pqctl plan`` on this host with that profile, for a batch of B
prompts of s tokens and n new tokens, under ``--max-ppl-increase 1%`` and with every layer at
16 bits (``--quality 0``);
both plans are served by real processes (``python -m runtime.serve.gateway``) and timed on the same
batch of Hamlet passages, alternating, best of the repeats; the 1 % plan's perplexity increase is
measured on the held-out evaluation text.

Modes: by default 30 plans on 16384 evaluation tokens, batch 8 × 64 tokens with 64 new tokens,
best of 3. ``--standard`` is the documented measurement (README, docs/quality.md): 30 plans on
4096 tokens, 32 new tokens, 1 repeat. ``--quick`` is a smoke-size run that checks the whole path
(profile, plan, two served deployments, perplexity) and says little about fidelity: 4 plans on
512 tokens, one torch thread here, a one-pass profile grid, batch 4 × 32 tokens with 8 new
tokens, 1 repeat.

Usage: python bench/quality.py [--standard | --quick] [--json] [--plans 30] [--tokens N]
[--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving_util import exact_prompts, start_deployment  # noqa: E402
from planner.cost_model import default_group_size  # noqa: E402
from planner.indicator import prior_indicator  # noqa: E402
from planner.make_plan import make_plan  # noqa: E402
from planner.plan import ALL_BITS, Plan  # noqa: E402
from planner.search import SearchOptions  # noqa: E402
from pqctl.device_profiles import ProfileRequest, run_profile  # noqa: E402
from pqctl.plan_inputs import (  # noqa: E402
    PlanRequest,
    build_problem,
    record_ppl_target,
    resolve_calibration,
    resolve_model,
)
from runtime.measure.evaluate import evaluate_perplexity, held_out_ids  # noqa: E402
from runtime.measure.profiling import QUICK_GRID, ProfileGrid  # noqa: E402
from runtime.model.assets import builtin_model_dir  # noqa: E402
from runtime.serve.client import Client  # noqa: E402
from tests.runtime.serve.conftest import stop_gateway  # noqa: E402

CHOICES = ((16, 8, 4, 3, 2), (16, 8, 4, 3), "16/8/4 + 2")
SMOKE_GRID = ProfileGrid((1, 4), (32, 64), (1, 4), (64, 128), repeats=1)
"""``--quick``'s profile grid: the corners of the planned shapes, one pass."""


def random_assignments(count: int, layers: int, seed: int = 0) -> list[tuple[int, ...]]:
    """``count`` distinct mixed assignments (module docstring)."""
    rng = random.Random(seed)
    found: list[tuple[int, ...]] = []
    while len(found) < count:
        kind = CHOICES[len(found) % 3]
        if isinstance(kind, tuple):
            plan = tuple(rng.choice(kind) for _ in range(layers))
        else:
            plan = tuple(2 if rng.random() < 0.2 else rng.choice((16, 8, 4)) for _ in range(layers))
        if len(set(plan)) > 1 and plan not in found:
            found.append(plan)
    return found


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""

    def ranks(values: list[float]) -> np.ndarray:
        a = np.asarray(values, dtype=float)
        order = np.argsort(a, kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(len(a), dtype=float)
        for v in np.unique(a):
            tied = a == v
            r[tied] = r[tied].mean()
        return r

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def fidelity(count: int, tokens: int) -> dict[str, Any]:
    directory = builtin_model_dir()
    model = resolve_model(None)
    group = default_group_size(model)
    calibration = resolve_calibration(model, None, group)
    assert calibration is not None and calibration.mapping is not None, "no calibration found"
    prior = prior_indicator(model, group)
    ids = held_out_ids(directory, "evaluation")

    def ppl(bits: tuple[int, ...]) -> float:
        result = evaluate_perplexity(directory, ids, bits, max_tokens=tokens, group_size=group)
        return result.perplexity

    start = time.perf_counter()
    base = ppl((16,) * model.num_layers)
    rows = []
    for k, bits in enumerate(random_assignments(count, model.num_layers)):
        measured = ppl(bits) / base - 1
        omega = calibration.indicator.plan_omega(bits)
        rows.append(
            {
                "layer_bits": list(bits),
                "omega": omega,
                "prior_omega": prior.plan_omega(bits),
                "increase": measured,
                "predicted": calibration.mapping.predicted_increase(omega),
            }
        )
        print(f"  {k + 1}/{count} {bits} Σω {omega:.4f} +{measured:.3%}", file=sys.stderr)
    increases = [r["increase"] for r in rows]
    summary = {
        "indicator": calibration.indicator.name,
        "statistics": str(calibration.path),
        "tokens": tokens,
        "baseline_perplexity": base,
        "spearman": spearman([r["omega"] for r in rows], increases),
        "spearman_prior": spearman([r["prior_omega"] for r in rows], increases),
        "bounded": sum(r["increase"] <= r["predicted"] for r in rows),
        "plans": rows,
        "wall_s": time.perf_counter() - start,
    }
    print(
        f"  Spearman {summary['spearman']:.3f} ({summary['indicator']}), "
        f"prior {summary['spearman_prior']:.3f}",
        file=sys.stderr,
    )
    return summary


def plan_for(request: PlanRequest) -> Plan:
    problem, resolved = build_problem(request)
    plan = make_plan(problem, SearchOptions(time_limit_s=30))
    return record_ppl_target(plan, resolved.ppl_target)


def serve_and_time(
    plans: dict[str, Plan], prompts: list[str], new: int, repeats: int, tmp: Path
) -> dict[str, list[float]]:
    """Start every plan's deployment, then time the batch on each in turn, ``repeats`` times."""
    walls: dict[str, list[float]] = {name: [] for name in plans}
    with contextlib.ExitStack() as stack:
        clients = {}
        for name, plan in plans.items():
            path = tmp / f"{name}.json"
            plan.save(path)
            state = tmp / f"state-{name}"
            state.mkdir()
            served = start_deployment(path, state, name, {})
            stack.callback(stop_gateway, served.process)
            client = Client(served.state.client_endpoint, timeout_s=600)
            stack.callback(client.close)
            client.generate_many(prompts, max_new_tokens=2, ignore_eos=True)  # warm-up
            clients[name] = client
        for _ in range(repeats):
            for name, client in clients.items():
                start = time.perf_counter()
                done = client.generate_many(prompts, max_new_tokens=new, ignore_eos=True)
                walls[name].append(time.perf_counter() - start)
                assert all(c.usage["completion_tokens"] == new for c in done)
    return walls


def throughput(
    batch: int, prompt_len: int, new: int, repeats: int, tokens: int, grid: ProfileGrid
) -> dict[str, Any]:
    shape: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "max_new": new}
    with tempfile.TemporaryDirectory() as profiles:
        request = ProfileRequest(None, "cpu", ALL_BITS, grid, None, Path(profiles))
        run_profile(request)
        shape["profile_dir"] = Path(profiles)
        plans = {
            "ppl-1pct": plan_for(PlanRequest(**shape, quality=None, max_ppl_increase=0.01)),
            "16-bit": plan_for(PlanRequest(**shape, quality=0.0)),
        }
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(builtin_model_dir()))
    prompts = exact_prompts(tokenizer, batch, prompt_len)
    with tempfile.TemporaryDirectory() as tmp:
        walls = serve_and_time(plans, prompts, new, repeats, Path(tmp))
    chosen = plans["ppl-1pct"]
    ids = held_out_ids(builtin_model_dir(), "evaluation")
    group = chosen.quantization.group_size

    def ppl(bits: tuple[int, ...]) -> float:
        directory = builtin_model_dir()
        return evaluate_perplexity(
            directory, ids, bits, max_tokens=tokens, group_size=group
        ).perplexity

    increase = ppl(chosen.layer_bits) / ppl((16,) * len(chosen.layer_bits)) - 1
    rates = {name: batch * new / min(w) for name, w in walls.items()}
    return {
        "workload": shape,
        "plans": {
            name: {
                "layer_bits": list(p.layer_bits),
                "omega": p.quality.omega_sum,
                "predicted_tokens_per_s": p.prediction.throughput_tokens_per_s,
                "measured_tokens_per_s": rates[name],
                "walls_s": walls[name],
            }
            for name, p in plans.items()
        },
        "ratio": rates["ppl-1pct"] / rates["16-bit"],
        "predicted_increase": chosen.quality.predicted_ppl_increase,
        "measured_increase": increase,
        "increase_tokens": tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--standard",
        action="store_const",
        dest="mode",
        const="standard",
        help="the documented measurement: 30 plans on 4096 tokens, 32 new tokens, 1 repeat",
    )
    modes.add_argument(
        "--quick",
        action="store_const",
        dest="mode",
        const="quick",
        help="smoke-size run: 4 plans on 512 tokens, one-pass profile, small batch, 1 repeat",
    )
    parser.set_defaults(mode="full")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--plans", type=int, default=None, help="default 30 (quick 4)")
    parser.add_argument(
        "--tokens", type=int, default=None, help="default 16384 (standard 4096, quick 512)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (standard, quick 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads here (default all cores; quick 1)"
    )
    args = parser.parse_args()
    quick = args.mode == "quick"
    if args.threads or quick:
        torch.set_num_threads(args.threads or 1)
    plans = args.plans or (4 if quick else 30)
    tokens = args.tokens or {"full": 16384, "standard": 4096, "quick": 512}[args.mode]
    repeats = args.repeats or (3 if args.mode == "full" else 1)
    batch, prompt_len = (4, 32) if quick else (8, 64)
    new = {"full": 64, "standard": 32, "quick": 8}[args.mode]
    grid = SMOKE_GRID if quick else QUICK_GRID
    result = {
        "mode": args.mode,
        "fidelity": fidelity(plans, tokens),
        "throughput": throughput(batch, prompt_len, new, repeats, tokens, grid),
        "threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    f, t = result["fidelity"], result["throughput"]
    print(
        f"indicator fidelity: {len(f['plans'])} random mixed plans of bard-tiny, "
        f"perplexity on {f['tokens']} held-out tokens (16-bit {f['baseline_perplexity']:.3f})"
    )
    print(
        f"  Spearman(Σω, ppl increase): {f['indicator']} {f['spearman']:.3f} "
        f"(target ≥ 0.9), prior {f['spearman_prior']:.3f}"
    )
    print(f"  the calibrated mapping bounds {f['bounded']}/{len(f['plans'])} measured increases")
    print(
        f"throughput, batch {t['workload']['batch']} × {t['workload']['prompt_len']} tokens, "
        f"{t['workload']['max_new']} new, best of {repeats}:"
    )
    for name, p in t["plans"].items():
        print(
            f"  {name:>7}: {p['measured_tokens_per_s']:8.1f} tokens/s measured "
            f"({p['predicted_tokens_per_s']:.1f} predicted), Σω {p['omega']:.4f}, "
            f"bits {p['layer_bits']}"
        )
    if t["plans"]["ppl-1pct"]["layer_bits"] == t["plans"]["16-bit"]["layer_bits"]:
        print("  the 1 % plan keeps every layer at 16 bits here (the fastest precision this")
        print("  host's cost model predicts): the two deployments serve the same plan")
    print(
        f"  ratio 1 % plan / 16-bit: {t['ratio']:.2f}×; its perplexity increase "
        f"{t['measured_increase']:+.2%} measured ({t['predicted_increase']:+.2%} predicted)"
    )


if __name__ == "__main__":
    main()
