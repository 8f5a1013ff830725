"""Throughput of pqctl's served pipeline vs transformers ``generate`` on the same model, same run.

Every case serves one plan (``tests.runtime.serve.plans.serving_plan``: stage k runs layers
[splits[k], splits[k+1]) on this host's CPU) through real processes:
``python -m runtime.serve.gateway`` starts the gateway and one worker per stage, and
``runtime.serve.client.Client.generate_many`` sends a batch of B prompts of exactly s tokens each
(passages of Hamlet) for n greedy tokens, ignoring EOS. The baseline is ``model.generate`` in this
process on the same checkpoint, the same B × s token ids and n new tokens, greedy: in fp32 (the
checkpoint's dtype), and in bf16, because pqctl's 16-bit CPU path keeps bf16 weights where the CPU
multiplies bf16 natively (``runtime.quant.dense_weight_dtype``). Throughput is B·n generated tokens
over the wall time of the whole batch (prefill included).

Cases: 16 bits on 1 stage; 16 bits on 2 stages with two micro-batches of B/2 (as is; with 40 %
of the layers on the last stage, which also holds the LM head, and prefill micro-batches of B/4
for a shorter pipeline fill; with one thread per stage process; and with one micro-batch of B
so that the stages take turns); all
layers at 8, at 4 and at 3 bits (1 stage). Every deployment is started and warmed
up (the full batch, 2 tokens) before timing; then each repeat times the two baselines and every
case in turn, so load from other processes falls on all of them; ratios use the best of the
repeats (medians are in ``--json``). "waves" counts how many admissions the batch took: the
gateway admits a request as soon as a decode micro-batch is free, so a request that arrives
alone is served alone and the rest wait for that micro-batch to finish.

Also printed, per case and stage: the stages' busy time per prefill and decode micro-batch
step in the best run (from the metrics they publish each second) against the plan's
prediction (the cost model on this host's CPU as ``planner.local_host.measure_local_cpu``
measures it), peak resident memory against the predicted memory; for one-stage cases the
decode time per token beyond the stage's busy time ("ovh": gateway, two hops, client
protocol); the time of one data-path hop (``runtime.serve.frames`` over a ZeroMQ PUSH/PULL on
loopback) against a stage's step; and, per run, the share of the CPU that processes outside
this benchmark took ("other CPU"): on a shared machine a run with much of it is not comparable.

Models: a random-weight Llama (hidden 1024, 10 layers, vocab 32000, 182 M parameters, 0.73 GB
in fp32) written to a temporary directory with the built-in tokenizer; and the built-in
``bard-tiny`` (8 layers, hidden 192). Only ratios within one run are comparable: the load
average is printed at the start and the end.

``--quick`` is a smoke-size run that says little about speed: bard-tiny only, a batch of 4
prompts of 32 tokens and 8 new tokens, three cases (16 bits on 1 and on 2 stages, 4 bits on 1
stage), one repeat; still real processes and sockets throughout.

Usage: python bench/serving.py [--quick] [--json] [--repeats 3] [--cases TEXT]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._serving_util import (  # noqa: E402
    ForeignCpu,
    LlamaShape,
    MetricsRecorder,
    StageMeasured,
    checkpoint_dir,
    exact_prompts,
    fastest_local_cpu,
    hop_ms,
    make_random_llama,
    print_hops,
    print_stages,
    print_throughput,
    stage_measured,
    start_deployment,
    with_predictions,
)
from planner.cluster import DeviceType  # noqa: E402
from planner.plan import Plan  # noqa: E402
from runtime.quant import dense_weight_dtype  # noqa: E402
from runtime.serve.client import Client, Completion  # noqa: E402
from tests.runtime.serve.conftest import Served, stop_gateway  # noqa: E402
from tests.runtime.serve.plans import serving_plan, write_plan  # noqa: E402

RANDOM_LLAMA = LlamaShape(layers=10, hidden=1024, intermediate=2816, heads=16, kv_heads=8,
                          vocab=32000)  # fmt: skip
LARGE_LLAMA = LlamaShape(layers=16, hidden=2048, intermediate=5632, heads=32, kv_heads=8,
                         vocab=32000)  # fmt: skip
"""``--large``: 1.4 GB of linear weights at 16 bits (bf16), large enough that a decode step is
bound by memory bandwidth rather than by per-step overheads."""
BANDWIDTH_BYTES = 1 << 30
"""The buffer the bandwidth probe sums: far beyond any cache."""
WAVE_GAP_S = 0.05
"""Admissions further apart than this count as separate waves."""
SETTLE_S = 0.2
"""Pause before each timed call: the previous contender's threads stop spinning first."""
PROBE_REPEATS = 3
"""Sums of the bandwidth probe before and after each timed run (the best counts)."""


