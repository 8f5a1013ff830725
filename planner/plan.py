"""The plan: the one contract between the planner, the runtime and the interfaces.

A plan says which device runs which contiguous, half-open range of decoder layers, at which
weight precision every layer runs, and the prefill and decode micro-batch sizes, together with
what the planner predicted for it. It is JSON on disk (``plan.json``), human-readable, and
validated on load: an invalid file raises :class:`PlanValidationError` naming the bad field.

This module is stdlib-only on purpose: ``runtime/`` and ``pqctl/`` import nothing else from
``planner/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias, get_args

SCHEMA_VERSION = 1

Bits: TypeAlias = Literal[2, 3, 4, 8, 16]
"""Weight precision of a decoder layer, in bits (weight-only, group-wise; 16 = unquantized)."""

ALL_BITS: tuple[int, ...] = tuple(sorted(get_args(Bits), reverse=True))

QUANT_SCHEMES = ("rtn-asym-group",)
"""Quantization schemes the runtime packs and computes."""

MAX_PLAN_BYTES = 16 << 20
"""Largest plan file read (a plan of 10 000 layers is well under 1 MiB)."""

LIMITS: dict[str, tuple[int, int]] = {
    "model.num_layers": (1, 10_000),
    "model.hidden_size": (1, 1 << 20),
    "model.intermediate_size": (1, 1 << 22),
    "model.num_heads": (1, 1 << 14),
    "model.num_kv_heads": (1, 1 << 14),
    "model.vocab_size": (1, 1 << 24),
    "workload.global_batch": (1, 1 << 16),
    "workload.prompt_len": (1, 1 << 20),
    "workload.max_new_tokens": (1, 1 << 20),
    "workload.expected_new_tokens": (1, 1 << 20),
    "micro_batching.prefill_size": (1, 1 << 16),
    "micro_batching.decode_size": (1, 1 << 16),
    "quantization.group_size": (1, 1 << 20),
}
"""Inclusive bounds of the plan's sizes: beyond them no runtime could hold the plan, and a
number that large in a plan file is a corrupted or forged one."""

MAX_INT_DIGITS = 20
"""Longest integer a plan field may hold (64-bit counts of bytes fit in 20 digits)."""


class PlanValidationError(ValueError):
    """A plan (in memory or on disk) breaks the schema; ``field`` names the offending field."""

    def __init__(self, field_path: str, problem: str) -> None:
        super().__init__(f"invalid plan: {field_path}: {problem}")
        self.field = field_path
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Workload:
    """The offline batch a plan is sized for.

    Attributes:
        global_batch: prompts served together (B).
        prompt_len: tokens per prompt after padding (s).
        max_new_tokens: most tokens generated per prompt (n); the KV cache is sized for s + n.
        expected_new_tokens: tokens expected per prompt on average (mu_n <= n); the decode
            time prediction uses it.
    """

    global_batch: int
    prompt_len: int
    max_new_tokens: int
    expected_new_tokens: int

    @property
    def decode_steps(self) -> int:
        """Decode rounds per prompt: the first new token comes out of prefill."""
        return self.expected_new_tokens - 1

    @property
    def max_context(self) -> int:
        """Longest sequence a KV cache must hold, in tokens."""
        return self.prompt_len + self.max_new_tokens


@dataclass(frozen=True, slots=True)
class ModelRef:
    """Which model a plan is for, and the shape the runtime checks its checkpoint against."""

    source: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tied_embeddings: bool


@dataclass(frozen=True, slots=True)
class DeviceRef:
    """One device of the cluster: ``host`` plus the device's index on that host.

    ``index`` is the CUDA ordinal for GPUs and -1 for a host's CPU.
    """

    host: str
    index: int
    device_type: str

    @property
    def key(self) -> str:
        """Stable textual id, e.g. ``node-a/cuda:1`` or ``node-a/cpu``."""
        return f"{self.host}/cpu" if self.index < 0 else f"{self.host}/cuda:{self.index}"


@dataclass(frozen=True, slots=True)
class LayerRange:
    """Half-open range ``[start, stop)`` of decoder layer indices."""

    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(range(self.start, self.stop))


@dataclass(frozen=True, slots=True)
class StagePrediction:
    """What the cost model predicts for one stage (seconds per micro-batch, bytes).

    ``memory_bytes`` is what the stage's weights, KV cache and activations take, against the
    device's ``memory_capacity_bytes`` (its memory less the runtime reserve). ``process_bytes``
    is the whole stage process at its peak: ``memory_bytes`` plus the runtime's own baseline on
    that device (Python and torch on a CPU, the CUDA context on a GPU); 0 in plans that predate
    it.
    """

    prefill_s: float
    decode_s: float
    memory_bytes: int
    memory_capacity_bytes: int
    process_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Stage:
    """One pipeline stage: a device, its layers and each layer's precision.

    ``layer_bits[k]`` is the precision of layer ``layer_range.start + k``. The first stage also
    holds the token embedding, the last one the final norm and the LM head.
    """

    device: DeviceRef
    layer_range: LayerRange
    layer_bits: tuple[int, ...]
    holds_embedding: bool
    holds_lm_head: bool
    predicted: StagePrediction


@dataclass(frozen=True, slots=True)
class Quantization:
    """Storage format of quantized weights: asymmetric round-to-nearest, one scale and zero
    (fp16 each) per group of ``group_size`` input weights of an output row; 8-bit uses one
    symmetric scale per output row."""

    group_size: int = 128
    scheme: str = "rtn-asym-group"


@dataclass(frozen=True, slots=True)
class MicroBatching:
    """Prefill and decode micro-batch sizes (sequences per micro-batch)."""

    prefill_size: int
    decode_size: int


@dataclass(frozen=True, slots=True)
class Prediction:
    """End-to-end prediction for the whole batch."""

    prefill_s: float
    decode_s: float
    total_s: float
    throughput_tokens_per_s: float


@dataclass(frozen=True, slots=True)
class QualityReport:
    """The quality indicator of the plan: Σω, normalised so all-16-bit = 0 and all-lowest = 1.

    ``max_ppl_increase`` is the operator's target as a relative perplexity increase (0.02 =
    2 %) when the budget came from one, and ``predicted_ppl_increase`` what the calibrated
    mapping predicts for this plan's Σω (``pqctl eval`` measures it).
    """

    indicator: str
    omega_sum: float
    budget: float | None
    theta_s: float
    max_ppl_increase: float | None = None
    predicted_ppl_increase: float | None = None


@dataclass(frozen=True, slots=True)
class SolverReport:
    """How the plan was found."""

    status: str
    mip_gap: float | None
    time_s: float
    milps_solved: int
    orders_tried: int
    formulation: str
    layer_group_size: int = 1
    order_search: str = ""
    order_search_exhaustive: bool | None = None
    order_search_note: str = ""

    @property
    def gap_text(self) -> str:
        """The gap as a percentage, or "no bound" when the search had none."""
        return "no bound" if self.mip_gap is None else f"{self.mip_gap:.2%}"

    @property
    def order_text(self) -> str:
        """How device orders were searched, in one line ("" for plans that do not say)."""
        if not self.order_search:
            return ""
        scope = {True: "every order covered", False: "not every order covered", None: ""}[
            self.order_search_exhaustive
        ]
        method = self.order_search.replace("in the MILP", "chosen by the solver")
        return (
            f"device order {method}"
            + (f" ({scope})" if scope else "")
            + (f": {self.order_search_note}" if self.order_search_note else "")
        )


@dataclass(frozen=True, slots=True)
class BaselineResult:
    """A baseline method's plan, scored by the same simulator (None when it has no plan)."""

    name: str
    feasible: bool
    reason: str = ""
    throughput_tokens_per_s: float | None = None
    prefill_s: float | None = None
    decode_s: float | None = None
    omega_sum: float | None = None
    within_quality_budget: bool | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A complete, validated deployment plan."""

    model: ModelRef
    workload: Workload
    quantization: Quantization
    micro_batching: MicroBatching
    stages: tuple[Stage, ...]
    prediction: Prediction
    quality: QualityReport
    solver: SolverReport
    baselines: tuple[BaselineResult, ...] = ()
    schema_version: int = SCHEMA_VERSION
    notes: tuple[str, ...] = field(default=())

    @property
    def layer_bits(self) -> tuple[int, ...]:
        """Precision of every decoder layer, in layer order."""
        return tuple(b for stage in self.stages for b in stage.layer_bits)

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-ready data."""
        return asdict(self)

    def to_json(self) -> str:
        """The plan as indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Build and validate a plan from JSON data; raises PlanValidationError."""
        plan = _PlanReader(data).plan()
        validate(plan)
        return plan

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse and validate plan JSON text; raises PlanValidationError."""
        try:
            data = json.loads(text, parse_int=_parse_int)
        except json.JSONDecodeError as exc:
            raise PlanValidationError("<file>", f"not JSON ({exc})") from exc
        except RecursionError as exc:
            raise PlanValidationError("<file>", "nested too deeply to be a plan") from exc
        except ValueError as exc:  # from _parse_int
            raise PlanValidationError("<file>", str(exc)) from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        """Write the plan to ``path`` as JSON."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read and validate a plan file."""
        try:
            with Path(path).open("rb") as handle:
                raw = handle.read(MAX_PLAN_BYTES + 1)
        except OSError as exc:
            raise PlanValidationError(str(path), f"cannot read ({exc.strerror})") from exc
        if len(raw) > MAX_PLAN_BYTES:
            raise PlanValidationError("<file>", f"larger than {MAX_PLAN_BYTES >> 20} MiB")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PlanValidationError(
                "<file>", f"not UTF-8 text (byte {exc.start}); a plan is JSON from pqctl plan"
            ) from exc
        return cls.from_json(text)


