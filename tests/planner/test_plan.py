"""Tests of planner/plan.py: the plan schema, its JSON round trip and its validation errors."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from planner.plan import (
    SCHEMA_VERSION,
    BaselineResult,
    DeviceRef,
    LayerRange,
    MicroBatching,
    ModelRef,
    Plan,
    PlanValidationError,
    Prediction,
    QualityReport,
    Quantization,
    SolverReport,
    Stage,
    StagePrediction,
    Workload,
    validate,
)

Edit = Callable[[dict[str, Any]], None]


def _stage(
    host: str, index: int, device_type: str, start: int, bits: tuple[int, ...], k: int, n: int
) -> Stage:
    return Stage(
        device=DeviceRef(host=host, index=index, device_type=device_type),
        layer_range=LayerRange(start, start + len(bits)),
        layer_bits=bits,
        holds_embedding=k == 0,
        holds_lm_head=k == n - 1,
        predicted=StagePrediction(
            prefill_s=0.125 * (k + 1),
            decode_s=0.0109375 * (k + 1),
            memory_bytes=14_000_000_000 + k,
            memory_capacity_bytes=15_200_000_000,
        ),
    )


def make_plan() -> Plan:
    """A three-stage plan of a 32-layer Llama over two hosts, mixed precision."""
    bits = (16,) * 4 + (8,) * 8, (4,) * 10 + (3, 3), (4,) * 6 + (2, 2)
    stages = (
        _stage("node-a", 0, "A100-40G", 0, bits[0], 0, 3),
        _stage("node-a", 1, "A100-40G", 12, bits[1], 1, 3),
        _stage("node-b", 0, "T4", 24, bits[2], 2, 3),
    )
    return Plan(
        model=ModelRef(
            source="meta-llama/Llama-3.1-8B",
            family="llama",
            num_layers=32,
            hidden_size=4096,
            intermediate_size=14336,
            num_heads=32,
            num_kv_heads=8,
            vocab_size=128256,
            tied_embeddings=False,
        ),
        workload=Workload(
            global_batch=32, prompt_len=512, max_new_tokens=100, expected_new_tokens=80
        ),
        quantization=Quantization(group_size=128, scheme="rtn-asym-group"),
        micro_batching=MicroBatching(prefill_size=4, decode_size=16),
        stages=stages,
        prediction=Prediction(
            prefill_s=1.75, decode_s=20.5, total_s=22.25, throughput_tokens_per_s=115.05617977
        ),
        quality=QualityReport(indicator="variance", omega_sum=0.0625, budget=0.1, theta_s=2.0),
        solver=SolverReport(
            status="Optimal",
            mip_gap=0.0001,
            time_s=3.5,
            milps_solved=17,
            orders_tried=2,
            formulation="per-layer",
            layer_group_size=2,
        ),
        baselines=(
            BaselineResult(
                name="uniform",
                feasible=True,
                throughput_tokens_per_s=80.0,
                prefill_s=2.0,
                decode_s=30.0,
                omega_sum=0.25,
                within_quality_budget=False,
            ),
            BaselineResult(name="pipeedge", feasible=False, reason="no precision fits"),
        ),
        notes=("quality indicator: variance", "profiles: 2 device types"),
    )


def plan_dict() -> dict[str, Any]:
    """The plan as the JSON data a file holds (a fresh copy each call)."""
    data: dict[str, Any] = json.loads(make_plan().to_json())
    return data


# --------------------------------------------------------------------------- round trip


def test_json_round_trip_is_identity() -> None:
    plan = make_plan()
    text = plan.to_json()
    assert text.endswith("}\n")
    assert Plan.from_json(text) == plan


def test_json_holds_the_documented_shape() -> None:
    data = plan_dict()
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert data["stages"][1]["layer_range"] == {"start": 12, "stop": 24}
    assert data["stages"][2]["device"] == {"host": "node-b", "index": 0, "device_type": "T4"}
    assert data["stages"][1]["layer_bits"] == [4] * 10 + [3, 3]
    assert data["baselines"][1]["throughput_tokens_per_s"] is None


def test_save_and_load(tmp_path: Path) -> None:
    plan = make_plan()
    path = tmp_path / "plan.json"
    plan.save(path)
    assert path.read_text(encoding="utf-8") == plan.to_json()
    assert Plan.load(path) == plan
    assert Plan.load(str(path)) == plan


def test_load_of_a_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(PlanValidationError) as info:
        Plan.load(path)
    assert info.value.field == str(path)
    assert info.value.problem == "cannot read (No such file or directory)"


def test_validate_accepts_the_plan_and_layer_bits_follow_the_stages() -> None:
    plan = make_plan()
    validate(plan)  # raises on any problem
    assert len(plan.layer_bits) == 32
    assert plan.layer_bits[:4] == (16, 16, 16, 16)
    assert plan.layer_bits[22:26] == (3, 3, 4, 4)
    assert list(plan.stages[1].layer_range) == list(range(12, 24))
    assert len(plan.stages[2].layer_range) == 8


def test_optional_fields_take_their_defaults() -> None:
    data = plan_dict()
    del data["baselines"], data["notes"], data["solver"]["layer_group_size"]
    data["quantization"] = {}
    plan = Plan.from_dict(data)
    assert plan.baselines == ()
    assert plan.notes == ()
    assert plan.solver.layer_group_size == 1
    assert plan.quantization == Quantization(group_size=128, scheme="rtn-asym-group")


def test_ints_are_accepted_for_float_fields() -> None:
    data = plan_dict()
    data["prediction"]["prefill_s"] = 2
    data["quality"]["budget"] = None
    plan = Plan.from_dict(data)
    assert plan.prediction.prefill_s == 2
    assert plan.quality.budget is None


def test_error_text_names_the_field() -> None:
    err = PlanValidationError("stages[1].layer_range.start", "is 13")
    assert str(err) == "invalid plan: stages[1].layer_range.start: is 13"
    assert isinstance(err, ValueError)


def test_device_key() -> None:
    assert DeviceRef("node-a", 1, "T4").key == "node-a/cuda:1"
    assert DeviceRef("node-a", -1, "cpu").key == "node-a/cpu"


def test_workload_derived_lengths() -> None:
    workload = Workload(global_batch=8, prompt_len=512, max_new_tokens=100, expected_new_tokens=80)
    assert workload.max_context == 612
    assert workload.decode_steps == 79


# --------------------------------------------------------------------------- bad files


def _set(*path_and_value: Any) -> Edit:
    *path, value = path_and_value

    def edit(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def _delete(*path: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        target = data
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return edit


def _append(*path_and_value: Any) -> Edit:
    *path, value = path_and_value

    def edit(data: dict[str, Any]) -> None:
        target: Any = data
        for key in path:
            target = target[key]
        target.append(value)

    return edit


def _copy_device(src: int, dst: int) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        data["stages"][dst]["device"] = copy.deepcopy(data["stages"][src]["device"])

    return edit


def _both(*edits: Edit) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        for e in edits:
            e(data)

    return edit


_PLAN_FIELDS = (
    "baselines, micro_batching, model, notes, prediction, quality, quantization, "
    "schema_version, solver, stages, workload"
)
_STAGE_FIELDS = "device, holds_embedding, holds_lm_head, layer_bits, layer_range, predicted"
_DIVISOR = "must be a positive divisor of the global batch 32"
_ACCEPTED = "(accepted: 16, 8, 4, 3, 2)"

BAD_EDITS = [
    # a required field removed
    ("missing-model", _delete("model"), "model", "missing"),
    ("missing-stages", _delete("stages"), "stages", "missing"),
    ("missing-schema-version", _delete("schema_version"), "schema_version", "missing"),
    ("missing-prompt-len", _delete("workload", "prompt_len"), "workload.prompt_len", "missing"),
    (
        "missing-layer-range",
        _delete("stages", 1, "layer_range"),
        "stages[1].layer_range",
        "missing",
    ),
    (
        "missing-layer-range-stop",
        _delete("stages", 2, "layer_range", "stop"),
        "stages[2].layer_range.stop",
        "missing",
    ),
    ("missing-device", _delete("stages", 0, "device"), "stages[0].device", "missing"),
    ("missing-layer-bits", _delete("stages", 0, "layer_bits"), "stages[0].layer_bits", "missing"),
    (
        "missing-device-host",
        _delete("stages", 1, "device", "host"),
        "stages[1].device.host",
        "missing",
    ),
    (
        "missing-predicted-field",
        _delete("stages", 1, "predicted", "memory_bytes"),
        "stages[1].predicted.memory_bytes",
        "missing",
    ),
    (
        "missing-baseline-name",
        _delete("baselines", 1, "name"),
        "baselines[1].name",
        "missing",
    ),
    # wrong types
    (
        "string-for-int",
        _set("workload", "global_batch", "32"),
        "workload.global_batch",
        'expected int, got "32"',
    ),
    (
        "bool-for-int",
        _set("stages", 1, "layer_range", "start", True),
        "stages[1].layer_range.start",
        "expected int, got true",
    ),
    (
        "float-for-int",
        _set("micro_batching", "decode_size", 16.0),
        "micro_batching.decode_size",
        "expected int, got 16.0",
    ),
    (
        "string-for-bits",
        _set("stages", 0, "layer_bits", 3, "16"),
        "stages[0].layer_bits[3]",
        'expected int, got "16"',
    ),
    (
        "bool-for-bits",
        _set("stages", 2, "layer_bits", 0, False),
        "stages[2].layer_bits[0]",
        "expected int, got false",
    ),
    (
        "bool-for-float",
        _set("prediction", "total_s", True),
        "prediction.total_s",
        "expected int or float, got true",
    ),
    (
        "string-for-float",
        _set("stages", 0, "predicted", "decode_s", "0.01"),
        "stages[0].predicted.decode_s",
        'expected int or float, got "0.01"',
    ),
    (
        "int-for-bool",
        _set("stages", 0, "holds_embedding", 1),
        "stages[0].holds_embedding",
        "expected bool, got 1",
    ),
    (
        "int-for-str",
        _set("model", "family", 7),
        "model.family",
        "expected str, got 7",
    ),
    (
        "string-for-optional-float",
        _set("quality", "budget", "low"),
        "quality.budget",
        'expected int or float or null, got "low"',
    ),
    (
        "string-for-optional-bool",
        _set("baselines", 0, "within_quality_budget", "no"),
        "baselines[0].within_quality_budget",
        'expected bool or null, got "no"',
    ),
    (
        "int-for-note",
        _set("notes", 1, 3),
        "notes[1]",
        "expected str, got 3",
    ),
    ("object-for-stages", _set("stages", {}), "stages", "expected a list, got an object"),
    ("list-for-model", _set("model", []), "model", "expected an object, got a list"),
    ("number-for-stage", _set("stages", 1, 12), "stages[1]", "expected an object, got 12"),
    (
        "list-for-layer-bits",
        _set("stages", 0, "layer_bits", 16),
        "stages[0].layer_bits",
        "expected a list, got 16",
    ),
    (
        "string-for-schema-version",
        _set("schema_version", "1"),
        "schema_version",
        'expected int, got "1"',
    ),
    # unknown fields
    (
        "unknown-top-level",
        _set("comment", "hand-edited"),
        "comment",
        f"unknown field (known: {_PLAN_FIELDS})",
    ),
    (
        "unknown-in-stage",
        _set("stages", 0, "colour", "red"),
        "stages[0].colour",
        f"unknown field (known: {_STAGE_FIELDS})",
    ),
    (
        "unknown-in-workload",
        _set("workload", "temperature", 0.7),
        "workload.temperature",
        "unknown field (known: expected_new_tokens, global_batch, max_new_tokens, prompt_len)",
    ),
    (
        "unknown-in-layer-range",
        _set("stages", 1, "layer_range", "step", 1),
        "stages[1].layer_range.step",
        "unknown field (known: start, stop)",
    ),
    # layer ranges
    (
        "gap-between-stages",
        _set("stages", 1, "layer_range", "start", 13),
        "stages[1].layer_range.start",
        "is 13; ranges must be contiguous, expected 12",
    ),
    (
        "overlapping-stages",
        _set("stages", 2, "layer_range", "start", 23),
        "stages[2].layer_range.start",
        "is 23; ranges must be contiguous, expected 24",
    ),
    (
        "first-stage-not-at-zero",
        _set("stages", 0, "layer_range", "start", 1),
        "stages[0].layer_range.start",
        "is 1; ranges must be contiguous, expected 0",
    ),
    (
        "empty-range",
        _both(
            _set("stages", 0, "layer_range", "stop", 0),
            _set("stages", 0, "layer_bits", []),
        ),
        "stages[0].layer_range",
        "must hold at least one layer",
    ),
    (
        "bits-longer-than-range",
        _append("stages", 0, "layer_bits", 8),
        "stages[0].layer_bits",
        "has 13 entries for 12 layers",
    ),
    (
        "bits-shorter-than-range",
        _set("stages", 2, "layer_bits", [4] * 7),
        "stages[2].layer_bits",
        "has 7 entries for 8 layers",
    ),
    (
        "bits-five",
        _set("stages", 2, "layer_bits", 3, 5),
        "stages[2].layer_bits[3]",
        f"5 is not a precision {_ACCEPTED}",
    ),
    (
        "bits-zero",
        _set("stages", 0, "layer_bits", 0, 0),
        "stages[0].layer_bits[0]",
        f"0 is not a precision {_ACCEPTED}",
    ),
    (
        "last-stage-short-of-model",
        _set("model", "num_layers", 40),
        "stages[2].layer_range.stop",
        "is 32 but the model has 40 layers",
    ),
    (
        "last-stage-past-model",
        _set("model", "num_layers", 30),
        "stages[2].layer_range.stop",
        "is 32 but the model has 30 layers",
    ),
    ("no-stages", _set("stages", []), "stages", "a plan needs at least one stage"),
    ("zero-layers", _set("model", "num_layers", 0), "model.num_layers", "must be positive"),
    # devices and pipeline ends
    (
        "duplicate-device",
        _copy_device(0, 2),
        "stages[2].device",
        "node-a/cuda:0 already runs stages[0]",
    ),
    (
        "duplicate-neighbour-device",
        _copy_device(0, 1),
        "stages[1].device",
        "node-a/cuda:0 already runs stages[0]",
    ),
    (
        "embedding-not-on-first",
        _set("stages", 0, "holds_embedding", False),
        "stages[0].holds_embedding",
        "only the first stage holds the embedding",
    ),
    (
        "embedding-on-middle",
        _set("stages", 1, "holds_embedding", True),
        "stages[1].holds_embedding",
        "only the first stage holds the embedding",
    ),
    (
        "lm-head-not-on-last",
        _set("stages", 2, "holds_lm_head", False),
        "stages[2].holds_lm_head",
        "only the last stage holds the LM head",
    ),
    (
        "lm-head-on-first",
        _set("stages", 0, "holds_lm_head", True),
        "stages[0].holds_lm_head",
        "only the last stage holds the LM head",
    ),
    # workload and micro-batching
    (
        "decode-micro-batch-not-divisor",
        _set("micro_batching", "decode_size", 5),
        "micro_batching.decode_size",
        f"5 {_DIVISOR}",
    ),
    (
        "prefill-micro-batch-zero",
        _set("micro_batching", "prefill_size", 0),
        "micro_batching.prefill_size",
        f"0 {_DIVISOR}",
    ),
    (
        "prefill-not-dividing-decode",
        _set("micro_batching", "prefill_size", 32),
        "micro_batching.prefill_size",
        "32 must divide micro_batching.decode_size 16 (prefill chunks merge into decode "
        "micro-batches)",
    ),
    (
        "micro-batch-above-batch",
        _set("micro_batching", "decode_size", 64),
        "micro_batching.decode_size",
        f"64 {_DIVISOR}",
    ),
    (
        "expected-above-max-new",
        _set("workload", "expected_new_tokens", 101),
        "workload.expected_new_tokens",
        "must not exceed workload.max_new_tokens",
    ),
    (
        "zero-prompt-len",
        _set("workload", "prompt_len", 0),
        "workload.prompt_len",
        "must be positive",
    ),
    (
        "zero-group-size",
        _set("quantization", "group_size", 0),
        "quantization.group_size",
        "must be positive",
    ),
    # schema version
    (
        "future-schema-version",
        _set("schema_version", 2),
        "schema_version",
        "2 is not supported (this pqctl reads 1)",
    ),
    (
        "zero-schema-version",
        _set("schema_version", 0),
        "schema_version",
        "0 is not supported (this pqctl reads 1)",
    ),
    # non-finite numbers (json.dumps writes them as NaN / Infinity, json.loads reads them back)
    (
        "nan-float",
        _set("prediction", "decode_s", float("nan")),
        "prediction.decode_s",
        "must be a finite number",
    ),
    (
        "infinity-float",
        _set("stages", 1, "predicted", "prefill_s", float("inf")),
        "stages[1].predicted.prefill_s",
        "must be a finite number",
    ),
    (
        "minus-infinity-optional-float",
        _set("quality", "budget", float("-inf")),
        "quality.budget",
        "must be a finite number",
    ),
    (
        "nan-int",
        _set("workload", "global_batch", float("nan")),
        "workload.global_batch",
        "expected int, got NaN",
    ),
    (
        "infinity-int",
        _set("stages", 0, "predicted", "memory_bytes", float("inf")),
        "stages[0].predicted.memory_bytes",
        "expected int, got Infinity",
    ),
]


@pytest.mark.parametrize(
    ("edit", "field", "problem"),
    [pytest.param(e, f, p, id=name) for name, e, f, p in BAD_EDITS],
)
def test_bad_plan_names_field_and_problem(edit: Edit, field: str, problem: str) -> None:
    data = plan_dict()
    edit(data)
    text = json.dumps(data)
    with pytest.raises(PlanValidationError) as info:
        Plan.from_json(text)
    assert (info.value.field, info.value.problem) == (field, problem)
    assert str(info.value) == f"invalid plan: {field}: {problem}"


def test_bad_plan_file_raises_on_load(tmp_path: Path) -> None:
    data = plan_dict()
    data["stages"][1]["layer_range"]["start"] = 13
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(PlanValidationError) as info:
        Plan.load(path)
    assert info.value.field == "stages[1].layer_range.start"


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        pytest.param("plan: yes", "<file>", "not JSON (Expecting value: line 1 column 1 (char 0))"),
        pytest.param(
            "{not json",
            "<file>",
            "not JSON (Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1))",
            id="broken-object",
        ),
        pytest.param("", "<file>", "not JSON (Expecting value: line 1 column 1 (char 0))"),
        pytest.param("[]", "plan", "expected an object, got a list", id="list"),
        pytest.param("null", "plan", "expected an object, got null", id="null"),
    ],
)
def test_text_that_is_not_a_plan_object(text: str, field: str, problem: str) -> None:
    with pytest.raises(PlanValidationError) as info:
        Plan.from_json(text)
    assert (info.value.field, info.value.problem) == (field, problem)


@pytest.mark.parametrize("name", ["holds_embedding", "holds_lm_head"])
def test_missing_stage_flag_is_reported_as_missing(name: str) -> None:
    data = plan_dict()
    del data["stages"][0][name]
    with pytest.raises(PlanValidationError) as info:
        Plan.from_dict(data)
    assert (info.value.field, info.value.problem) == (f"stages[0].{name}", "missing")


# --------------------------------------------------------------------------- validate() in memory


def _replace_stage(plan: Plan, k: int, **changes: Any) -> Plan:
    stages = list(plan.stages)
    stages[k] = dataclasses.replace(stages[k], **changes)
    return dataclasses.replace(plan, stages=tuple(stages))


@pytest.mark.parametrize(
    ("change", "field", "problem"),
    [
        pytest.param(
            lambda p: _replace_stage(p, 1, layer_range=LayerRange(10, 24)),
            "stages[1].layer_range.start",
            "is 10; ranges must be contiguous, expected 12",
            id="overlap",
        ),
        pytest.param(
            lambda p: _replace_stage(p, 0, layer_bits=(16,) * 11 + (6,)),
            "stages[0].layer_bits[11]",
            f"6 is not a precision {_ACCEPTED}",
            id="bits-six",
        ),
        pytest.param(
            lambda p: dataclasses.replace(p, micro_batching=MicroBatching(3, 16)),
            "micro_batching.prefill_size",
            f"3 {_DIVISOR}",
            id="prefill-not-divisor",
        ),
        pytest.param(
            lambda p: dataclasses.replace(p, stages=p.stages[:2]),
            "stages[1].holds_lm_head",
            "only the last stage holds the LM head",
            id="dropped-last-stage",
        ),
    ],
)
def test_validate_in_memory(change: Callable[[Plan], Plan], field: str, problem: str) -> None:
    with pytest.raises(PlanValidationError) as info:
        validate(change(make_plan()))
    assert (info.value.field, info.value.problem) == (field, problem)


def test_single_stage_plan_holds_both_ends() -> None:
    plan = make_plan()
    only = Stage(
        device=DeviceRef("node-a", 0, "A100-80G"),
        layer_range=LayerRange(0, 32),
        layer_bits=(8,) * 32,
        holds_embedding=True,
        holds_lm_head=True,
        predicted=plan.stages[0].predicted,
    )
    single = dataclasses.replace(plan, stages=(only,))
    validate(single)
    assert Plan.from_json(single.to_json()) == single