@dataclass(frozen=True, slots=True)
class Batch:
    """What every run generates: B prompts of s tokens, n new tokens each."""

    size: int
    prompt_len: int
    new_tokens: int


@dataclass(frozen=True, slots=True)
class Case:
    """One served plan: equal stages of consecutive layers, the bits of every layer, and the
    issue's target ratio to transformers fp32. Prefill and decode micro-batches hold B / stages
    sequences, so every stage has a micro-batch to work on."""

    label: str
    stages: int
    bits: int
    target: float | None
    threads: int | None = None
    """OMP_NUM_THREADS of the gateway and stage processes; None: torch's default (all cores)."""
    micro_batch: int | None = None
    """Prefill and decode micro-batch size; None: B / stages; 0: B (the stages take turns)."""
    last_share: float | None = None
    """Share of the layers on the last stage (it also holds the LM head); None: equal stages."""
    prefill_parts: int | None = None
    """Prefill in this many micro-batches of B / parts instead of ``micro_batch`` (a shorter
    pipeline fill)."""


@dataclass(frozen=True, slots=True)
class ModelSetup:
    """A model to serve and the batch to time on it."""

    name: str
    source: str
    layers: int
    group_size: int
    batch: Batch


@dataclass
class Runs:
    """Timed runs of one contender: wall seconds, and for pqctl what the usage says."""

    wall_s: list[float] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    decode_ms_per_step: list[float] = field(default_factory=list)
    waves: list[int] = field(default_factory=list)
    foreign_cpu: list[float] = field(default_factory=list)
    """Share of the CPU that other processes took during each run."""
    spans: list[tuple[float, float]] = field(default_factory=list)
    """Wall-clock (``time.time()``) start and end of each run."""
    bandwidth_gb_s: list[float] = field(default_factory=list)
    """The mean of the bandwidth probes taken just before and just after each run
    (:func:`measure_bandwidth_gb_s`): what the machine gave then, the denominator of that run's
    share. On a cloud VM it drifts by 2x within seconds (another tenant's load), so a probe
    minutes away says little about a run."""

    def best(self) -> int:
        """Index of the fastest run."""
        return min(range(len(self.wall_s)), key=self.wall_s.__getitem__)


@dataclass
class Deployment:
    """A running case: its plan, gateway, metrics and client."""

    case: Case
    plan: Plan
    served: Served
    recorder: MetricsRecorder
    client: Client
    runs: Runs = field(default_factory=Runs)


QUICK_CASES = ("16-bit, 1 stage", "16-bit, 2 stages", "4-bit, 1 stage")
"""The cases of ``--quick``, by label: one and two stages, a quantized stage."""


def cases() -> list[Case]:
    """The cases of every model."""
    return [
        Case("16-bit, 1 stage", 1, 16, 1.0),
        Case("16-bit, 2 stages", 2, 16, 0.9),
        Case("16-bit, 2 stages, head-balanced", 2, 16, 0.9, last_share=0.4, prefill_parts=4),
        Case("16-bit, 2 stages, 1 thread each", 2, 16, None, threads=1),
        Case("16-bit, 2 stages, 1 micro-batch", 2, 16, None, micro_batch=0),
        Case("8-bit, 1 stage", 1, 8, 1.8),
        Case("4-bit, 1 stage", 1, 4, None),
        Case("3-bit, 1 stage", 1, 3, None),
    ]


