"""Helpers of ``bench/serving.py``: the model, the prompts, the plan's predictions, starting a
deployment, the stages' metrics, other processes' CPU use, one data-path hop, and the printed
tables. Nothing here times generation; ``serving.py`` does.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import zmq

from planner.cluster import DeviceType
from planner.indicator import prior_indicator
from planner.local_host import local_cluster, measure_local_cpu
from planner.model_spec import load_model_spec
from planner.plan import Plan, StagePrediction
from planner.problem import PlanningProblem, build_tables
from planner.simulator import StageAssignment, evaluate
from runtime.model.assets import BUILTIN_MODEL_NAME, builtin_model_dir
from runtime.model.corpus import held_out_play
from runtime.serve.client import Client
from runtime.serve.deployment import DeploymentError, DeploymentState
from runtime.serve.frames import StepHeader, decode_step, encode_step
from runtime.serve.monitor import Monitor
from tests.runtime.serve.conftest import Served, stop_gateway

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True, slots=True)
class LlamaShape:
    """A random-weight Llama: decoder layers, widths and vocabulary."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


def make_random_llama(
    directory: Path, shape: LlamaShape, dtype: torch.dtype = torch.float32
) -> Path:
    """Save a seeded random-weight Llama (in ``dtype``) with the built-in model's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,  # ≥ the tokenizer's 4096 ids: unknown ids decode to nothing
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(builtin_model_dir() / name, directory / name)
    return directory


def checkpoint_dir(source: str) -> Path:
    """The directory of a plan's model source (the built-in model or a path)."""
    return builtin_model_dir() if source == BUILTIN_MODEL_NAME else Path(source)


def exact_prompts(tokenizer: Any, count: int, length: int) -> list[str]:
    """``count`` distinct passages of Hamlet that each encode to exactly ``length`` tokens."""
    text = held_out_play()[1]
    prompts: list[str] = []
    start = 0
    while len(prompts) < count:
        window = tokenizer(text[start : start + 16 * length], return_offsets_mapping=True)
        end = window["offset_mapping"][length - 1][1]
        candidate = text[start : start + end]
        if len(tokenizer(candidate)["input_ids"]) == length:  # re-encoding can merge differently
            prompts.append(candidate)
        start += end + 1
    return prompts


def fastest_local_cpu(tries: int = 5, pause_s: float = 0.5) -> DeviceType:
    """``planner.local_host.measure_local_cpu`` with the highest fp32 rate of ``tries``: on a
    2-core host shared with other processes its matmul rate is bimodal (e.g. 0.17 or 0.011
    TFLOPS), as a descheduled BLAS thread stalls every product."""
    found = []
    for _ in range(tries):
        found.append(measure_local_cpu())
        time.sleep(pause_s)
    return max(found, key=lambda d: d.fp32_tflops)


def with_predictions(plan: Plan, device: DeviceType) -> Plan:
    """The plan with every stage's prediction recomputed by the cost model for its own layers,
    bits and the plan's micro-batch sizes on ``device`` (every stage on the same CPU type).

    ``tests.runtime.serve.plans.serving_plan`` copies the planner's single-stage prediction
    (made for a nominal CPU) to every stage it splits off, so it cannot be compared stage by stage.
    """
    source = plan.model.source
    model = replace(load_model_spec(checkpoint_dir(source)), source=source)
    cluster = local_cluster("localhost", cpu=device)
    problem = PlanningProblem(
        model=model,
        cluster=cluster,
        workload=plan.workload,
        indicator=prior_indicator(model, plan.quantization.group_size),
        group_size=plan.quantization.group_size,
    )
    mb = plan.micro_batching
    tables = build_tables(problem, cluster.devices, mb.prefill_size, mb.decode_size)
    ev = evaluate(tables, [StageAssignment(0, s.layer_bits) for s in plan.stages])
    stages = tuple(
        replace(
            stage,
            predicted=StagePrediction(
                ev.stage_prefill_s[k],
                ev.stage_decode_s[k],
                ev.stage_memory_bytes[k],
                ev.stage_capacity_bytes[k],
            ),
        )
        for k, stage in enumerate(plan.stages)
    )
    return Plan.from_json(replace(plan, stages=stages).to_json())


