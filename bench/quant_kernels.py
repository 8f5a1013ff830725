"""Speed and resident memory of one Llama-style decoder layer's linears per precision.

The layer (hidden 4096): q, k, v, o 4096×4096 and gate/up 4096→11008, down 11008→4096 (202 M
weights, stored in bf16 as a bf16 checkpoint holds them), built by
``runtime.quant.linear.quantize_linear`` at 16, 8, 4, 3 and 2 bits (group 128) on the CPU with fp32
activations; ``8t`` and ``4t`` are the same precisions on torch's own kernels instead of pqctl's
native ones (``impl="torch"``), so the two compare in one run. For each precision: the time of the
seven linears (attention and norms excluded) in decode (1, 4, 8 rows) and prefill (128, 512 rows),
the median of several repeats after a warm-up, the precisions taking turns within each repeat; shown
as a ratio to the 16-bit layer timed in the same run, with resident bytes against fp16 (2
bytes/weight) and against the 16-bit layer, and for precisions dequantized per call the
dequantization alone.

Numbers are only comparable within one run. The load average is printed at the start and end:
a busy CPU (another process training, say) inflates every row, multi-threaded kernels with many
small ops most (each op waits for a descheduled thread), so the dequant-per-call rows suffer
first.

``--quick`` is a smoke-size run: the same seven linears at hidden 1024 (FFN 2816), one thread
(a busy CPU stalls a second one), one timed call per point; its ratios say little about a 7B
layer.

Usage: python bench/quant_kernels.py [--quick] [--subset] [--repeats 3] [--threads N]
[--bits 16,8,8t,4,4t,3,2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.quant import (  # noqa: E402
    DenseLinear,
    Impl,
    QuantLinear,
    native,
    quantize_linear,
)

Layer = dict[str, QuantLinear | DenseLinear]

HIDDEN, FFN = 4096, 11008
QUICK_HIDDEN, QUICK_FFN = 1024, 2816
SUBSET = ("q", "gate", "down")


def layer_shapes(hidden: int, ffn: int, subset: bool) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) per linear of a layer of width ``hidden``; q, gate and down
    only with ``subset``."""
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden),
              "o": (hidden, hidden), "gate": (ffn, hidden), "up": (ffn, hidden),
              "down": (hidden, ffn)}  # fmt: skip
    return {name: shape for name, shape in shapes.items() if not subset or name in SUBSET}


DECODE_ROWS, PREFILL_ROWS = (1, 4, 8), (128, 512)
GROUP_SIZE = 128
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Result:
    """One precision's measurements: milliseconds per layer call by row count, and bytes."""

    label: str
    paths: str
    ms: dict[int, float]
    resident_bytes: int
    dequant_ms: float | None


def call_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call of ``fn``, milliseconds."""
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def build_layer(shapes: dict[str, tuple[int, int]], bits: int, impl: Impl = "auto") -> Layer:
    """The layer's linears at ``bits``, from seeded random bf16 weights (std 0.02)."""
    gen = torch.Generator().manual_seed(0)
    layer: Layer = {}
    for name, (out_features, in_features) in shapes.items():
        weight = (torch.randn(out_features, in_features, generator=gen) * 0.02).bfloat16()
        module = quantize_linear(
            weight, None, bits, GROUP_SIZE, compute_dtype=torch.float32, device=CPU, impl=impl
        )
        assert isinstance(module, QuantLinear | DenseLinear)
        layer[name] = module
    return layer


def run_layer(layer: Layer, inputs: dict[int, Tensor]) -> None:
    """Every linear once on its input (x [rows, in_features], fp32)."""
    for module in layer.values():
        module(inputs[module.in_features])


def interleaved_ms(layers: dict[str, Layer], rows: int, repeats: int) -> dict[str, float]:
    """Median milliseconds per layer call at ``rows`` rows for every precision.

    The precisions take turns within each repeat (after one warm-up call each), so a burst of
    load from another process lands on all of them rather than on one.
    """
    widths = {m.in_features for layer in layers.values() for m in layer.values()}
    inputs = {w: torch.randn(rows, w) for w in widths}
    times: dict[str, list[float]] = {label: [] for label in layers}
    for repeat in range(repeats + 1):
        for label, layer in layers.items():
            elapsed = call_ms(lambda: run_layer(layer, inputs))  # noqa: B023
            if repeat:
                times[label].append(elapsed)
    return {label: statistics.median(t) for label, t in times.items()}


def dequant_ms(layer: Layer, repeats: int) -> float | None:
    """Median time to dequantize every dequant-per-call linear of the layer once, ms."""
    chosen = [m for m in layer.values() if isinstance(m, QuantLinear)]
    chosen = [m for m in chosen if m.kernel_path == "dequant-per-call"]
    if not chosen:
        return None
    times = [call_ms(lambda: [m.dense_weight() for m in chosen]) for _ in range(repeats + 1)]
    return statistics.median(times[1:])


