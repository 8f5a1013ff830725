"""Quality targets in perplexity: the calibrated mapping between Σω and perplexity increase, and
where calibration statistics files live.

Mapping. ``pqctl calibrate`` measures the perplexity of the calibration text for a handful of
precision assignments (uniform 8, 4, 3 and 2 bits and a few seeded mixed ones) through the
runtime's quantized layers, beside the 16-bit perplexity ppl₁₆. To first order the loss
increase is quadratic in the weight perturbation, so linear in the error variance that ω sums
(Theorem 1, Proposition 1); the mapping is therefore a line through the origin in log space::

    ln(ppl / ppl₁₆) = a · Σω        (relative increase r = exp(a · Σω) − 1)

with ``a`` the largest ratio ln(ppl/ppl₁₆)/Σω among the measured assignments with
Σω ≥ :data:`MIN_FIT_OMEGA` (below it the measured increase is mostly noise). The line so bounds
every measured assignment from above: a target r becomes the ω budget ln(1 + r) / a, which is
conservative for assignments like the measured ones. ``fit_slope`` (the least-squares slope
through the origin, all points) is recorded beside it for comparison.

Statistics file extension (format version 2; version-1 files load as before, without a
mapping)::

    "ppl_mapping": {"form": "log-linear-upper", "slope": 0.19, "fit_slope": 0.09,
                    "indicator": "measured", "baseline_perplexity": 61.2,
                    "text": "held-out play hamlet, calibration part", "tokens": 16384,
                    "seq_len": 128,
                    "points": [{"layer_bits": [4, 4, ...], "omega": 0.04, "perplexity": 61.3}, ...]}

Locations. ``pqctl calibrate`` writes ``<stats dir>/<model key>.json`` by default, where the
stats dir is ``$PQCTL_STATS_DIR`` or ``~/.cache/pqctl/stats`` and the key is
:func:`stats_key` of the model's source; ``pqctl plan`` reads that file when no ``--stats`` is
given.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.errors import ProfileError
from planner.indicator import (
    QualityIndicator,
    indicator_from_stats,
    parse_stats,
    stats_indicator_name,
)
from planner.json_file import read_json
from planner.model_spec import ModelSpec
from planner.plan import ALL_BITS

MAPPING_FORM = "log-linear-upper"
MIN_FIT_OMEGA = 0.02
"""Smallest Σω of a measured assignment that bounds the mapping's slope."""


@dataclass(frozen=True, slots=True)
class PplPoint:
    """One measured assignment: per-layer bits, its Σω and its perplexity."""

    layer_bits: tuple[int, ...]
    omega: float
    perplexity: float