def case_plan(setup: ModelSetup, case: Case, cpu: DeviceType) -> Plan:
    """The case's plan with per-stage predictions for this host's CPU."""
    b = setup.batch
    micro = b.size // case.stages if case.micro_batch is None else case.micro_batch or b.size
    micro = max(1, micro)  # a batch smaller than the stages: one sequence at a time
    prefill = micro if case.prefill_parts is None else b.size // case.prefill_parts
    splits = [k * setup.layers // case.stages for k in range(case.stages)]
    if case.last_share is not None:
        splits[-1] = setup.layers - round(case.last_share * setup.layers)
    plan = serving_plan(
        setup.source,
        splits,
        case.bits,
        batch=b.size,
        prompt_len=b.prompt_len,
        max_new=b.new_tokens,
        prefill=max(1, prefill),
        decode=micro,
        group_size=setup.group_size,
    )
    return with_predictions(plan, cpu)


def deploy(
    stack: contextlib.ExitStack, setup: ModelSetup, case: Case, cpu: DeviceType, tmp: Path
) -> Deployment:
    """Start the case's gateway and stages; they stop when ``stack`` closes."""
    plan = case_plan(setup, case, cpu)
    name = f"{setup.name}-{len(list(tmp.glob('*.json')))}"
    path = write_plan(plan, tmp, f"{name}.json")
    state_dir = tmp / f"state-{name}"
    state_dir.mkdir()
    env = {} if case.threads is None else {"OMP_NUM_THREADS": str(case.threads)}
    served = start_deployment(path, state_dir, name, env)
    stack.callback(stop_gateway, served.process)
    recorder = MetricsRecorder(served.state.status_endpoint)
    stack.callback(recorder.close)
    client = Client(served.state.client_endpoint, timeout_s=600)
    stack.callback(client.close)
    return Deployment(case, plan, served, recorder, client)


def waves(done: list[Completion]) -> int:
    """Separate admissions of the batch (1: all its requests were admitted together)."""
    admitted = sorted(float(c.usage["queued_s"]) for c in done)
    return 1 + sum(b - a > WAVE_GAP_S for a, b in itertools.pairwise(admitted))


@contextlib.contextmanager
def probed(runs: Runs) -> Iterator[None]:
    """Around one timed run: a bandwidth probe, the settling pause, the run, a second probe; the
    mean of the two joins ``runs.bandwidth_gb_s``."""
    before = measure_bandwidth_gb_s(PROBE_REPEATS)
    time.sleep(SETTLE_S)
    yield
    runs.bandwidth_gb_s.append((before + measure_bandwidth_gb_s(PROBE_REPEATS)) / 2)


def time_pqctl(deployment: Deployment, prompts: list[str], new_tokens: int) -> None:
    """One timed batch through the deployment, recorded in its runs."""
    with probed(deployment.runs), ForeignCpu() as foreign:
        started, start = time.time(), time.perf_counter()
        done = deployment.client.generate_many(prompts, max_new_tokens=new_tokens, ignore_eos=True)
        wall = time.perf_counter() - start
        ended = time.time()  # before the second probe
    deployment.runs.spans.append((started, ended))
    assert all(c.usage["completion_tokens"] == new_tokens for c in done)
    first = max(float(c.usage["first_token_s"]) for c in done)
    last = max(float(c.usage["total_s"]) for c in done)
    runs = deployment.runs
    runs.wall_s.append(wall)
    runs.first_token_s.append(first)
    runs.decode_ms_per_step.append(1e3 * (last - first) / max(1, new_tokens - 1))
    runs.waves.append(waves(done))
    runs.foreign_cpu.append(foreign.share)


def time_generate(model: Any, ids: torch.Tensor, new_tokens: int) -> float:
    """Wall seconds of one greedy ``generate`` of ``new_tokens`` tokens for the batch ``ids``."""
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return elapsed


def load_baselines(source: str) -> dict[str, Any]:
    """The checkpoint through transformers in fp32 and in bf16."""
    from transformers import AutoModelForCausalLM

    directory = checkpoint_dir(source)
    return {
        name: AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }


def time_baselines(
    models: dict[str, Any], ids: torch.Tensor, batch: Batch, runs: dict[str, Runs]
) -> None:
    """One timed prefill-only call and one full generate per dtype, the generate between two
    bandwidth probes."""
    for name, model in models.items():
        time.sleep(SETTLE_S)
        runs[name].first_token_s.append(time_generate(model, ids, 1))
        with probed(runs[name]), ForeignCpu() as foreign:
            runs[name].wall_s.append(time_generate(model, ids, batch.new_tokens))
        runs[name].foreign_cpu.append(foreign.share)


def measure_bandwidth_gb_s(repeats: int = 5) -> float:
    """This machine's memory bandwidth as torch reads it: the best of ``repeats`` sums of a
    1 GiB buffer (all of torch's threads), GB/s."""
    buffer = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32)
    buffer.sum()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return BANDWIDTH_BYTES / best / 1e9


