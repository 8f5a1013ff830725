"""Measured per-layer latency profiles: the file format, loading, saving and regression fits.

A profile holds latency samples of one decoder layer of one model shape on one device type,
for each precision and phase, and the precisions whose kernels failed or are absent there.
This module is the planner's only file I/O besides the cluster, model and statistics files.

File format (JSON, ``*.json`` in the profile directory)::

    {
      "format": "pqctl-latency-profile",
      "version": 1,
      "device_type": "T4",
      "model_shape": {"family": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                      "num_heads": 32, "num_kv_heads": 8, "head_dim": 128},
      "unavailable_bits": [2, 3],
      "samples": [
        {"phase": "prefill", "bits": 16, "micro_batch": 2, "context_len": 512, "latency_s": 0.0161},
        {"phase": "decode",  "bits": 16, "micro_batch": 8, "context_len": 562, "latency_s": 0.0031}
      ]
    }

``context_len`` is the prompt length for prefill samples and the attended context (past + 1)
for decode samples. Per (phase, bits) the samples are fitted with the regression forms of
LLM-PQ's cost model (b = micro-batch, s = prompt length, p = context)::

    prefill:  t = a1*b + a2*s + a3*b*s + a4*b*s^2 + c
    decode:   t = b1*b*(1 + p) + b2*b + b3*p + c

and, at each measured micro-batch size, against the context alone; within the measured range
a prediction interpolates between the two nearest measured sizes (:class:`PhaseFit`).

Optional sections (written by ``pqctl profile``; files without them load as before)::

    "end_samples": [{"part": "stage", "phase": "decode", "micro_batch": 4,
                     "context_len": 192, "latency_s": 0.00021}, ...],
    "transfer": {"samples": [{"bytes": 65536, "latency_s": 0.00009}, ...]},
    "fit_error": [{"phase": "prefill", "bits": 16, "held_out_mape": 0.031, "samples": 9}, ...],
    "measured": {...}

``end_samples`` time the per-stage parts outside the decoder layers: ``stage`` (building a
micro-batch's step context, once per stage), ``embedding`` (first stage) and ``head`` (final
norm and LM head, last stage); each (part, phase) is fitted with the phase's form.
``transfer`` times one activation frame over a ZeroMQ hop between two processes of the host,
fitted as t = latency_s + bytes / (bandwidth_gb_s * 1e9). ``fit_error`` (held-out mean absolute
percentage error of each fit when it was measured) and ``measured`` (torch version, threads,
kernel paths, grid) are kept for people and round-tripped unread.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from planner.errors import ProfileError
from planner.json_file import read_json
from planner.model_spec import ModelSpec

PROFILE_FORMAT = "pqctl-latency-profile"
PROFILE_VERSION = 1
_PHASES = ("prefill", "decode")
_MIN_SAMPLES = {"prefill": 5, "decode": 4}
_NOTE_SECTIONS = ("fit_error", "measured")
END_PARTS = ("stage", "embedding", "head")
"""Per-stage parts outside the decoder layers a profile may time."""


@dataclass(frozen=True, slots=True)
class ShapeKey:
    """The part of a model's shape that decides one layer's latency."""

    family: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class LatencySample:
    """One measurement: one decoder layer, seconds."""

    phase: str
    bits: int
    micro_batch: int
    context_len: int
    latency_s: float


def shape_key(model: ModelSpec) -> ShapeKey:
    """The latency-relevant shape of ``model``."""
    return ShapeKey(
        family=model.family,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
    )


def _features(phase: str, micro_batch: float, context: float) -> list[float]:
    b, p = micro_batch, context
    if phase == "prefill":
        return [b, p, b * p, b * p * p, 1.0]
    return [b * (1 + p), b, p, 1.0]


@dataclass(frozen=True, slots=True)
class BatchFit:
    """Latency against context length at one measured micro-batch size: a polynomial,
    ``coefficients`` from the constant up."""

    coefficients: tuple[float, ...]

    def at(self, context: int) -> float:
        """The polynomial at ``context``, seconds."""
        return float(sum(c * context**k for k, c in enumerate(self.coefficients)))


@dataclass(frozen=True, slots=True)
class PhaseFit:
    """One (phase, bits) regression: the phase's form over every sample (``coefficients``)
    and a fit against context at each measured micro-batch size (``by_batch``).

    Inside the measured range (micro-batch between two measured sizes, context within the
    samples' ``contexts``) a prediction interpolates linearly in the micro-batch between the two
    sizes' fits: kernels are not linear in the micro-batch (a CPU's one-row GEMV is much
    cheaper per row than a two-row GEMM), so the form, linear in it, misses measured sizes by
    up to ~20 %. Outside it the form extrapolates. Predictions never fall below ``floor_s``
    (half the fastest sample), so an extrapolation cannot go negative.
    """

    phase: str
    coefficients: tuple[float, ...]
    floor_s: float
    by_batch: Mapping[int, BatchFit] = field(default_factory=dict)
    contexts: tuple[int, int] = (0, 0)

    def predict_s(self, micro_batch: int, context: int) -> float:
        """Predicted layer latency, seconds."""
        value = self._interpolated_s(micro_batch, context)
        if value is None:
            x = _features(self.phase, micro_batch, context)
            value = float(np.dot(self.coefficients, x))
        return max(value, self.floor_s)

    def _interpolated_s(self, micro_batch: int, context: int) -> float | None:
        below = [b for b in self.by_batch if b <= micro_batch]
        above = [b for b in self.by_batch if b >= micro_batch]
        if not below or not above or not self.contexts[0] <= context <= self.contexts[1]:
            return None
        lo, hi = max(below), min(above)
        if lo == hi:
            return self.by_batch[lo].at(context)
        share = (micro_batch - lo) / (hi - lo)
        return (1 - share) * self.by_batch[lo].at(context) + share * self.by_batch[hi].at(context)


def _relative_lstsq(x: np.ndarray, y: np.ndarray) -> tuple[float, ...]:
    """Least squares of ``x @ c ≈ y`` with each row divided by its ``y``."""
    coefficients, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    return tuple(float(c) for c in coefficients)


def _batch_fit(phase: str, samples: Sequence[LatencySample]) -> BatchFit | None:
    """Linear in the context (quadratic for prefill with three or more prompt lengths, as the
    form's b·s² term); None with fewer than two distinct contexts."""
    contexts = sorted({s.context_len for s in samples})
    if len(contexts) < 2:
        return None
    degree = 2 if phase == "prefill" and len(contexts) >= 3 else 1
    x = np.array([[float(s.context_len) ** k for k in range(degree + 1)] for s in samples])
    y = np.array([s.latency_s for s in samples])
    return BatchFit(_relative_lstsq(x, y))


def fit_phase(phase: str, samples: Sequence[LatencySample]) -> PhaseFit:
    """Least squares of the phase's regression form over ``samples``, in relative terms (each
    row divided by its latency), so the small operating points count as much as the large; and
    the per-micro-batch fits (:class:`PhaseFit`)."""
    x = np.array([_features(phase, s.micro_batch, s.context_len) for s in samples])
    y = np.array([s.latency_s for s in samples])
    by_batch = {}
    for b in sorted({s.micro_batch for s in samples}):
        fit = _batch_fit(phase, [s for s in samples if s.micro_batch == b])
        if fit is not None:
            by_batch[b] = fit
    contexts = (min(s.context_len for s in samples), max(s.context_len for s in samples))
    return PhaseFit(phase, _relative_lstsq(x, y), float(y.min()) / 2, by_batch, contexts)


def held_out_error(phase: str, samples: Sequence[LatencySample]) -> float | None:
    """Mean absolute percentage error of the phase's regression on held-out samples, as a
    fraction.

    Each sample whose removal keeps the grid's extent (every one but the corners) is predicted
    by a fit of all the others: the error of interpolating within the measured range, which
    is how the planner uses a profile. None when no sample can be held out with enough left
    (the form's coefficients plus one).
    """
    errors = []
    for k, sample in enumerate(samples):
        rest = [s for i, s in enumerate(samples) if i != k]
        if len(rest) < len(_features(phase, 1, 1)) + 1 or not _inside(sample, rest):
            continue
        predicted = fit_phase(phase, rest).predict_s(sample.micro_batch, sample.context_len)
        errors.append(abs(predicted - sample.latency_s) / sample.latency_s)
    return float(np.mean(errors)) if errors else None


def _inside(sample: LatencySample, others: Sequence[LatencySample]) -> bool:
    """Whether ``sample`` lies within the range of ``others`` in both grid dimensions."""
    batches = [s.micro_batch for s in others]
    contexts = [s.context_len for s in others]
    return min(batches) <= sample.micro_batch <= max(batches) and min(
        contexts
    ) <= sample.context_len <= max(contexts)


@dataclass(frozen=True, slots=True)
class EndSample:
    """One measurement of a per-stage part outside the layers (see ``END_PARTS``), seconds."""

    part: str
    phase: str
    micro_batch: int
    context_len: int
    latency_s: float

    def as_layer_sample(self) -> LatencySample:
        """The same point in the layer-sample form the fits take."""
        return LatencySample(self.phase, 16, self.micro_batch, self.context_len, self.latency_s)


@dataclass(frozen=True, slots=True)
class TransferFit:
    """One activation frame between two processes of a host: latency + bytes / bandwidth."""

    latency_s: float
    bandwidth_gb_s: float
    samples: tuple[tuple[int, float], ...]  # (bytes, seconds)

    @classmethod
    def from_samples(cls, samples: Iterable[tuple[int, float]]) -> TransferFit:
        """Least squares of t = latency_s + bytes / bandwidth over (bytes, seconds) samples;
        the latency is kept non-negative and the bandwidth positive."""
        pairs = tuple((int(n), float(t)) for n, t in samples)
        x = np.array([[1.0, n] for n, _ in pairs])
        y = np.array([t for _, t in pairs])
        (alpha, per_byte), *_ = np.linalg.lstsq(x, y, rcond=None)
        if per_byte <= 0:  # flat or noisy: charge everything to the largest frame's rate
            per_byte = max(t / n for n, t in pairs)
        return cls(max(float(alpha), 0.0), 1e-9 / float(per_byte), pairs)

    def transfer_s(self, num_bytes: float) -> float:
        """Time to move ``num_bytes``, seconds."""
        return self.latency_s + num_bytes / (self.bandwidth_gb_s * 1e9)


@dataclass(frozen=True)
class LatencyProfile:
    """Measured latencies of one model shape on one device type, fitted per (phase, bits);
    optionally the per-stage parts outside the layers (per (part, phase)) and the hop between
    two processes of the host."""

    device_type: str
    shape: ShapeKey
    samples: tuple[LatencySample, ...]
    unavailable_bits: frozenset[int]
    fits: Mapping[tuple[str, int], PhaseFit]
    end_samples: tuple[EndSample, ...] = ()
    end_fits: Mapping[tuple[str, str], PhaseFit] = field(default_factory=dict)
    transfer: TransferFit | None = None
    notes: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_samples(
        cls,
        device_type: str,
        shape: ShapeKey,
        samples: Iterable[LatencySample],
        unavailable_bits: Iterable[int] = (),
        *,
        end_samples: Iterable[EndSample] = (),
        transfer: TransferFit | None = None,
        notes: Mapping[str, Any] | None = None,
    ) -> LatencyProfile:
        """Fit every (phase, bits) and (part, phase) that has enough distinct samples.

        ``notes`` holds the file's unread sections (``fit_error``, ``measured``)."""
        samples, ends = tuple(samples), tuple(end_samples)
        fits: dict[tuple[str, int], PhaseFit] = {}
        for phase in _PHASES:
            for bits in sorted({s.bits for s in samples if s.phase == phase}):
                group = [s for s in samples if s.phase == phase and s.bits == bits]
                if _enough(phase, group):
                    fits[(phase, bits)] = fit_phase(phase, group)
        end_fits: dict[tuple[str, str], PhaseFit] = {}
        for part in END_PARTS:
            for phase in _PHASES:
                points = [e.as_layer_sample() for e in ends if (e.part, e.phase) == (part, phase)]
                if _enough(phase, points):
                    end_fits[(part, phase)] = fit_phase(phase, points)
        return cls(
            device_type, shape, samples, frozenset(unavailable_bits), fits,
            ends, end_fits, transfer, dict(notes or {}),
        )  # fmt: skip

    def part_latency_s(self, part: str, phase: str, micro_batch: int, context: int) -> float | None:
        """Predicted time of a per-stage part (``END_PARTS``), seconds; None if not measured."""
        fit = self.end_fits.get((part, phase))
        return None if fit is None else fit.predict_s(micro_batch, context)

    def covers(self, bits: int) -> bool:
        """Whether both phases of ``bits`` are measured, or it is marked unavailable."""
        measured = all((phase, bits) in self.fits for phase in _PHASES)
        return measured or bits in self.unavailable_bits

    def layer_latency_s(self, bits: int, phase: str, micro_batch: int, context: int) -> float:
        """Predicted latency of one layer, seconds; ``math.inf`` if ``bits`` is unavailable."""
        fit = self.fits.get((phase, bits))
        if bits in self.unavailable_bits or fit is None:
            return math.inf
        return fit.predict_s(micro_batch, context)

    def to_dict(self) -> dict[str, Any]:
        """The profile in its file format."""
        data: dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "device_type": self.device_type,
            "model_shape": {f: getattr(self.shape, f) for f in ShapeKey.__dataclass_fields__},
            "unavailable_bits": sorted(self.unavailable_bits),
            "samples": [
                {f: getattr(s, f) for f in LatencySample.__dataclass_fields__} for s in self.samples
            ],
        }
        if self.end_samples:
            data["end_samples"] = [
                {f: getattr(e, f) for f in EndSample.__dataclass_fields__} for e in self.end_samples
            ]
        if self.transfer is not None:
            data["transfer"] = {
                "latency_s": self.transfer.latency_s,
                "bandwidth_gb_s": self.transfer.bandwidth_gb_s,
                "samples": [{"bytes": n, "latency_s": t} for n, t in self.transfer.samples],
            }
        return data | {k: v for k, v in self.notes.items() if k in _NOTE_SECTIONS}