class ForeignCpu:
    """CPU time that processes outside this one's tree took while the ``with`` block ran, as a
    share of every core over the block's wall time (Linux ``/proc``; 0 elsewhere)."""

    def __enter__(self) -> ForeignCpu:
        self.share = 0.0
        self._start = (time.perf_counter(), _system_busy_s(), _tree_cpu_s(os.getpid()))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, ours = time.perf_counter(), _system_busy_s(), _tree_cpu_s(os.getpid())
        foreign = (busy - self._start[1]) - (ours - self._start[2])
        cores = os.cpu_count() or 1
        self.share = max(0.0, foreign / (cores * (wall - self._start[0])))


def _system_busy_s() -> float:
    """CPU seconds the whole machine spent busy since boot (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root`` and its living descendants (/proc/PID/stat)."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])))
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


def start_deployment(
    plan: Path, state_dir: Path, name: str, env: dict[str, str], timeout_s: float = 600.0
) -> Served:
    """``python -m runtime.serve.gateway`` for ``plan`` with extra environment ``env``, once every
    stage is ready. Like ``tests.runtime.serve.conftest.start_gateway``, but patient with a gateway
    starved of CPU while large stages load, and never leaving it running when it fails."""
    environ = dict(os.environ, PQCTL_STATE_DIR=str(state_dir), PYTHONPATH=str(ROOT), **env)
    argv = [sys.executable, "-m", "runtime.serve.gateway", "--plan", str(plan), "--name", name]
    # a large model's prefill step runs for seconds, between heartbeats: as pqctl apply warns,
    # the heartbeat timeout must exceed the longest step
    argv += ["--endpoint", "tcp://127.0.0.1:*", "--beat-timeout", "120"]
    with open(state_dir / f"{name}-gateway.log", "wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=environ, cwd=ROOT
        )
    deadline = time.monotonic() + timeout_s
    try:
        served = Served(process, _state_when_saved(process, name, state_dir, deadline), state_dir)
        with Client(served.state.client_endpoint, timeout_s=60) as client:
            while client.info()["state"] != "serving":
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"deployment {name} did not start:\n{served.log()}")
                time.sleep(0.2)
    except BaseException:
        stop_gateway(process)
        raise
    return served


def _state_when_saved(
    process: subprocess.Popen[bytes], name: str, state_dir: Path, deadline: float
) -> DeploymentState:
    while process.poll() is None and time.monotonic() < deadline:
        try:
            return DeploymentState.load(name, state_dir)
        except DeploymentError:
            time.sleep(0.05)
    log = (state_dir / f"{name}-gateway.log").read_text(errors="replace")
    raise RuntimeError(f"gateway {name} wrote no state file:\n{log}")


class MetricsRecorder:
    """Every stage's metrics messages (one a second each) while ``recording`` is set.

    A thread owns the :class:`runtime.serve.monitor.Monitor` (its sockets never leave that thread).
    """

    def __init__(self, status_endpoint: str) -> None:
        self.status_endpoint = status_endpoint
        self.messages: list[dict[str, Any]] = []
        self.peak_rss: dict[int, int] = {}
        self.recording = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        monitor = Monitor(self.status_endpoint)
        seen: dict[int, float] = {}
        try:
            while not self._stop.is_set():
                monitor.poll(0.2)
                for stage, message in list(monitor.metrics.items()):
                    if seen.get(stage) == message.get("time"):
                        continue
                    seen[stage] = message.get("time", 0.0)
                    rss = int(message.get("rss_bytes") or 0)
                    self.peak_rss[stage] = max(self.peak_rss.get(stage, 0), rss)
                    if self.recording.is_set():
                        self.messages.append(message)
        finally:
            monitor.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass(frozen=True, slots=True)
class StageMeasured:
    """One stage's mean busy time per prefill and decode step during one run (ms), the steps
    counted, and memory (bytes)."""

    prefill_step_ms: float | None
    prefill_steps: int
    decode_step_ms: float | None
    decode_steps: int
    resident_bytes: int
    peak_rss_bytes: int


def stage_measured(
    recorder: MetricsRecorder, stage: int, span: tuple[float, float]
) -> StageMeasured:
    """Busy time per step of ``stage`` over the metrics windows that overlap ``span`` (wall
    clock, ``time.time()``): with the deployment idle between its runs, those windows hold the
    steps of that run and no others."""
    mine = [
        m
        for m in recorder.messages
        if m.get("stage") == stage and m["time"] - m["window_s"] < span[1] and m["time"] > span[0]
    ]

    def phase(name: str) -> tuple[float | None, int]:
        steps = sum(int(m[name]["steps"]) for m in mine)
        busy_ms = sum(
            float(m[name]["step_ms"]) * m[name]["steps"] for m in mine if m[name]["steps"]
        )
        return (busy_ms / steps if steps else None), steps

    prefill_ms, prefill_steps = phase("prefill")
    decode_ms, decode_steps = phase("decode")
    resident = max((int(m.get("resident_bytes") or 0) for m in recorder.messages), default=0)
    peak = recorder.peak_rss.get(stage, 0)
    return StageMeasured(prefill_ms, prefill_steps, decode_ms, decode_steps, resident, peak)


def hop_ms(shape: tuple[int, int, int], repeats: int = 200) -> float:
    """Median time of one data-path hop of a hidden-state frame (ms): ``encode_step``, PUSH,
    PULL over TCP loopback, ``decode_step``, as between two stages (fp32 [rows, tokens, hidden],
    what a CPU stage sends)."""
    rows = shape[0]
    header = StepHeader(0, 1, "decode", (0, rows), 64, (0,) * rows, ((0.0, 0, 1.0, 0, 0),) * rows)
    x = torch.randn(shape)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")
        times = []
        for _ in range(repeats + 20):
            start = time.perf_counter()
            push.send_multipart(encode_step(header, x), copy=False)
            _, y = decode_step(pull.recv_multipart(copy=False))
            times.append(1e3 * (time.perf_counter() - start))
            assert y is not None and y.shape == shape
        return statistics.median(times[20:])
    finally:
        for sock in (pull, push):
            sock.close(linger=0)
        ctx.term()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _err(measured: float | None, predicted: float) -> str:
    if measured is None or predicted <= 0:
        return "-"
    return f"{100 * (measured - predicted) / predicted:+.0f}%"


def print_throughput(result: dict[str, Any]) -> None:
    b, base = result["batch"], result["baselines"]
    print(
        f"\n{result['model']}: batch {b['size']}, prompts of {b['prompt_len']} tokens, "
        f"{b['new_tokens']} new tokens, greedy; best of the repeats"
    )
    for name in ("fp32", "bf16"):
        r = base[name]
        print(
            f"  transformers generate {name}: {r['tokens_per_s']:8.1f} tok/s  (prefill "
            f"{r['prefill_s']:.3f} s, decode {r['decode_ms_per_step']:.1f} ms/step; other "
            f"processes took {_shares(r['foreign_cpu'])} of the CPU)"
        )
    same = "bf16" if result["weights_16bit"] == "bfloat16" else "fp32"
    print(
        f"  16-bit weights in {result['weights_16bit']}: the like-for-like baseline is "
        f"transformers {same} (÷same); memory bandwidth probed around each run "
        f"(÷BW: that run's probes' mean, BW; ÷hi: the highest, {result['bandwidth_gb_s']:.1f} GB/s)"
    )
    for name in ("fp32", "bf16"):
        r = base[name]
        print(
            f"  transformers {name} decode: {r['decode_gb_s']:.1f} GB/s read, "
            f"{100 * r['decode_bandwidth_share']:.0f}% of its probes' "
            f"{r['bandwidth_probe_gb_s']:.1f} GB/s, "
            f"{100 * r['decode_bandwidth_share_of_highest']:.0f}% of the highest"
        )
    print(
        f"  {'pqctl case':<32} {'p/d mb':>6} {'tok/s':>8} {'÷fp32':>6} {'÷bf16':>6} "
        f"{'÷same':>6} {'target':>6} {'prefill s':>9} {'ms/step':>7} {'GB/s':>5} "
        f"{'BW':>4} {'÷BW':>4} {'÷hi':>4} {'ovh ms':>6}  waves  other CPU"
    )
    for c in result["cases"]:
        target = "-" if c["target_vs_fp32"] is None else f"≥{c['target_vs_fp32']:.1f}"
        mb = "/".join(map(str, c["micro_batches"]))
        print(
            f"  {c['case']:<32} {mb:>6} {c['tokens_per_s']:8.1f} {c['ratio_fp32']:6.2f} "
            f"{c['ratio_bf16']:6.2f} {c['ratio_same']:6.2f} {target:>6} "
            f"{c['first_token_s']:9.3f} {c['decode_ms_per_step']:7.1f} {c['decode_gb_s']:5.1f} "
            f"{c['bandwidth_probe_gb_s']:4.0f} {100 * c['decode_bandwidth_share']:3.0f}% "
            f"{100 * c['decode_bandwidth_share_of_highest']:3.0f}% "
            f"{_ms(c['overhead_ms_per_step']):>6}  "
            f"{','.join(map(str, c['waves'])):<5}  {_shares(c['foreign_cpu'])}"
        )


def _shares(values: list[float]) -> str:
    return ",".join(f"{100 * v:.0f}%" for v in values)


def print_stages(result: dict[str, Any]) -> None:
    print(
        "\n  per stage in the best run: busy ms per micro-batch step (measured / predicted /"
        " error); memory (peak RSS, tensors, predicted, MiB)"
    )
    print(
        f"  {'case':<32} {'st':>2} {'layers':>6} {'prefill ms':>20} {'decode ms':>20} "
        f"{'RSS':>6} {'tensors':>7} {'pred':>6}"
    )
    mib = 2**20
    for c in result["cases"]:
        for s in c["stage_stats"]:
            m = s["measured"]
            pre = (m["prefill_step_ms"], s["predicted_prefill_ms"])
            dec = (m["decode_step_ms"], s["predicted_decode_ms"])
            layers = f"{s['layers'][0]}-{s['layers'][1] - 1}"
            print(
                f"  {c['case']:<32} {s['stage']:>2} {layers:>6} "
                f"{_ms(pre[0]):>7} {pre[1]:6.1f} {_err(*pre):>5} "
                f"{_ms(dec[0]):>7} {dec[1]:6.1f} {_err(*dec):>5} "
                f"{m['peak_rss_bytes'] / mib:6.0f} {m['resident_bytes'] / mib:7.0f} "
                f"{s['predicted_memory_bytes'] / mib:6.0f}"
            )


def print_hops(result: dict[str, Any]) -> None:
    print("\n  one stage-to-stage hop (encode, PUSH/PULL on loopback, decode) vs stage 0's step")
    for h in result["hops"]:
        step = h["stage_step_ms"]
        share = "-" if not step else f"{100 * h['hop_ms'] / step:.1f}%"
        print(
            f"  {h['phase']:<8} fp32 {'×'.join(map(str, h['shape'])):<12} "
            f"{h['bytes'] / 1024:8.0f} KiB  {h['hop_ms']:7.3f} ms  step {_ms(step)} ms  "
            f"hop/step {share}"
        )