def measure(shapes: dict[str, tuple[int, int]], labels: list[str], repeats: int) -> list[Result]:
    """Build the layer at every precision in ``labels`` and time them, interleaved.

    A label is a bit width, the same followed by "t" for torch's kernels (``impl="torch"``), or
    "fp32": 16 bits computed in fp32 (``impl="reference"``).
    """
    layers = {label: build_layer(shapes, *_precision(label)) for label in labels}
    ms: dict[str, dict[int, float]] = {label: {} for label in labels}
    for rows in (*DECODE_ROWS, *PREFILL_ROWS):
        reps = repeats + 2 if rows in DECODE_ROWS else repeats
        for label, value in interleaved_ms(layers, rows, reps).items():
            ms[label][rows] = value
    results = []
    for label, layer in layers.items():
        paths = ",".join(sorted({m.kernel_path for m in layer.values()}))
        resident = sum(m.resident_bytes() for m in layer.values())
        results.append(Result(label, paths, ms[label], resident, dequant_ms(layer, repeats)))
    return results


def print_table(results: list[Result], shapes: dict[str, tuple[int, int]]) -> None:
    """Ratios to the 16-bit layer (first result) and resident memory."""
    base = results[0]
    weights = sum(o * i for o, i in shapes.values())
    rows = (*DECODE_ROWS, *PREFILL_ROWS)
    head = " ".join(f"{'x' + str(r):>7}" for r in rows)
    print(f"\n{'bits':>5} {'kernel path':<17} {head}  {'MiB':>7} {'/fp16':>6} {'/16-bit':>7}")
    for r in results:
        ratios = " ".join(f"{r.ms[n] / base.ms[n]:7.2f}" for n in rows)
        mib = r.resident_bytes / 2**20
        print(
            f"{r.label:>5} {r.paths:<17} {ratios}  {mib:7.1f} "
            f"{r.resident_bytes / (2 * weights):6.3f} {r.resident_bytes / base.resident_bytes:7.3f}"
        )
    print("\nmilliseconds per layer call (median):")
    print(f"{'bits':>5} " + " ".join(f"{'x' + str(n):>8}" for n in rows) + "  dequant")
    for r in results:
        deq = "-" if r.dequant_ms is None else f"{r.dequant_ms:.1f}"
        print(f"{r.label:>5} " + " ".join(f"{r.ms[n]:8.1f}" for n in rows) + f"  {deq}")
    first = DECODE_ROWS[0]
    decode = ", ".join(f"{_name(r.label)} {r.ms[first] / base.ms[first]:.2f}×" for r in results[1:])
    print(f"\ntime ÷ {_name(base.label)}, decode of {first} row: {decode}")


def print_dot_peak_shares(results: list[Result], shapes: dict[str, tuple[int, int]]) -> None:
    """Each precision's multiply-adds a second at the most decode rows ÷ what bf16 dot products
    sustain on registers alone, measured now on as many threads (where the CPU has them)."""
    kernels = native.kernels()
    if kernels is None or not kernels.bf16_dot:
        return
    threads = torch.get_num_threads()
    peak = kernels.dot_peak_per_s(threads)
    rows, weights = DECODE_ROWS[-1], sum(o * i for o, i in shapes.values())
    shares = ", ".join(
        f"{_name(r.label)} {100 * weights * rows / (r.ms[rows] / 1e3) / peak:.0f} %"
        for r in results
    )
    print(
        f"decode of {rows} rows, multiply-adds ÷ the bf16 dot-product peak "
        f"({peak / 1e9:.0f} G/s, vdpbf16ps on registers alone, {threads} threads): {shares}"
    )


def _precision(label: str) -> tuple[int, Impl]:
    """(bits, impl) of a label: "8" -> (8, "auto"), "8t" -> (8, "torch"), "fp32" -> (16,
    "reference")."""
    if label == "fp32":
        return 16, "reference"
    if label.endswith("t") and label[:-1].isdigit():
        return int(label[:-1]), "torch"
    if not label.isdigit():
        raise SystemExit(f"--bits: {label!r} is not a bit width, a bit width and 't', or 'fp32'")
    return int(label), "auto"


def _name(label: str) -> str:
    """A precision's label as words: "8-bit", "8-bit (torch)", "fp32"."""
    if label.endswith("t") and label[:-1].isdigit():
        return f"{label[:-1]}-bit (torch)"
    return f"{label}-bit" if label.isdigit() else label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-size run: hidden {QUICK_HIDDEN} (FFN {QUICK_FFN}), 1 repeat",
    )
    parser.add_argument("--subset", action="store_true", help="q, gate and down only")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per point (default 3; quick 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default all cores; quick 1)"
    )
    parser.add_argument(
        "--bits",
        default="16,8,8t,4,4t,3,2",
        help="precisions, the first is the baseline; a 't' suffix runs torch's kernels instead "
        "of pqctl's native ones; 'fp32' adds 16 bits held in fp32",
    )
    args = parser.parse_args()
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    torch.set_num_threads(threads)
    hidden, ffn = (QUICK_HIDDEN, QUICK_FFN) if args.quick else (HIDDEN, FFN)
    shapes = layer_shapes(hidden, ffn, args.subset)
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {threads} "
        f"threads, linears {list(shapes)}, group {GROUP_SIZE}, fp32 activations"
    )
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    with torch.inference_mode():
        results = measure(shapes, args.bits.split(","), repeats)
        print_table(results, shapes)
        print_dot_peak_shares(results, shapes)
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