# --------------------------------------------------------------------------- reading JSON


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(digits)} digits is not a plan's")
    return int(digits)


class _PlanReader:
    """Typed extraction of a plan from untrusted JSON data, naming the field on any error."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def plan(self) -> Plan:
        d = _obj(self.data, "plan")
        version = _int(d, "schema_version", "")
        if version != SCHEMA_VERSION:
            raise PlanValidationError(
                "schema_version", f"{version} is not supported (this pqctl reads {SCHEMA_VERSION})"
            )
        _only(d, Plan, "")
        return Plan(
            model=_sub(ModelRef, d, "model", ""),
            workload=_sub(Workload, d, "workload", ""),
            quantization=_sub(Quantization, d, "quantization", ""),
            micro_batching=_sub(MicroBatching, d, "micro_batching", ""),
            stages=tuple(
                self._stage(s, f"stages[{k}]") for k, s in enumerate(_list(d, "stages", ""))
            ),
            prediction=_sub(Prediction, d, "prediction", ""),
            quality=_sub(QualityReport, d, "quality", ""),
            solver=_sub(SolverReport, d, "solver", ""),
            baselines=tuple(
                _record(BaselineResult, _obj(b, f"baselines[{k}]"), f"baselines[{k}]")
                for k, b in enumerate(_list(d, "baselines", "", required=False))
            ),
            schema_version=version,
            notes=tuple(
                _check_type(n, str, f"notes[{k}]")
                for k, n in enumerate(_list(d, "notes", "", required=False))
            ),
        )

    def _stage(self, raw: Any, path: str) -> Stage:
        d = _obj(raw, path)
        _only(d, Stage, path)
        bits = _list(d, "layer_bits", path)
        return Stage(
            device=_sub(DeviceRef, d, "device", path),
            layer_range=_sub(LayerRange, d, "layer_range", path),
            layer_bits=tuple(
                _check_type(b, int, f"{path}.layer_bits[{k}]") for k, b in enumerate(bits)
            ),
            holds_embedding=_check_type(
                _member(d, "holds_embedding", path), bool, f"{path}.holds_embedding"
            ),
            holds_lm_head=_check_type(
                _member(d, "holds_lm_head", path), bool, f"{path}.holds_lm_head"
            ),
            predicted=_sub(StagePrediction, d, "predicted", path),
        )


def _where(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _member(d: Mapping[str, Any], key: str, path: str) -> Any:
    """``d[key]``, or a "missing" error naming the field."""
    if key not in d:
        raise PlanValidationError(_where(path, key), "missing")
    return d[key]


def _sub(cls: type, d: Mapping[str, Any], key: str, path: str) -> Any:
    """The nested record ``d[key]`` as a ``cls``."""
    where = _where(path, key)
    return _record(cls, _obj(_member(d, key, path), where), where)


_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "str": (str,),
    "bool": (bool,),
    "float | None": (int, float, type(None)),
    "bool | None": (bool, type(None)),
    "int | None": (int, type(None)),
}


def _record(cls: type, d: Mapping[str, Any], path: str) -> Any:
    """Build a flat dataclass from ``d``, checking every field's presence and JSON type."""
    _only(d, cls, path)
    values: dict[str, Any] = {}
    for f in cls.__dataclass_fields__.values():  # type: ignore[attr-defined]
        where = f"{path}.{f.name}"
        if f.name not in d:
            if f.default is not _MISSING:
                continue
            raise PlanValidationError(where, "missing")
        accepted = _SCALAR_TYPES[str(f.type)]
        values[f.name] = _check_type(d[f.name], accepted, where)
    return cls(**values)


