"""Property tests of plan files: whatever bytes or JSON a plan file holds, reading it either
gives a plan that ``pqctl show`` renders or a PlanValidationError naming a field, never another
exception."""

from __future__ import annotations

import io
import json
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from planner.plan import Plan, PlanValidationError
from pqctl.render.plan import render_plan
from tests.runtime.serve.plans import serving_plan

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@cache
def _valid_text() -> str:
    return serving_plan("bard-tiny", [0, 4], batch=4).to_json()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a member of ``node`` (objects' keys, lists' indices)."""
    out: list[tuple[Any, ...]] = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _accepts_or_names_a_field(text: str) -> None:
    try:
        plan = Plan.from_json(text)
    except PlanValidationError as exc:
        assert exc.field and exc.problem
        return
    console = Console(file=io.StringIO(), width=120)
    console.print(render_plan(plan, {}))  # what pqctl show prints


@SETTINGS
@given(data=st.data(), how=st.sampled_from(["replace", "delete", "add"]))
def test_a_mutated_plan_is_read_or_refused_naming_a_field(data: st.DataObject, how: str) -> None:
    plan = json.loads(_valid_text())
    path = data.draw(st.sampled_from(_paths(plan)))
    parent = plan
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if how == "replace":
        parent[last] = data.draw(json_values)
    elif how == "delete":
        del parent[last]
    elif isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(json_values)
    else:
        parent.append(data.draw(json_values))
    _accepts_or_names_a_field(json.dumps(plan))


@SETTINGS
@given(value=st.integers(min_value=-(2**70), max_value=2**70), data=st.data())
def test_any_integer_in_any_numeric_field_is_read_or_refused(
    value: int, data: st.DataObject
) -> None:
    plan = json.loads(_valid_text())
    numeric = [
        p
        for p in _paths(plan)
        if isinstance(_at(plan, p), int | float) and not isinstance(_at(plan, p), bool)
    ]
    path = data.draw(st.sampled_from(numeric))
    parent = _at(plan, path[:-1])
    parent[path[-1]] = value
    _accepts_or_names_a_field(json.dumps(plan))


def _at(node: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        node = node[key]
    return node


@SETTINGS
@given(raw=st.binary(max_size=400), cut=st.integers(min_value=0, max_value=4000))
def test_any_bytes_in_a_plan_file_are_refused_or_read(
    tmp_path_factory: Any, raw: bytes, cut: int
) -> None:
    path: Path = tmp_path_factory.mktemp("plans") / "plan.json"
    valid = _valid_text().encode()
    for content in (raw, valid[:cut] + raw, valid[:cut] + raw + valid[cut:]):
        path.write_bytes(content)
        try:
            Plan.load(path)
        except PlanValidationError as exc:
            assert exc.field