@dataclass(frozen=True, slots=True)
class StepBytes:
    """What one decode step of the whole batch reads: every stage's weights once per decode
    micro-batch (packed codes, scales and zeros as stored; the LM head dense), and the KV cache
    of every sequence at the batch's mean context."""

    weights: int
    kv: int

    @property
    def total(self) -> int:
        return self.weights + self.kv


def _arch(source: str) -> tuple[Path, Any]:
    """The checkpoint directory of ``source`` and its architecture."""
    from runtime.model.arch import arch_from_config, read_config

    directory = checkpoint_dir(source)
    return directory, arch_from_config(read_config(directory), str(directory))


def _kv_read_bytes(arch: Any, batch: Batch, itemsize: int) -> int:
    """Keys and values one decode step reads: every sequence at the batch's mean context."""
    context = batch.prompt_len + batch.new_tokens / 2
    return round(
        2 * arch.num_layers * batch.size * context * arch.num_kv_heads * arch.head_dim * itemsize
    )


def decode_step_bytes(
    source: str, plan: Plan, batch: Batch, weight_dtype: torch.dtype
) -> StepBytes:
    """:class:`StepBytes` of ``plan`` (``weight_dtype``: its 16-bit weights' dtype; the KV
    cache is in the CPU's fp32 compute dtype)."""
    from runtime.model.shard import linear_shapes
    from runtime.quant import packed_nbytes

    _, arch = _arch(source)
    shapes = linear_shapes(arch).values()
    group = plan.quantization.group_size
    dense = weight_dtype.itemsize
    per_layer = {
        bits: sum(packed_nbytes(r, c, bits, group, dense) for r, c in shapes)
        for bits in set(plan.layer_bits)
    }
    layers = sum(per_layer[b] for b in plan.layer_bits)
    head = arch.vocab_size * arch.hidden_size * dense
    micro_batches = math.ceil(batch.size / plan.micro_batching.decode_size)
    return StepBytes((layers + head) * micro_batches, _kv_read_bytes(arch, batch, 4))


def baseline_step_bytes(source: str, batch: Batch, dtype: torch.dtype) -> StepBytes:
    """What transformers reads per decode step: every weight once, in ``dtype``."""
    from runtime.model.shard import linear_shapes

    _, arch = _arch(source)
    linear = sum(r * c for r, c in linear_shapes(arch).values()) * arch.num_layers
    weights = (linear + arch.vocab_size * arch.hidden_size) * dtype.itemsize
    return StepBytes(weights, _kv_read_bytes(arch, batch, dtype.itemsize))