_MISSING = field().default


def _check_type(value: Any, accepted: type | tuple[type, ...], where: str) -> Any:
    kinds = accepted if isinstance(accepted, tuple) else (accepted,)
    is_bool = isinstance(value, bool)
    ok = isinstance(value, kinds) and (bool in kinds or not is_bool)
    if not ok:
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise PlanValidationError(where, f"expected {names}, got {json.dumps(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise PlanValidationError(where, "must be a finite number")
    if isinstance(value, int) and not is_bool and not -(2**63) <= value < 2**63:
        raise PlanValidationError(where, f"{value} is outside the 64-bit integer range")
    return value


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanValidationError(where, f"expected an object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    if isinstance(value, list | Mapping) or value is None:
        return {list: "a list", type(None): "null"}.get(type(value), "an object")
    return json.dumps(value)


def _list(d: Mapping[str, Any], key: str, path: str, required: bool = True) -> Sequence[Any]:
    if key not in d and not required:
        return ()
    value = _member(d, key, path)
    if not isinstance(value, list):
        raise PlanValidationError(_where(path, key), f"expected a list, got {_kind(value)}")
    return value


def _int(d: Mapping[str, Any], key: str, path: str) -> int:
    return int(_check_type(_member(d, key, path), int, _where(path, key)))


def _only(d: Mapping[str, Any], cls: type, path: str) -> None:
    known = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    for key in d:
        if key not in known:
            shown = key if str(key).isidentifier() else json.dumps(key)
            where = f"{path}.{shown}" if path else shown
            raise PlanValidationError(where, f"unknown field (known: {', '.join(sorted(known))})")


# --------------------------------------------------------------------------- validation


def validate(plan: Plan) -> None:
    """Check the plan's internal consistency; raises PlanValidationError naming the field.

    Checks: contiguous half-open layer ranges covering every layer in order, one known bit
    width per layer, distinct devices, embedding on the first stage and LM head on the last,
    positive workload and micro-batch sizes that divide the batch.
    """
    _validate_workload(plan.workload, plan.micro_batching)
    _validate_bounds(plan)
    model = plan.model
    _validate_model(model)
    _validate_quantization(plan.quantization, model)
    _validate_figures(plan)
    if not plan.stages:
        raise PlanValidationError("stages", "a plan needs at least one stage")
    next_layer = 0
    seen: dict[str, int] = {}
    last = len(plan.stages) - 1
    for k, stage in enumerate(plan.stages):
        path = f"stages[{k}]"
        _validate_stage(stage, path, next_layer, first=k == 0, last=k == last)
        if stage.device.key in seen:
            earlier = seen[stage.device.key]
            raise PlanValidationError(
                f"{path}.device", f"{stage.device.key} already runs stages[{earlier}]"
            )
        seen[stage.device.key] = k
        next_layer = stage.layer_range.stop
    if next_layer != model.num_layers:
        raise PlanValidationError(
            f"stages[{last}].layer_range.stop",
            f"is {next_layer} but the model has {model.num_layers} layers",
        )


def _validate_bounds(plan: Plan) -> None:
    for where, (low, high) in LIMITS.items():
        section, name = where.split(".")
        value = getattr(getattr(plan, section), name)
        if value < low:
            raise PlanValidationError(where, "must be positive")
        if value > high:
            raise PlanValidationError(
                where, f"{value} is more than any plan holds (at most {high})"
            )


def _validate_model(model: ModelRef) -> None:
    if not model.source.strip():
        raise PlanValidationError("model.source", "must name a checkpoint")
    if not model.family.strip():
        raise PlanValidationError("model.family", "must name a model family")
    if model.hidden_size % model.num_heads:
        raise PlanValidationError(
            "model.num_heads",
            f"{model.num_heads} does not divide model.hidden_size {model.hidden_size}",
        )
    if model.num_kv_heads > model.num_heads or model.num_heads % model.num_kv_heads:
        raise PlanValidationError(
            "model.num_kv_heads",
            f"{model.num_kv_heads} must divide model.num_heads {model.num_heads}",
        )


def _validate_quantization(quant: Quantization, model: ModelRef) -> None:
    if quant.scheme not in QUANT_SCHEMES:
        raise PlanValidationError(
            "quantization.scheme",
            f"{quant.scheme!r} is not a scheme this pqctl serves "
            f"(known: {', '.join(QUANT_SCHEMES)})",
        )
    for name in ("hidden_size", "intermediate_size"):
        width = getattr(model, name)
        if width % quant.group_size:
            raise PlanValidationError(
                "quantization.group_size",
                f"{quant.group_size} does not divide model.{name} {width}",
            )


def _validate_figures(plan: Plan) -> None:
    """Predicted figures: non-negative, throughputs positive (a report divides by them)."""
    checks: list[tuple[str, float | None]] = [
        ("prediction.prefill_s", plan.prediction.prefill_s),
        ("prediction.decode_s", plan.prediction.decode_s),
        ("prediction.total_s", plan.prediction.total_s),
        ("solver.time_s", plan.solver.time_s),
        ("quality.theta_s", plan.quality.theta_s),
    ]
    for k, stage in enumerate(plan.stages):
        p = stage.predicted
        checks += [
            (f"stages[{k}].predicted.prefill_s", p.prefill_s),
            (f"stages[{k}].predicted.decode_s", p.decode_s),
            (f"stages[{k}].predicted.memory_bytes", p.memory_bytes),
            (f"stages[{k}].predicted.memory_capacity_bytes", p.memory_capacity_bytes),
            (f"stages[{k}].predicted.process_bytes", p.process_bytes),
        ]
    for k, b in enumerate(plan.baselines):
        checks += [
            (f"baselines[{k}].prefill_s", b.prefill_s),
            (f"baselines[{k}].decode_s", b.decode_s),
        ]
    for where, value in checks:
        if value is not None and value < 0:
            raise PlanValidationError(where, f"{value} must not be negative")
    positive: list[tuple[str, float | None]] = [
        ("prediction.throughput_tokens_per_s", plan.prediction.throughput_tokens_per_s)
    ]
    positive += [
        (f"baselines[{k}].throughput_tokens_per_s", b.throughput_tokens_per_s)
        for k, b in enumerate(plan.baselines)
    ]
    for where, value in positive:
        if value is not None and not value > 0:
            raise PlanValidationError(where, f"{value} must be positive")


def _validate_workload(workload: Workload, micro: MicroBatching) -> None:
    for name in ("global_batch", "prompt_len", "max_new_tokens", "expected_new_tokens"):
        if getattr(workload, name) <= 0:
            raise PlanValidationError(f"workload.{name}", "must be positive")
    if workload.expected_new_tokens > workload.max_new_tokens:
        raise PlanValidationError(
            "workload.expected_new_tokens", "must not exceed workload.max_new_tokens"
        )
    for name in ("prefill_size", "decode_size"):
        size = getattr(micro, name)
        if size <= 0 or workload.global_batch % size:
            raise PlanValidationError(
                f"micro_batching.{name}",
                f"{size} must be a positive divisor of the global batch {workload.global_batch}",
            )
    if micro.decode_size % micro.prefill_size:
        raise PlanValidationError(
            "micro_batching.prefill_size",
            f"{micro.prefill_size} must divide micro_batching.decode_size {micro.decode_size} "
            "(prefill chunks merge into decode micro-batches)",
        )


def _validate_stage(stage: Stage, path: str, expected_start: int, first: bool, last: bool) -> None:
    device = stage.device
    if not -1 <= device.index <= 1023:
        raise PlanValidationError(
            f"{path}.device.index",
            f"{device.index}: give a CUDA ordinal (0..1023) or -1 for the CPU",
        )
    if not device.host.strip() or len(device.host) > 253 or not device.host.isprintable():
        raise PlanValidationError(f"{path}.device.host", f"{device.host!r} is not a host name")
    rng = stage.layer_range
    if rng.start != expected_start:
        raise PlanValidationError(
            f"{path}.layer_range.start",
            f"is {rng.start}; ranges must be contiguous, expected {expected_start}",
        )
    if rng.stop <= rng.start:
        raise PlanValidationError(f"{path}.layer_range", "must hold at least one layer")
    most = LIMITS["model.num_layers"][1]
    if rng.stop > most:
        raise PlanValidationError(
            f"{path}.layer_range.stop", f"{rng.stop} is more than any plan holds (at most {most})"
        )
    if len(stage.layer_bits) != len(rng):
        raise PlanValidationError(
            f"{path}.layer_bits",
            f"has {len(stage.layer_bits)} entries for {len(rng)} layers",
        )
    for k, bits in enumerate(stage.layer_bits):
        if bits not in ALL_BITS:
            raise PlanValidationError(
                f"{path}.layer_bits[{k}]",
                f"{bits} is not a precision (accepted: {', '.join(map(str, ALL_BITS))})",
            )
    if stage.holds_embedding != first:
        raise PlanValidationError(
            f"{path}.holds_embedding", "only the first stage holds the embedding"
        )
    if stage.holds_lm_head != last:
        raise PlanValidationError(f"{path}.holds_lm_head", "only the last stage holds the LM head")
