"""Calibration and perplexity evaluation for the CLI: text choice, the assignments the
perplexity mapping is fitted on, and the statistics file (see docs/quality.md).

``runtime`` does the torch work (:mod:`runtime.measure.calibration`,
:mod:`runtime.measure.evaluate`), ``planner`` the ω arithmetic and the mapping
(:mod:`planner.indicator`, :mod:`planner.quality_target`); this module joins them.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from planner.cost_model import default_group_size
from planner.indicator import indicator_from_stats, parse_stats, stats_indicator_name
from planner.model_spec import ModelSpec
from planner.plan import ALL_BITS
from planner.quality_target import PplMapping, PplPoint, default_stats_path, fit_ppl_mapping
from pqctl.plan_inputs import resolve_model
from runtime.errors import CheckpointError
from runtime.measure.calibration import collect_statistics
from runtime.measure.evaluate import (
    DEFAULT_MICRO_BATCH,
    TextPart,
    default_layers_per_pass,
    evaluate_perplexity,
    held_out_ids,
    text_token_ids,
)
from runtime.measure.passes import PassResult, token_windows
from runtime.model.arch import arch_from_config, read_config
from runtime.model.corpus import HELD_OUT
from runtime.model.source import resolve_checkpoint
from runtime.quant.kernels import dense_weight_dtype

Progress = Callable[[str, int, int], None]
"""``progress(what, done, total)``."""
UNIFORM_FIT_BITS = (8, 4, 3, 2)
"""Uniform assignments every calibration measures for the perplexity mapping."""


@dataclass(frozen=True)
class Text:
    """Token ids of the text to read and a description of it for reports."""

    ids: Tensor
    description: str


def resolve(model: str | None) -> tuple[ModelSpec, Path]:
    """The model's shape (as the planner sees it) and its checkpoint directory."""
    spec = resolve_model(model)
    return spec, resolve_checkpoint(spec.source)


def load_text(checkpoint: Path, text_file: Path | None, part: TextPart) -> Text:
    """A user's text file, or a part of the built-in held-out play (runtime.measure.evaluate)."""
    if text_file is not None:
        try:
            content = text_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"--text: cannot read {text_file} ({exc})") from exc
        return Text(text_token_ids(checkpoint, content), str(text_file))
    return Text(held_out_ids(checkpoint, part), f"held-out play {HELD_OUT}, {part} part")


def fit_assignments(num_layers: int, mixed: int, seed: int) -> list[tuple[int, ...]]:
    """Assignments the mapping is fitted on: uniform 8, 4, 3 and 2 bits, then ``mixed``
    seeded random ones (each layer's precision drawn uniformly from 16, 8, 4, 3, 2)."""
    rng = random.Random(seed)
    plans = [(b,) * num_layers for b in UNIFORM_FIT_BITS]
    while len(plans) < len(UNIFORM_FIT_BITS) + mixed:
        plan = tuple(rng.choice(ALL_BITS) for _ in range(num_layers))
        if len(set(plan)) > 1 and plan not in plans:
            plans.append(plan)
    return plans


@dataclass(frozen=True)
class CalibrateRequest:
    """What ``pqctl calibrate`` was asked (None: the default)."""

    model: str | None = None
    text_file: Path | None = None
    tokens: int | None = None
    seq_len: int = 128
    group_size: int | None = None
    output: Path | None = None
    layers_per_pass: int | None = None
    device: str = "cpu"
    mixed_plans: int = 4
    seed: int = 0


@dataclass(frozen=True)
class CalibrateOutcome:
    """The written statistics file and what calibration measured."""

    path: Path
    stats: dict[str, Any]
    mapping: PplMapping
    layers_per_pass: int