def stored_weight_dtype(source: str) -> torch.dtype:
    """The dtype of pqctl's 16-bit CPU weights for this checkpoint (its stored dtype decides,
    ``runtime.quant.dense_weight_dtype``): the dtype a like-for-like baseline computes in."""
    from runtime.model.checkpoint import Checkpoint
    from runtime.model.shard import layer_tensors

    directory, arch = _arch(source)
    stored = Checkpoint(directory).dtype_of(next(iter(layer_tensors(arch, 0))))
    return dense_weight_dtype(torch.float32, torch.device("cpu"), stored)


def _decode_figures(
    ms_per_step: float, step: StepBytes, probe_gb_s: float, highest_gb_s: float
) -> dict[str, Any]:
    """Bytes a decode step reads, at what rate, and the share of the bandwidth: of the mean of
    the probes taken around that run, and of the highest probe of the whole run."""
    rate = step.total / (ms_per_step / 1e3) / 1e9 if ms_per_step > 0 else 0.0
    return {
        "decode_bytes_per_step": step.total,
        "decode_weight_bytes_per_step": step.weights,
        "decode_gb_s": rate,
        "bandwidth_probe_gb_s": probe_gb_s,
        "decode_bandwidth_share": rate / probe_gb_s,
        "decode_bandwidth_share_of_highest": rate / highest_gb_s,
    }


def summarize_baseline(
    runs: Runs, batch: Batch, step: StepBytes, bandwidth_gb_s: float
) -> dict[str, Any]:
    wall, prefill = min(runs.wall_s), min(runs.first_token_s)
    probe = runs.bandwidth_gb_s[runs.best()]
    decode_ms = 1e3 * (wall - prefill) / max(1, batch.new_tokens - 1)
    return {
        "tokens_per_s": batch.size * batch.new_tokens / wall,
        "best_s": wall,
        "median_s": statistics.median(runs.wall_s),
        "foreign_cpu": runs.foreign_cpu,
        "prefill_s": prefill,
        "decode_ms_per_step": decode_ms,
        "bandwidth_probes_gb_s": runs.bandwidth_gb_s,
        **_decode_figures(decode_ms, step, probe, bandwidth_gb_s),
    }


def summarize_stage(deployment: Deployment, index: int, run: int) -> dict[str, Any]:
    span = deployment.runs.spans[run]
    measured: StageMeasured = stage_measured(deployment.recorder, index, span)
    stage = deployment.plan.stages[index]
    predicted = stage.predicted
    r = stage.layer_range
    return {
        "stage": index,
        "layers": [r.start, r.stop],
        "measured": asdict(measured),
        "predicted_prefill_ms": 1e3 * predicted.prefill_s,
        "predicted_decode_ms": 1e3 * predicted.decode_s,
        "predicted_memory_bytes": predicted.memory_bytes,
    }


def summarize_case(
    deployment: Deployment,
    batch: Batch,
    base: dict[str, Any],
    bandwidth_gb_s: float,
    weight_dtype: torch.dtype,
) -> dict[str, Any]:
    runs, case = deployment.runs, deployment.case
    plan = deployment.plan
    step = decode_step_bytes(plan.model.source, plan, batch, weight_dtype)
    same = "bf16" if weight_dtype == torch.bfloat16 else "fp32"
    best = runs.best()
    tokens_per_s = batch.size * batch.new_tokens / runs.wall_s[best]
    mb = deployment.plan.micro_batching
    stages = [summarize_stage(deployment, k, best) for k in range(case.stages)]
    return {
        "case": case.label,
        "stages": case.stages,
        "bits": case.bits,
        "threads": case.threads,
        "micro_batches": [mb.prefill_size, mb.decode_size],
        "tokens_per_s": tokens_per_s,
        "best_s": runs.wall_s[best],
        "median_s": statistics.median(runs.wall_s),
        "ratio_fp32": tokens_per_s / base["fp32"]["tokens_per_s"],
        "ratio_bf16": tokens_per_s / base["bf16"]["tokens_per_s"],
        "same_dtype": same,
        "ratio_same": tokens_per_s / base[same]["tokens_per_s"],
        "target_vs_fp32": case.target,
        "first_token_s": runs.first_token_s[best],
        "decode_ms_per_step": runs.decode_ms_per_step[best],
        "bandwidth_probes_gb_s": runs.bandwidth_gb_s,
        **_decode_figures(
            runs.decode_ms_per_step[best], step, runs.bandwidth_gb_s[best], bandwidth_gb_s
        ),
        "overhead_ms_per_step": overhead_ms(runs.decode_ms_per_step[best], stages),
        "waves": runs.waves,
        "foreign_cpu": runs.foreign_cpu,
        "best_run": best,
        "stage_stats": stages,
    }


