"""Quality indicator ω[layer, bits]: how much quantizing a layer to ``bits`` hurts the model.

Variance indicator (Theorem 1 of LLM-PQ): quantizing a weight matrix W (D_out × D_in) by
round-to-nearest with step Δ leaves independent, zero-mean errors of variance Δ²/12 per weight,
so each output of y = W x gets an error of variance (Δ²/12) · Σ_l E[x_l²] = D_in · E[x²] · Δ²/12.
Errors of different operators and layers add (Proposition 1), so a layer's ω is the sum over
its linear operators and a plan's quality penalty is Σ_i ω[i, b_i], linear in the choice.

Per operator and precision, from calibration statistics:
    2/3/4 bits (groups of ``group_size`` inputs, asymmetric):  Δ² = E[range²] / (2^b - 1)²
    8 bits (one symmetric scale per output row):               Δ² = E[absmax²] / 127²
    16 bits:                                                   ω = 0

Normalisation: ω is divided by the all-2-bit total, so every layer at 16 bits scores 0 and
every layer at 2 bits scores 1; a quality budget q in [0, 1] bounds Σ ω.

Statistics file (JSON, written by ``pqctl calibrate``)::

    {"format": "pqctl-activation-stats", "version": 1, "group_size": 128, "tokens": 65536,
     "model": {"family": "llama", "num_layers": 8, "hidden_size": 192},
     "layers": [{"q_proj": {"in_features": 192, "input_sq_mean": 0.98,
                            "group_range_sq_mean": 0.031, "row_absmax_sq_mean": 0.012}, ...},
                ...]}

``input_sq_mean`` is E[x²] over calibration tokens and input features; ``group_range_sq_mean``
the mean over groups of (max - min)² of the weights; ``row_absmax_sq_mean`` the mean over output
rows of max|w|².

Version 2 (what ``pqctl calibrate`` writes; version-1 files still load) adds, optionally:

- per operator, ``"output_error_sq": {"8": ..., "4": ..., "3": ..., "2": ...}``: the output
  error variance of Theorem 1 measured rather than modelled, E[((W − Ŵ_b) x)²] over calibration
  tokens and outputs with Ŵ_b the runtime quantizer's weight (``runtime.measure.calibration``). When
  every operator has it, ω uses it (indicator "measured"); otherwise the formula above
  ("variance");
- ``seq_len`` and ``text``: how the statistics were collected;
- ``ppl_mapping``: the calibrated relation between Σω and perplexity increase
  (``planner.quality_target``).

Prior (no statistics): inputs of unit second moment (they leave a norm) and Gaussian weights of
variance 1/D_in, whose expected group range is 2·sqrt(2·ln g)/sqrt(D_in) and row maximum
sqrt(2·ln D_in)/sqrt(D_in). Every layer then scores the same; the plan records which indicator
it used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planner.errors import ProfileError
from planner.json_file import read_json
from planner.model_spec import LinearOp, ModelSpec
from planner.plan import ALL_BITS

STATS_FORMAT = "pqctl-activation-stats"
STATS_VERSION = 2
READABLE_VERSIONS = (1, 2)
MEASURED_BITS = (8, 4, 3, 2)
LOWEST_BITS = 2
BITS_COLUMN = {bits: k for k, bits in enumerate(ALL_BITS)}
"""Column of each precision in an ω table."""


@dataclass(frozen=True, slots=True)
class OpStats:
    """Calibration statistics of one linear operator (see the module docstring)."""

    in_features: int
    input_sq_mean: float
    group_range_sq_mean: float
    row_absmax_sq_mean: float
    output_error_sq: Mapping[int, float] | None = None
    """Measured output error variance per precision (8, 4, 3, 2), when calibrated so."""


def quantization_step_sq(stats: OpStats, bits: int) -> float:
    """Expected squared quantization step Δ² of the operator at ``bits``."""
    if bits == 16:
        return 0.0
    if bits == 8:
        return stats.row_absmax_sq_mean / 127**2
    return stats.group_range_sq_mean / float(2**bits - 1) ** 2


def op_omega(stats: OpStats, bits: int) -> float:
    """Output error variance of one operator quantized to ``bits``: measured when the
    statistics hold it, else Theorem 1's D_in · E[x²] · Δ²/12."""
    if bits == 16:
        return 0.0
    if stats.output_error_sq is not None:
        return stats.output_error_sq[bits]
    return stats.in_features * stats.input_sq_mean * quantization_step_sq(stats, bits) / 12


def prior_op_stats(op: LinearOp, group_size: int) -> OpStats:
    """Statistics assumed without calibration: unit inputs, Gaussian weights of var 1/D_in."""
    group = min(group_size, op.in_features)
    return OpStats(
        in_features=op.in_features,
        input_sq_mean=1.0,
        group_range_sq_mean=8 * math.log(max(group, 2)) / op.in_features,
        row_absmax_sq_mean=2 * math.log(max(op.in_features, 2)) / op.in_features,
    )


