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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from planner.errors import ProfileError
from planner.model_spec import ModelSpec

PROFILE_FORMAT = "pqctl-latency-profile"
PROFILE_VERSION = 1
_PHASES = ("prefill", "decode")
_MIN_SAMPLES = {"prefill": 5, "decode": 4}


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
class PhaseFit:
    """Least-squares coefficients of one (phase, bits) regression; predictions never fall
    below ``floor_s`` (half the fastest sample), so an extrapolation cannot go negative."""

    phase: str
    coefficients: tuple[float, ...]
    floor_s: float

    def predict_s(self, micro_batch: int, context: int) -> float:
        """Predicted layer latency, seconds."""
        x = _features(self.phase, micro_batch, context)
        value = float(np.dot(self.coefficients, x))
        return max(value, self.floor_s)


def fit_phase(phase: str, samples: Sequence[LatencySample]) -> PhaseFit:
    """Ordinary least squares of the phase's regression form over ``samples``."""
    x = np.array([_features(phase, s.micro_batch, s.context_len) for s in samples])
    y = np.array([s.latency_s for s in samples])
    coefficients, *_ = np.linalg.lstsq(x, y, rcond=None)
    return PhaseFit(phase, tuple(float(c) for c in coefficients), float(y.min()) / 2)


@dataclass(frozen=True)
class LatencyProfile:
    """Measured latencies of one model shape on one device type, fitted per (phase, bits)."""

    device_type: str
    shape: ShapeKey
    samples: tuple[LatencySample, ...]
    unavailable_bits: frozenset[int]
    fits: Mapping[tuple[str, int], PhaseFit]

    @classmethod
    def from_samples(
        cls,
        device_type: str,
        shape: ShapeKey,
        samples: Iterable[LatencySample],
        unavailable_bits: Iterable[int] = (),
    ) -> LatencyProfile:
        """Fit every (phase, bits) that has enough distinct samples."""
        samples = tuple(samples)
        fits: dict[tuple[str, int], PhaseFit] = {}
        for phase in _PHASES:
            for bits in sorted({s.bits for s in samples if s.phase == phase}):
                group = [s for s in samples if s.phase == phase and s.bits == bits]
                if len({(s.micro_batch, s.context_len) for s in group}) >= _MIN_SAMPLES[phase]:
                    fits[(phase, bits)] = fit_phase(phase, group)
        return cls(device_type, shape, samples, frozenset(unavailable_bits), fits)

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
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "device_type": self.device_type,
            "model_shape": {f: getattr(self.shape, f) for f in ShapeKey.__dataclass_fields__},
            "unavailable_bits": sorted(self.unavailable_bits),
            "samples": [
                {f: getattr(s, f) for f in LatencySample.__dataclass_fields__} for s in self.samples
            ],
        }


def save_profile(profile: LatencyProfile, path: str | Path) -> None:
    """Write ``profile`` as JSON."""
    Path(path).write_text(json.dumps(profile.to_dict(), indent=1) + "\n", encoding="utf-8")


def load_profile(path: str | Path) -> LatencyProfile:
    """Read and fit a profile file; raises ProfileError naming the file and field."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path}: not valid JSON: {exc}") from exc
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
    return LatencyProfile.from_samples(device_type, shape, samples, unavailable)


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