@dataclass(frozen=True, slots=True)
class PplMapping:
    """ln(ppl / ppl₁₆) = slope · Σω (module docstring).

    Attributes:
        slope: a, the upper-bound slope used for budgets.
        fit_slope: least-squares slope through the origin over every point.
        indicator: name of the ω table the points were scored with.
        baseline_perplexity: ppl₁₆ of the calibration text.
        points: the measured assignments.
        text: what the perplexities were measured on.
        tokens: predicted tokens of that text.
        seq_len: tokens per window.
    """

    slope: float
    fit_slope: float
    indicator: str
    baseline_perplexity: float
    points: tuple[PplPoint, ...]
    text: str
    tokens: int
    seq_len: int

    def omega_budget(self, max_increase: float) -> float:
        """Largest Σω whose predicted relative perplexity increase is ``max_increase``."""
        return math.log1p(max_increase) / self.slope

    def predicted_increase(self, omega: float) -> float:
        """Predicted relative perplexity increase of an assignment with Σω = ``omega``."""
        return math.expm1(self.slope * omega)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready data (the ``ppl_mapping`` section)."""
        return {
            "form": MAPPING_FORM,
            "slope": self.slope,
            "fit_slope": self.fit_slope,
            "indicator": self.indicator,
            "baseline_perplexity": self.baseline_perplexity,
            "text": self.text,
            "tokens": self.tokens,
            "seq_len": self.seq_len,
            "points": [
                {"layer_bits": list(p.layer_bits), "omega": p.omega, "perplexity": p.perplexity}
                for p in self.points
            ],
        }


def fit_ppl_mapping(
    points: Sequence[PplPoint],
    baseline_perplexity: float,
    *,
    indicator: str,
    text: str,
    tokens: int,
    seq_len: int,
) -> PplMapping:
    """Fit the mapping (module docstring) to measured assignments.

    Raises:
        ProfileError: no assignment with Σω ≥ MIN_FIT_OMEGA raised the perplexity.
    """
    logs = [(p.omega, math.log(p.perplexity / baseline_perplexity)) for p in points]
    bounding = [y / x for x, y in logs if x >= MIN_FIT_OMEGA]
    slope = max(bounding, default=0.0)
    if not slope > 0:
        raise ProfileError(
            "calibration: no measured assignment raised the perplexity; calibrate with more "
            "text (--tokens) or check that the model is trained"
        )
    squares = sum(x * x for x, _ in logs)
    fit = sum(x * y for x, y in logs) / squares if squares > 0 else slope
    return PplMapping(
        slope, fit, indicator, baseline_perplexity, tuple(points), text, tokens, seq_len
    )


def parse_mapping(data: Any, source: str) -> PplMapping:
    """The ``ppl_mapping`` section of a statistics file; raises ProfileError naming the field."""
    where = f"{source}: ppl_mapping"
    if not isinstance(data, Mapping) or data.get("form") != MAPPING_FORM:
        raise ProfileError(f'{where}.form: expected "{MAPPING_FORM}"')
    numbers = {}
    for key in ("slope", "fit_slope", "baseline_perplexity"):
        value = data.get(key)
        number = math.nan
        if not isinstance(value, bool) and isinstance(value, int | float):
            number = float(value)
        if not math.isfinite(number) or (key != "fit_slope" and not number > 0):
            raise ProfileError(f"{where}.{key}: expected a positive number")
        numbers[key] = number
    points = []
    for k, raw in enumerate(data.get("points") or []):
        bits = raw.get("layer_bits") if isinstance(raw, Mapping) else None
        if not isinstance(bits, list) or any(b not in ALL_BITS for b in bits):
            raise ProfileError(f"{where}.points[{k}].layer_bits: expected a list of precisions")
        points.append(PplPoint(tuple(bits), float(raw["omega"]), float(raw["perplexity"])))
    return PplMapping(
        slope=numbers["slope"],
        fit_slope=numbers["fit_slope"],
        indicator=str(data.get("indicator", "")),
        baseline_perplexity=numbers["baseline_perplexity"],
        points=tuple(points),
        text=str(data.get("text", "")),
        tokens=int(data.get("tokens", 0)),
        seq_len=int(data.get("seq_len", 0)),
    )


_INCREASE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%?)\s*$")


def parse_ppl_increase(text: str) -> float:
    """A relative perplexity increase from "2%" or "0.02" (both 0.02).

    Raises:
        ValueError: not a number or percentage, or not in (0, 10] (1000 %).
    """
    match = _INCREASE.match(text)
    if match is None:
        raise ValueError(f'"{text}" is not a fraction (0.02) or a percentage (2%)')
    value = float(match.group(1)) / (100 if match.group(2) else 1)
    if not 0 < value <= 10:
        raise ValueError(f'"{text}" is outside (0, 1000 %]')
    return value


def default_stats_dir() -> Path:
    """``$PQCTL_STATS_DIR``, else ``~/.cache/pqctl/stats``."""
    configured = os.environ.get("PQCTL_STATS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "pqctl" / "stats"


def stats_key(source: str) -> str:
    """File stem of a model's statistics: a hub id or name as it is (``/`` → ``--``), a local
    directory as its name plus a hash of its absolute path (two checkouts never collide)."""
    path = Path(source).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if path.is_dir():
        absolute = str(path.resolve())
        digest = hashlib.sha256(absolute.encode()).hexdigest()[:10]
        return f"{_safe(path.resolve().name)}-{digest}"
    return _safe(source.replace("/", "--"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def default_stats_path(source: str) -> Path:
    """Where ``pqctl calibrate`` writes, and ``pqctl plan`` looks for, a model's statistics."""
    return default_stats_dir() / f"{stats_key(source)}.json"


@dataclass(frozen=True)
class Calibration:
    """A statistics file read for one model: its ω table and, when calibrated, its mapping."""

    path: Path
    indicator: QualityIndicator
    mapping: PplMapping | None
    group_size: int


def load_calibration(
    path: str | Path, model: ModelSpec, group_size: int | None = None
) -> Calibration:
    """Read a statistics file for ``model`` (collected at ``group_size``, when given).

    Raises:
        ProfileError: unreadable, malformed or made for another model, naming file and field.
    """
    data = read_json(path)
    layer_stats = parse_stats(data, str(path), model, group_size)
    indicator = indicator_from_stats(layer_stats, name=stats_indicator_name(layer_stats))
    mapping = None
    if data.get("ppl_mapping") is not None:
        mapping = parse_mapping(data["ppl_mapping"], str(path))
        if mapping.indicator != indicator.name:
            raise ProfileError(
                f"{path}: ppl_mapping.indicator: fitted with the {mapping.indicator} indicator "
                f"but the statistics give the {indicator.name} one; recalibrate"
            )
    return Calibration(Path(path), indicator, mapping, int(data["group_size"]))