def _enough(phase: str, samples: Sequence[LatencySample]) -> bool:
    return len({(s.micro_batch, s.context_len) for s in samples}) >= _MIN_SAMPLES[phase]


def save_profile(profile: LatencyProfile, path: str | Path) -> None:
    """Write ``profile`` as JSON."""
    Path(path).write_text(json.dumps(profile.to_dict(), indent=1) + "\n", encoding="utf-8")


def load_profile(path: str | Path) -> LatencyProfile:
    """Read and fit a profile file; raises ProfileError naming the file and field."""
    data = read_json(path)
    return parse_profile(data, str(path))


def parse_profile(data: Any, source: str) -> LatencyProfile:
    """Validate profile data read from ``source`` and fit it."""
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise ProfileError(f'{source}: format: expected "{PROFILE_FORMAT}"')
    if data.get("version") != PROFILE_VERSION:
        raise ProfileError(f"{source}: version: expected {PROFILE_VERSION}")
    device_type = data.get("device_type")
    if not isinstance(device_type, str) or not device_type:
        raise ProfileError(f"{source}: device_type: expected a device type name")
    shape = _parse_shape(data.get("model_shape"), source)
    unavailable = data.get("unavailable_bits", [])
    if not isinstance(unavailable, list) or not all(_is_bits(b) for b in unavailable):
        raise ProfileError(f"{source}: unavailable_bits: expected a list of 2, 3, 4, 8 or 16")
    raw_samples = data.get("samples")
    if not isinstance(raw_samples, list):
        raise ProfileError(f"{source}: samples: expected a list")
    samples = [_parse_sample(s, f"{source}: samples[{k}]") for k, s in enumerate(raw_samples)]
    raw_ends = data.get("end_samples", [])
    if not isinstance(raw_ends, list):
        raise ProfileError(f"{source}: end_samples: expected a list")
    ends = [_parse_end(e, f"{source}: end_samples[{k}]") for k, e in enumerate(raw_ends)]
    transfer = _parse_transfer(data.get("transfer"), f"{source}: transfer")
    notes = {k: data[k] for k in _NOTE_SECTIONS if k in data}
    return LatencyProfile.from_samples(
        device_type, shape, samples, unavailable, end_samples=ends, transfer=transfer, notes=notes
    )


