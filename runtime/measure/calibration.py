"""Calibration statistics of the variance quality indicator, collected a layer range at a time.

The model runs unquantized (fp32 reference layers) over calibration text, one range of decoder
layers at a time (:mod:`runtime.measure.passes`), with a hook on the input of every linear operator.
Per operator it gathers what ``planner.indicator`` turns into ω[layer, bits]:

- ``input_sq_mean``: E[x²] of the operator's input over calibration tokens and input features;
- ``group_range_sq_mean``: mean over (row, group of ``group_size`` inputs) of the weights'
  (max − min)², the grouping of the 2/3/4-bit quantizer;
- ``row_absmax_sq_mean``: mean over rows of max|w|², the 8-bit quantizer's per-row scale;
- ``output_error_sq`` (format version 2): for each of 8/4/3/2 bits, the measured mean square
  output error E[((W − Ŵ_b) x)_k²] over calibration tokens and outputs k, where Ŵ_b is the
  weight the runtime's own quantizer (``runtime.quant.packing.quantize_rtn``) serves at b bits. It
  is computed from the input's second-moment matrix H = E[x xᵀ] as tr(ΔW H ΔWᵀ) / out, so it
  needs ``in_features²`` floats per operator of the range while the range is loaded.

The result is the statistics file's data (the format is documented in ``planner.indicator``
and docs/quality.md); ``pqctl calibrate`` adds the fitted perplexity mapping and writes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from runtime.measure.passes import (
    PassResult,
    ProgressFn,
    TokenWindows,
    run_in_passes,
    token_windows,
)
from runtime.model.arch import ArchConfig, arch_from_config, read_config
from runtime.model.shard import StageShard, linear_shapes
from runtime.quant.kernels import choose_kernel_path, scale_dtype_for
from runtime.quant.packing import dequantize, quantize_rtn

STATS_FORMAT = "pqctl-activation-stats"
STATS_VERSION = 2
QUANTIZED_BITS = (8, 4, 3, 2)
OP_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "fc1": "fc1",
    "fc2": "fc2",
}
"""Runtime short name of a linear operator → its name in the statistics file (the planner's)."""


@dataclass
class _OpAccumulator:
    """Running sums over the calibration tokens of one operator's input x [tokens, in]."""

    sq_sum: float = 0.0
    tokens: int = 0
    second_moment: Tensor | None = None  # Σ x xᵀ [in, in], fp64 on the layer's device

    def add(self, x: Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()  # [tokens, in]
        self.sq_sum += float(x2.square().sum(dtype=torch.float64))
        self.tokens += x2.shape[0]
        gram = (x2.t() @ x2).double()
        self.second_moment = gram if self.second_moment is None else self.second_moment + gram


@dataclass(frozen=True)
class CalibrationResult:
    """The statistics file's data and the unquantized model's score on the calibration text."""

    stats: dict[str, Any]
    baseline: PassResult


def _linear(layer: nn.Module, short: str) -> nn.Module:
    """The module of operator ``short`` in a runtime decoder layer."""
    if short in ("q", "k", "v", "o"):
        module: nn.Module = getattr(layer.attn, f"{short}_proj")
        return module
    mlp: nn.ModuleDict = layer.mlp  # type: ignore[assignment]
    return mlp[short]


def weight_statistics(weight: Tensor, group_size: int) -> tuple[float, float]:
    """(mean over rows and groups of (max - min)², mean over rows of max|w|²) of ``weight``
    [out, in], groups of ``group_size`` consecutive inputs (the last one possibly shorter)."""
    w = weight.double()
    ranges = [
        (block.amax(dim=1) - block.amin(dim=1)).square()
        for block in torch.split(w, group_size, dim=1)  # [out, <= group_size] each
    ]
    group_range_sq = float(torch.stack(ranges, dim=1).mean())
    row_absmax_sq = float(w.abs().amax(dim=1).square().mean())
    return group_range_sq, row_absmax_sq


def output_error_sq(
    weight: Tensor, second_moment: Tensor, tokens: int, bits: int, group_size: int
) -> float:
    """Mean square output error E[((W − Ŵ) x)_k²] of ``weight`` [out, in] quantized to
    ``bits`` by the runtime's quantizer, from Σ x xᵀ [in, in] over ``tokens`` inputs."""
    out_features, in_features = weight.shape
    path = choose_kernel_path(bits, in_features, out_features, group_size, weight.device)
    quantized = quantize_rtn(weight, bits, group_size, scale_dtype_for(path))
    delta = weight.double() - dequantize(quantized, torch.float32).double()  # [out, in]
    total = float(((delta @ second_moment) * delta).sum())
    return max(total, 0.0) / (tokens * out_features)


def _op_entry(
    module: nn.Module, acc: _OpAccumulator, group_size: int, measure: bool
) -> dict[str, Any]:
    weight = module.dequantized_weight()  # type: ignore[operator]
    group_range_sq, row_absmax_sq = weight_statistics(weight, group_size)
    entry: dict[str, Any] = {
        "in_features": int(weight.shape[1]),
        "input_sq_mean": acc.sq_sum / (acc.tokens * weight.shape[1]),
        "group_range_sq_mean": group_range_sq,
        "row_absmax_sq_mean": row_absmax_sq,
    }
    if measure and acc.second_moment is not None:
        entry["output_error_sq"] = {
            str(b): output_error_sq(weight, acc.second_moment, acc.tokens, b, group_size)
            for b in QUANTIZED_BITS
        }
    return entry


def _collector(
    arch: ArchConfig, layers: list[dict[str, Any]], group_size: int, measure: bool
) -> Callable[[StageShard], Callable[[], None]]:
    """A :data:`runtime.measure.passes.ShardHook` that fills ``layers[i]`` for every layer i a range
    holds, once every window went through the range."""

    def attach(shard: StageShard) -> Callable[[], None]:
        start = shard.spec.layer_range[0]
        handles, accs = [], {}
        for local, layer in enumerate(shard.layers):
            for short in linear_shapes(arch):
                acc = accs[(local, short)] = _OpAccumulator()
                module = _linear(layer, short)
                handles.append(
                    module.register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0]))
                )

        def finish() -> None:
            for handle in handles:
                handle.remove()
            for local, layer in enumerate(shard.layers):
                layers[start + local] = {
                    OP_NAMES[short]: _op_entry(
                        _linear(layer, short), accs[(local, short)], group_size, measure
                    )
                    for short in linear_shapes(arch)
                }
                for short in linear_shapes(arch):  # free H before the next range loads
                    accs[(local, short)].second_moment = None

        return finish

    return attach