def overhead_ms(decode_ms_per_step: float, stages: list[dict[str, Any]]) -> float | None:
    """Decode time per token step beyond the stage's busy time (one stage only: the gateway,
    two hops, the client protocol); None for a pipeline, where steps of micro-batches overlap."""
    busy = stages[0]["measured"]["decode_step_ms"]
    return None if len(stages) != 1 or busy is None else decode_ms_per_step - busy


def measure_model(
    setup: ModelSetup, repeats: int, cpu: DeviceType, chosen: list[Case], bandwidth_gb_s: float
) -> dict[str, Any]:
    """Deploy every case of ``setup``, warm up, time them all in turns; the summary."""
    from transformers import AutoTokenizer

    batch = setup.batch
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir(setup.source))
    prompts = exact_prompts(tokenizer, batch.size, batch.prompt_len)
    ids = torch.tensor([tokenizer(p)["input_ids"] for p in prompts])
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        deployments = [deploy(stack, setup, c, cpu, Path(tmp)) for c in chosen]
        models = load_baselines(setup.source)
        for model in models.values():
            time_generate(model, ids, 2)
        for d in deployments:
            d.client.generate_many(prompts, max_new_tokens=2, ignore_eos=True)
        # the machine's bandwidth drifts: the highest probe of the run, besides each run's own
        bandwidth_gb_s = max(bandwidth_gb_s, measure_bandwidth_gb_s(5))
        time.sleep(1.2)  # the stages publish the warm-up's metrics window before recording
        for d in deployments:
            d.recorder.recording.set()
        base_runs = {name: Runs() for name in models}
        for _ in range(repeats):
            time_baselines(models, ids, batch, base_runs)
            for d in deployments:
                time_pqctl(d, prompts, batch.new_tokens)
        time.sleep(1.2)  # the last windows
        every_run = [*base_runs.values(), *(d.runs for d in deployments)]
        bandwidth_gb_s = max([bandwidth_gb_s, *(p for r in every_run for p in r.bandwidth_gb_s)])
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        base = {
            name: summarize_baseline(
                r, batch, baseline_step_bytes(setup.source, batch, dtypes[name]), bandwidth_gb_s
            )
            for name, r in base_runs.items()
        }
        weights = stored_weight_dtype(setup.source)
        return {
            "model": setup.name,
            "source": setup.source,
            "batch": asdict(batch),
            "bandwidth_gb_s": bandwidth_gb_s,
            "weights_16bit": str(weights).removeprefix("torch."),
            "baselines": base,
            "cases": [summarize_case(d, batch, base, bandwidth_gb_s, weights) for d in deployments],
            "hops": hops(setup, deployments),
        }


def hops(setup: ModelSetup, deployments: list[Deployment]) -> list[dict[str, Any]]:
    """One hop of the 2-stage case's decode and prefill frames vs its stage 0's step time
    (none when no case has two stages)."""
    two = next((d for d in deployments if d.case.stages == 2), None)  # the plain 2-stage case
    if two is None:
        return []
    hidden = two.plan.model.hidden_size
    mb = two.plan.micro_batching
    stage0 = stage_measured(two.recorder, 0, two.runs.spans[two.runs.best()])
    frames = (
        ("decode", (mb.decode_size, 1, hidden), stage0.decode_step_ms),
        ("prefill", (mb.prefill_size, setup.batch.prompt_len, hidden), stage0.prefill_step_ms),
    )
    return [
        {"phase": phase, "shape": list(shape), "bytes": 4 * shape[0] * shape[1] * shape[2],
         "hop_ms": hop_ms(shape), "stage_step_ms": step_ms}
        for phase, shape, step_ms in frames
    ]  # fmt: skip