@dataclass(frozen=True)
class QualityIndicator:
    """Normalised ω table: ``omega[i, BITS_COLUMN[b]]`` for layer i at b bits."""

    name: str
    omega: np.ndarray

    @property
    def num_layers(self) -> int:
        """Layers the table covers."""
        return int(self.omega.shape[0])

    @property
    def layers_alike(self) -> bool:
        """Every layer scores the same (the planner may then count layers per precision)."""
        return bool(np.allclose(self.omega, self.omega[0], rtol=1e-12, atol=0.0))

    def layer_omega(self, layer: int, bits: int) -> float:
        """ω of one layer at ``bits``."""
        return float(self.omega[layer, BITS_COLUMN[bits]])

    def plan_omega(self, layer_bits: Sequence[int]) -> float:
        """Σ ω of a per-layer precision assignment."""
        return float(sum(self.layer_omega(i, b) for i, b in enumerate(layer_bits)))


def indicator_from_stats(
    layer_stats: Sequence[Sequence[OpStats]], name: str = "variance"
) -> QualityIndicator:
    """Build the normalised indicator from per-layer, per-operator statistics."""
    raw = np.array(
        [[sum(op_omega(s, bits) for s in ops) for bits in ALL_BITS] for ops in layer_stats],
        dtype=float,
    )
    total_lowest = raw[:, BITS_COLUMN[LOWEST_BITS]].sum()
    if total_lowest <= 0:
        raise ProfileError("quality statistics give no error even at 2 bits; recalibrate")
    return QualityIndicator(name, raw / total_lowest)


def prior_indicator(model: ModelSpec, group_size: int) -> QualityIndicator:
    """The documented prior (module docstring): every layer alike."""
    layer = [prior_op_stats(op, group_size) for op in model.layer_linears()]
    return indicator_from_stats([layer] * model.num_layers, name="prior")


def load_stats_indicator(
    path: str | Path, model: ModelSpec, group_size: int | None = None
) -> QualityIndicator:
    """Read a statistics file for ``model`` (collected at ``group_size``, when given);
    raises ProfileError naming file and field."""
    data = read_json(path)
    layer_stats = parse_stats(data, str(path), model, group_size)
    return indicator_from_stats(layer_stats, name=stats_indicator_name(layer_stats))


def stats_indicator_name(layer_stats: Sequence[Sequence[OpStats]]) -> str:
    """ "measured" when every operator has measured output errors, else "variance"."""
    measured = all(s.output_error_sq is not None for ops in layer_stats for s in ops)
    return "measured" if measured else "variance"


def parse_stats(
    data: Any, source: str, model: ModelSpec, group_size: int | None = None
) -> list[list[OpStats]]:
    """Validate statistics data against ``model`` (and the planned ``group_size``, when
    given): one entry per layer and operator."""
    if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
        raise ProfileError(f'{source}: format: expected "{STATS_FORMAT}"')
    if data.get("version") not in READABLE_VERSIONS:
        versions = " or ".join(map(str, READABLE_VERSIONS))
        raise ProfileError(f"{source}: version: expected {versions}")
    found = data.get("group_size")
    if isinstance(found, bool) or not isinstance(found, int) or found <= 0:
        raise ProfileError(f"{source}: group_size: expected a positive integer")
    if group_size is not None and found != group_size:
        raise ProfileError(
            f"{source}: group_size: statistics were collected for groups of {found}; plan with "
            f"--group-size {found} or recalibrate"
        )
    layers = data.get("layers")
    if not isinstance(layers, list) or len(layers) != model.num_layers:
        count = len(layers) if isinstance(layers, list) else "no"
        raise ProfileError(
            f"{source}: layers: {count} layers of statistics for a model with "
            f"{model.num_layers} layers"
        )
    ops = model.layer_linears()
    return [
        [_parse_op(layer, op, f"{source}: layers[{i}].{op.name}") for op in ops]
        for i, layer in enumerate(layers)
    ]


def _parse_op(layer: Any, op: LinearOp, where: str) -> OpStats:
    raw = layer.get(op.name) if isinstance(layer, Mapping) else None
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{where}: missing")
    if raw.get("in_features") != op.in_features:
        raise ProfileError(f"{where}.in_features: expected {op.in_features} for this model")
    values: dict[str, float] = {}
    for name in ("input_sq_mean", "group_range_sq_mean", "row_absmax_sq_mean"):
        value = raw.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ProfileError(f"{where}.{name}: expected a non-negative number")
        values[name] = float(value)
    measured = _parse_measured(raw.get("output_error_sq"), f"{where}.output_error_sq")
    return OpStats(in_features=op.in_features, output_error_sq=measured, **values)


def _parse_measured(raw: Any, where: str) -> dict[int, float] | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{where}: expected an object of precision → error")
    out: dict[int, float] = {}
    for bits in MEASURED_BITS:
        value = raw.get(str(bits))
        if isinstance(value, bool) or not isinstance(value, int | float):
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise ProfileError(f'{where}."{bits}": expected a non-negative number')
        out[bits] = float(value)
    return out