def collect_statistics(
    checkpoint_dir: Path,
    windows: TokenWindows,
    *,
    group_size: int,
    layers_per_pass: int,
    device: str | torch.device = "cpu",
    measure_output_error: bool = True,
    progress: ProgressFn | None = None,
) -> CalibrationResult:
    """Calibration statistics of every linear operator over ``windows``.

    Args:
        checkpoint_dir: the Hugging Face checkpoint.
        windows: calibration token windows (:func:`runtime.measure.passes.token_windows`).
        group_size: the quantizer's group size the statistics are for.
        layers_per_pass: decoder layers loaded together.
        device: where the layers run (fp32, unquantized).
        measure_output_error: also measure each operator's output error per precision.
        progress: ``progress(done, total)`` per micro-batch and layer range.

    Raises:
        CheckpointError, StageMemoryError: as :func:`runtime.model.shard.load_shard`.
    """
    arch = arch_from_config(read_config(checkpoint_dir), str(checkpoint_dir))
    layers: list[dict[str, Any]] = [{} for _ in range(arch.num_layers)]
    baseline = run_in_passes(
        checkpoint_dir,
        arch,
        windows,
        (16,) * arch.num_layers,
        layers_per_pass=layers_per_pass,
        group_size=group_size,
        dtype=torch.float32,
        device=device,
        impl="reference",
        hook=_collector(arch, layers, group_size, measure_output_error),
        progress=progress,
    )
    stats = {
        "format": STATS_FORMAT,
        "version": STATS_VERSION,
        "group_size": group_size,
        "tokens": windows.predicted_tokens,
        "seq_len": windows.seq_len,
        "model": {
            "family": arch.family,
            "num_layers": arch.num_layers,
            "hidden_size": arch.hidden_size,
        },
        "layers": layers,
    }
    return CalibrationResult(stats, baseline)


def calibration_windows(
    token_ids: Tensor, seq_len: int, micro_batch: int, max_tokens: int | None
) -> TokenWindows:
    """The windows calibration reads (:func:`runtime.measure.passes.token_windows`)."""
    return token_windows(token_ids, seq_len, micro_batch, max_tokens)


def layer_ops(arch: ArchConfig) -> Sequence[str]:
    """Operator names of one layer as the statistics file spells them."""
    return [OP_NAMES[short] for short in linear_shapes(arch)]
