"""Plan files a user (or an attacker) hands ``pqctl show`` and ``pqctl apply``: every plan the
runtime cannot serve is refused before any process starts, exit 2, naming the field."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from runtime.cluster.discovery import discover_gpus
from tests.pqctl.commands.test_serve import pqctl
from tests.runtime.serve.plans import serving_plan

pytestmark = pytest.mark.multiproc


def _plan() -> dict[str, Any]:
    return serving_plan("bard-tiny", [0, 4], batch=4).to_dict()


def _edit(change: Callable[[dict[str, Any]], None]) -> bytes:
    data = _plan()
    change(data)
    return json.dumps(data).encode()


def _set(*path: Any) -> Callable[[dict[str, Any]], None]:
    *keys, last, value = path

    def change(data: dict[str, Any]) -> None:
        for key in keys:
            data = data[key]
        data[last] = value

    return change


def _big_int(data: dict[str, Any]) -> bytes:
    text = json.dumps(data)
    return text.replace('"global_batch": 4', '"global_batch": ' + "7" * 5000).encode()


# (case, file bytes, what the error names); show refuses these too
FILE_CASES = [
    ("non-utf8", b'\xff\xfe{"schema_version": 1}', "<file>: not UTF-8"),
    ("deep-nesting", b"[" * 100_000 + b"]" * 100_000, "<file>: nested too deeply"),
    ("5000-digit-int", _big_int(_plan()), "<file>: an integer of 5000 digits"),
    (
        "baseline-zero-throughput",
        _edit(_set("baselines", 0, "throughput_tokens_per_s", 0)),
        "baselines[0].throughput_tokens_per_s: 0 must be positive",
    ),
    (
        "unknown-scheme",
        _edit(_set("quantization", "scheme", "gptq")),
        "quantization.scheme: 'gptq' is not a scheme",
    ),
    (
        "group-not-dividing",
        _edit(_set("quantization", "group_size", 100)),
        "quantization.group_size: 100 does not divide model.hidden_size 192",
    ),
    (
        "huge-global-batch",
        _edit(_set("workload", "global_batch", 10**9)),
        "workload.global_batch: 1000000000 is more than any plan holds",
    ),
    (
        "device-index",
        _edit(_set("stages", 0, "device", "index", -2)),
        "stages[0].device.index: -2",
    ),
    (
        "kv-heads",
        _edit(_set("model", "num_kv_heads", 4)),
        "model.num_kv_heads: 4 must divide model.num_heads 6",
    ),
]


@pytest.mark.parametrize(("case", "content", "named"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_show_and_apply_refuse_a_broken_plan_naming_the_field(
    tmp_path: Path, case: str, content: bytes, named: str
) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(content)
    for command in ("show", "apply"):
        out = pqctl(tmp_path / "state", command, str(path), timeout=60)
        assert out.returncode == 2, (command, out.stderr)
        assert "Traceback" not in out.stderr
        assert named in " ".join(out.stderr.split()), (command, out.stderr)
    assert not (tmp_path / "state").exists() or not list((tmp_path / "state").glob("*.json"))


def test_apply_refuses_a_plan_for_another_shape_of_its_model_before_starting(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(_edit(_set("model", "intermediate_size", 1024)))
    assert pqctl(tmp_path / "state", "show", str(path)).returncode == 0  # a valid plan…
    out = pqctl(tmp_path / "state", "apply", str(path), "--detach")
    assert out.returncode == 2, out.stderr  # …for another model: refused before the gateway
    assert "model.intermediate_size is 1024 but the checkpoint" in " ".join(out.stderr.split())
    assert not (tmp_path / "state" / "logs").exists()


def test_apply_refuses_a_family_it_does_not_serve(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    config = {"model_type": "mamba", "num_hidden_layers": 8}
    (checkpoint / "config.json").write_text(json.dumps(config))
    path = tmp_path / "plan.json"
    path.write_bytes(_edit(_set("model", "source", str(checkpoint))))
    out = pqctl(tmp_path / "state", "apply", str(path), "--detach")
    assert out.returncode == 2, out.stderr
    assert "mamba" in out.stderr and "Traceback" not in out.stderr


def test_apply_refuses_a_family_no_stage_serves(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(_edit(_set("model", "family", "rwkv")))
    out = pqctl(tmp_path / "state", "apply", str(path))
    assert out.returncode == 2 and "the plan is for a rwkv model" in out.stderr


@pytest.mark.skipif(bool(discover_gpus().gpus), reason="this host has an NVIDIA GPU")
def test_apply_refuses_a_gpu_stage_on_a_host_without_one(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(_edit(_set("stages", 1, "device", "index", 0)))
    out = pqctl(tmp_path / "state", "apply", str(path), "--detach")
    assert out.returncode == 2, out.stderr
    assert "stages[1].device is 127.0.0.1/cuda:0 but this host has no GPU" in " ".join(
        out.stderr.split()
    )


def test_apply_names_endpoint_when_its_port_is_taken(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(_edit(lambda _: None))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        endpoint = f"tcp://127.0.0.1:{port}"
        out = pqctl(tmp_path / "state", "apply", str(path), "--detach", "--endpoint", endpoint)
    assert out.returncode == 2, out.stderr
    text = " ".join(out.stderr.split())
    assert f"--endpoint: cannot listen on {endpoint}" in text
    for bad in ("http://127.0.0.1:80", "tcp://127.0.0.1"):
        out = pqctl(tmp_path / "state", "apply", str(path), "--endpoint", bad)
        assert out.returncode == 2 and "--endpoint" in out.stderr, out.stderr