def setups(quick: bool, large: bool, tmp: Path) -> list[ModelSetup]:
    tiny = ModelSetup("bard-tiny", "bard-tiny", 8, 32, Batch(8, 64, 32))
    if quick:
        return [ModelSetup("bard-tiny", "bard-tiny", 8, 32, Batch(4, 32, 8))]
    if large:
        path = make_random_llama(tmp / "large-llama", LARGE_LLAMA, torch.bfloat16)
        return [
            ModelSetup(f"large-llama-b{b}", str(path), LARGE_LLAMA.layers, 128,
                       Batch(b, 64, 32))
            for b in (1, 8)
        ]  # fmt: skip
    path = make_random_llama(tmp / "random-llama", RANDOM_LLAMA)
    big = ModelSetup("random-llama", str(path), RANDOM_LLAMA.layers, 128, Batch(8, 64, 32))
    return [big, tiny]


def environment() -> dict[str, Any]:
    dense = dense_weight_dtype(torch.float32, torch.device("cpu"))
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cpu_16bit_weights": str(dense).removeprefix("torch."),
        "load_average_start": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke-size run: bard-tiny only, small batch, 3 cases, 1 repeat",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output only")
    parser.add_argument(
        "--large",
        action="store_true",
        help="a random Llama of hidden 2048 x 16 layers in bf16 (1.4 GB of linear weights at 16 "
        "bits, bandwidth-bound), at batch 1 and 8, instead of the default models",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs per contender (default 3; quick 1)"
    )
    parser.add_argument(
        "--cases",
        default=None,
        help="only the pqctl cases whose label contains this text (default: every case; quick: "
        + ", ".join(QUICK_CASES)
        + ")",
    )
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    if args.cases is None and args.quick:
        chosen = [c for c in cases() if c.label in QUICK_CASES]
    else:
        chosen = [c for c in cases() if (args.cases or "") in c.label]
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    cpu = fastest_local_cpu(tries=1 if args.quick else 5)
    env = environment()
    env["cpu_measured"] = {
        "fp32_tflops": cpu.fp32_tflops,
        "bandwidth_gb_s": cpu.memory_bandwidth_gb_s,
    }
    bandwidth = measure_bandwidth_gb_s(2 if args.quick else 5)
    env["bandwidth_torch_sum_gb_s"] = bandwidth
    if not args.json:
        print(
            f"torch {env['torch']}, {env['cpu_capability']}, {env['cores']} cores, "
            f"{env['threads']} threads; 16-bit CPU stages hold {env['cpu_16bit_weights']} weights "
            f"(runtime.quant.dense_weight_dtype), so transformers runs in fp32 and in bf16"
        )
        print(
            f"cost model's CPU (measured): {cpu.fp32_tflops:.2f} TFLOPS fp32, "
            f"{cpu.memory_bandwidth_gb_s:.1f} GB/s; load average at start: "
            f"{env['load_average_start']:.2f}"
        )
        print(
            f"memory bandwidth in this run: {bandwidth:.1f} GB/s (torch sum of 1 GiB, "
            f"{env['threads']} threads); decode GB/s counts each step's packed weights, scales "
            "and KV cache read"
        )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in setups(args.quick, args.large, Path(tmp)):
            result = measure_model(setup, repeats, cpu, chosen, bandwidth)
            results.append(result)
            if not args.json:
                print_throughput(result)
                print_stages(result)
                print_hops(result)
    env["load_average_end"] = os.getloadavg()[0]
    env["elapsed_s"] = time.perf_counter() - start
    if args.json:
        print(json.dumps({"environment": env, "models": results}, indent=2))
    else:
        print(f"\nload average at end: {env['load_average_end']:.2f}; {env['elapsed_s']:.0f} s")


if __name__ == "__main__":
    main()