def _parse_end(raw: Any, where: str) -> EndSample:
    if not isinstance(raw, dict) or raw.get("part") not in END_PARTS:
        raise ProfileError(f"{where}.part: expected one of {', '.join(END_PARTS)}")
    sample = _parse_sample(raw | {"bits": 16}, where)
    return EndSample(
        raw["part"], sample.phase, sample.micro_batch, sample.context_len, sample.latency_s
    )


def _parse_transfer(raw: Any, where: str) -> TransferFit | None:
    if raw is None:
        return None
    samples = raw.get("samples") if isinstance(raw, dict) else None
    if not isinstance(samples, list) or len(samples) < 2:
        raise ProfileError(f"{where}.samples: expected a list of at least two frames")
    pairs = []
    for k, item in enumerate(samples):
        ok = isinstance(item, dict) and _positive_int(item.get("bytes"))
        latency = item.get("latency_s") if ok else None
        if not ok or not _positive_seconds(latency):
            raise ProfileError(f"{where}.samples[{k}]: expected bytes and latency_s > 0")
        pairs.append((item["bytes"], float(item["latency_s"])))
    return TransferFit.from_samples(pairs)


def _positive_seconds(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return bool(value > 0 and math.isfinite(value))


def _is_bits(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value in (2, 3, 4, 8, 16)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _parse_shape(raw: Any, source: str) -> ShapeKey:
    if not isinstance(raw, dict):
        raise ProfileError(f"{source}: model_shape: expected an object")
    values: dict[str, Any] = {}
    for name in ShapeKey.__dataclass_fields__:
        value = raw.get(name)
        ok = isinstance(value, str) if name == "family" else _positive_int(value)
        if not ok:
            raise ProfileError(f"{source}: model_shape.{name}: missing or invalid")
        values[name] = value
    return ShapeKey(**values)


def _parse_sample(raw: Any, where: str) -> LatencySample:
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: expected an object")
    if raw.get("phase") not in _PHASES:
        raise ProfileError(f'{where}.phase: expected "prefill" or "decode"')
    if not _is_bits(raw.get("bits")):
        raise ProfileError(f"{where}.bits: expected 2, 3, 4, 8 or 16")
    for name in ("micro_batch", "context_len"):
        if not _positive_int(raw.get(name)):
            raise ProfileError(f"{where}.{name}: expected a positive integer")
    latency = raw.get("latency_s")
    if isinstance(latency, bool) or not isinstance(latency, int | float) or not latency > 0:
        raise ProfileError(f"{where}.latency_s: expected a positive number of seconds")
    if not math.isfinite(latency):
        raise ProfileError(f"{where}.latency_s: expected a finite number")
    return LatencySample(
        raw["phase"], raw["bits"], raw["micro_batch"], raw["context_len"], float(latency)
    )


def default_profile_dir() -> Path:
    """Where ``pqctl profile`` writes and the planner looks: ``$PQCTL_PROFILE_DIR`` or
    ``~/.cache/pqctl/profiles``."""
    env = os.environ.get("PQCTL_PROFILE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "pqctl" / "profiles"


def load_profiles(directory: str | Path | None = None) -> list[LatencyProfile]:
    """Every profile file in ``directory`` (default :func:`default_profile_dir`)."""
    root = Path(directory) if directory is not None else default_profile_dir()
    if not root.is_dir():
        return []
    return [load_profile(p) for p in sorted(root.glob("*.json"))]


def find_profile(
    profiles: Sequence[LatencyProfile], device_type: str, shape: ShapeKey
) -> LatencyProfile | None:
    """The profile measured for ``device_type`` on exactly this model shape, if any."""
    for profile in profiles:
        if profile.device_type == device_type and profile.shape == shape:
            return profile
    return None
