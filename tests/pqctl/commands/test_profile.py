"""`pqctl profile` as a user runs it, and `pqctl plan` picking its files up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.plan import Plan
from planner.profiles import (
    LatencyProfile,
    LatencySample,
    load_profile,
    load_profiles,
    save_profile,
    shape_key,
)
from pqctl.cli import app
from pqctl.device_profiles import CPU_TYPE_NAME, profile_file_name
from pqctl.plan_inputs import PlanRequest, build_problem, figures_source, resolve_model

runner = CliRunner()
TINY_GRID = (
    "--prefill-batches", "1,2", "--prompt-lens", "8,16,32",
    "--decode-batches", "1,2", "--contexts", "16,32", "--repeats", "1", "--threads", "1",
)  # fmt: skip
PLAN = ("plan", "--local", "--time-limit", "20", "--json")


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in model profiled on this CPU at 16 and 4 bits, on a tiny grid."""
    out = tmp_path_factory.mktemp("profiles")
    code, stdout, stderr = run(
        "profile", "-d", "cpu", "--bits", "16,4", "-o", str(out), *TINY_GRID, "--json"
    )
    assert code == 0, stderr
    # without a terminal: what it will do up front, then progress one line at a time, the
    # last with every sample done
    assert "profiling cpu at 16,4 bits: 10 grid points per precision" in stderr, stderr
    assert re.search(r"^profiling cpu: (\d+)/\1 samples, [\d.]+ s$", stderr, re.M), stderr
    report = json.loads(stdout)
    assert [r["device_type"] for r in report] == [CPU_TYPE_NAME]
    assert {(e["fit"], e["phase"]) for e in report[0]["fit_error"]} >= {
        ("16 bits", "prefill"), ("4 bits", "decode"), ("head", "decode"),
    }  # fmt: skip
    return out


def test_profile_writes_one_file_per_device_type_and_shape(profiled: Path) -> None:
    shape = shape_key(resolve_model(None))
    files = list(profiled.glob("*.json"))
    assert [f.name for f in files] == [profile_file_name(CPU_TYPE_NAME, shape)]
    profile = load_profile(files[0])
    assert profile.device_type == CPU_TYPE_NAME and profile.shape == shape
    assert profile.covers(16) and profile.covers(4) and not profile.covers(8)
    assert profile.transfer is not None and profile.transfer.bandwidth_gb_s > 0
    assert {part for part, _ in profile.end_fits} == {"stage", "embedding", "head"}
    data = json.loads(files[0].read_text())
    assert data["version"] == 1 and data["measured"]["threads"] == 1
    save_profile(profile, profiled / "copy.json")  # the round trip keeps every section
    again = json.loads((profiled / "copy.json").read_text())
    (profiled / "copy.json").unlink()
    assert again == data


def test_plan_uses_the_profile_and_falls_back_to_the_datasheet(
    profiled: Path, tmp_path: Path
) -> None:
    problem, _ = build_problem(PlanRequest(profile_dir=profiled))
    assert set(figures_source(problem).values()) == {"profile"}
    problem, _ = build_problem(PlanRequest(profile_dir=tmp_path))
    assert set(figures_source(problem).values()) == {"datasheet"}
    code, out, err = run("plan", "--local", "--time-limit", "20", "--profiles", str(profiled))
    assert code == 0, err
    assert "latency figures: profile for" in out
    code, out, err = run("plan", "--local", "--time-limit", "20", "--profiles", str(tmp_path))
    assert code == 0, err
    assert "latency figures: datasheet" in out


def test_default_profile_dir_is_where_profile_writes_and_plan_looks(
    profiled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PQCTL_PROFILE_DIR", str(profiled))
    assert load_profiles() and build_problem(PlanRequest())[0].profiles


def _hand_written(unavailable: tuple[int, ...]) -> LatencyProfile:
    """3 bits ten times faster than every other precision, unless marked unavailable."""
    samples = [
        LatencySample(phase, bits, b, n, (0.1 if bits == 3 else 1.0) * 1e-3 * b * (1 + n / 64))
        for bits in (16, 8, 4, 3, 2)
        for phase in ("prefill", "decode")
        for b in (1, 2, 4, 8)
        for n in (32, 128, 256)
    ]
    shape = shape_key(resolve_model(None))
    return LatencyProfile.from_samples(CPU_TYPE_NAME, shape, samples, unavailable)


@pytest.mark.parametrize("unavailable", [(), (3,)])
def test_a_precision_marked_unavailable_is_never_assigned(
    tmp_path: Path, unavailable: tuple[int, ...]
) -> None:
    save_profile(_hand_written(unavailable), tmp_path / "cpu.json")
    code, out, err = run(*PLAN, "--quality", "-1", "--profiles", str(tmp_path))
    assert code == 0, err
    used = {b for stage in Plan.from_json(out).stages for b in stage.layer_bits}
    assert (3 in used) == (not unavailable)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("--bits", "16,5"), "--bits"),
        (("--device", "gpu"), "--device"),
        (("--device", "cuda:7"), "--device"),
        (("--time-budget", "0"), "--time-budget"),
        (("--grid", "huge"), "--grid"),
        (("--prompt-lens", "8,x"), "--prompt-lens"),
        (("--prefill-batches", "1", "--prompt-lens", "8,16"), "--prefill-batches"),
        (("--repeats", "0"), "--repeats"),
        (("--threads", "0"), "--threads"),
        (("--model", "/no/such/model"), "--model"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(
    tmp_path: Path, args: tuple[str, ...], flag: str
) -> None:
    code, _, err = run("profile", "-o", str(tmp_path), *args)
    assert code == 2
    assert flag in err
    assert not list(tmp_path.glob("*.json"))