def calibrate(request: CalibrateRequest, progress: Progress | None = None) -> CalibrateOutcome:
    """Collect statistics, fit the perplexity mapping and write the statistics file.

    Raises:
        RuntimeFailure, PlannerError, ValueError: bad model, text or options.
    """
    spec, checkpoint = resolve(request.model)
    text = load_text(checkpoint, request.text_file, "calibration")
    group = request.group_size or default_group_size(spec)
    device = torch.device(request.device)
    per_pass = request.layers_per_pass or _layers_per_pass(checkpoint, device)
    windows = token_windows(text.ids, request.seq_len, DEFAULT_MICRO_BATCH, request.tokens)
    result = collect_statistics(
        checkpoint,
        windows,
        group_size=group,
        layers_per_pass=per_pass,
        device=device,
        progress=_stage(progress, "statistics"),
    )
    stats = result.stats | {"text": text.description}
    layer_stats = parse_stats(stats, "calibration", spec, group)
    indicator = indicator_from_stats(layer_stats, name=stats_indicator_name(layer_stats))

    def measure(bits: Sequence[int], what: str) -> PassResult:
        return evaluate_perplexity(
            checkpoint,
            text.ids,
            bits,
            seq_len=request.seq_len,
            max_tokens=request.tokens,
            group_size=group,
            layers_per_pass=per_pass,
            device=device,
            progress=_stage(progress, what),
        )

    baseline = result.baseline
    if not _reference_is_served(device):  # 16-bit serving rounds weights: measure it as served
        baseline = measure((16,) * spec.num_layers, "16-bit baseline")
    points = []
    plans = fit_assignments(spec.num_layers, request.mixed_plans, request.seed)
    for k, bits in enumerate(plans):
        ppl = measure(bits, f"mapping {k + 1}/{len(plans)}").perplexity
        points.append(PplPoint(bits, indicator.plan_omega(bits), ppl))
    mapping = fit_ppl_mapping(
        points,
        baseline.perplexity,
        indicator=indicator.name,
        text=text.description,
        tokens=windows.predicted_tokens,
        seq_len=request.seq_len,
    )
    stats["ppl_mapping"] = mapping.to_dict()
    path = request.output or default_stats_path(spec.source)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=1) + "\n", encoding="utf-8")
    return CalibrateOutcome(path, stats, mapping, per_pass)


def _reference_is_served(device: torch.device) -> bool:
    """Whether 16-bit serving layers compute exactly as calibration's fp32 reference layers."""
    return device.type == "cpu" and dense_weight_dtype(torch.float32, device) == torch.float32


def _layers_per_pass(checkpoint: Path, device: torch.device) -> int:
    arch = arch_from_config(read_config(checkpoint), str(checkpoint))
    return default_layers_per_pass(arch, device)


def _stage(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(what, done, total)


@dataclass(frozen=True)
class EvalRequest:
    """What ``pqctl eval`` was asked: per-layer bits, and the text."""

    checkpoint: Path
    layer_bits: tuple[int, ...]
    group_size: int
    text_file: Path | None = None
    part: TextPart = "evaluation"
    tokens: int | None = None
    seq_len: int = 128
    device: str = "cpu"
    layers_per_pass: int | None = None
    baseline: bool = False


@dataclass(frozen=True)
class EvalOutcome:
    """Measured perplexity (and the 16-bit one, when asked)."""

    text: str
    tokens: int
    perplexity: float
    baseline_perplexity: float | None

    @property
    def increase(self) -> float | None:
        """Relative perplexity increase over 16 bits."""
        if self.baseline_perplexity is None:
            return None
        return self.perplexity / self.baseline_perplexity - 1


def evaluate(request: EvalRequest, progress: Progress | None = None) -> EvalOutcome:
    """Perplexity of the text with the requested precisions (and at 16 bits if asked)."""
    text = load_text(request.checkpoint, request.text_file, request.part)

    def measure(bits: Sequence[int], what: str) -> PassResult:
        return evaluate_perplexity(
            request.checkpoint,
            text.ids,
            bits,
            seq_len=request.seq_len,
            max_tokens=request.tokens,
            group_size=request.group_size,
            layers_per_pass=request.layers_per_pass,
            device=request.device,
            progress=_stage(progress, what),
        )

    result = measure(request.layer_bits, "perplexity")
    baseline = None
    if request.baseline:
        sixteen = (16,) * len(request.layer_bits)
        baseline = result if request.layer_bits == sixteen else measure(sixteen, "16-bit")
    return EvalOutcome(
        text.description,
        result.tokens,
        result.perplexity,
        None if baseline is None else baseline.perplexity,
    )
