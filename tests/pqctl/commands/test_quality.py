"""`pqctl calibrate`, `pqctl eval` and `pqctl plan --max-ppl-increase` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from planner.model_spec import load_model_spec
from planner.plan import Plan
from planner.quality_target import load_calibration
from pqctl.cli import app
from runtime.model.assets import builtin_model_dir
from tests.runtime.model.checkpoints import save_checkpoint, tiny_configs

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()
SHIPPED = builtin_model_dir() / "calibration.json"
# One small GPU: bard-tiny at 4 bits does not fit, so the plan mixes precisions.
TIGHT_GPU = """
[[hosts]]
name = "gpu"
[[hosts.devices]]
type = "T4"
memory_gib = 0.0033
runtime_reserve_gib = 0
usable_memory_fraction = 1.0
"""


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(autouse=True)
def _empty_stats_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty statistics directory: only shipped files apply."""
    monkeypatch.setenv("PQCTL_STATS_DIR", str(tmp_path / "stats"))


def test_a_plan_under_a_perplexity_target_meets_it_on_held_out_text(tmp_path: Path) -> None:
    cluster = tmp_path / "tight.toml"
    cluster.write_text(TIGHT_GPU, encoding="utf-8")
    plan_file = tmp_path / "plan.json"
    args = ("-c", str(cluster), "-b", "1", "-s", "32", "-n", "8", "--time-limit", "20")
    code, _, err = run("plan", *args, "--max-ppl-increase", "2%", "-o", str(plan_file))
    assert code == 0, err
    plan = Plan.load(plan_file)
    assert plan.quality.max_ppl_increase == 0.02 and plan.quality.indicator == "measured"
    assert plan.quality.predicted_ppl_increase is not None
    assert plan.quality.predicted_ppl_increase <= 0.02 + 1e-9
    assert len(set(plan.layer_bits)) > 1, plan.layer_bits  # genuinely mixed
    assert any(str(SHIPPED) in note for note in plan.notes)
    code, out, err = run(
        "eval", "--plan", str(plan_file), "--baseline", "--tokens", "8192", "--json"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["text"] == "held-out play hamlet, evaluation part"
    assert report["tokens"] == 8192
    assert 0 < report["increase"] <= 0.02 and report["meets_target"] is True, report


def test_calibrate_writes_where_plan_finds_it(tmp_path: Path) -> None:
    code, out, err = run("calibrate", "--tokens", "256", "--mixed-plans", "0", "--json")
    assert code == 0, err
    written = tmp_path / "stats" / "bard-tiny.json"
    assert json.loads(out)["path"] == str(written)
    # it said, before measuring, what the file replaces and the way back
    said = " ".join(err.split())
    assert f"{written} will replace the calibration shipped with pqctl for bard-tiny" in said
    assert f"rm {written}" in said
    code, _, err = run("calibrate", "--tokens", "256", "--mixed-plans", "0", "--json")
    assert code == 0 and f"{written} exists and will be replaced" in " ".join(err.split())
    loaded = load_calibration(written, load_model_spec(builtin_model_dir()))
    assert loaded.mapping is not None and loaded.mapping.tokens == 256
    assert [p.layer_bits[0] for p in loaded.mapping.points] == [8, 4, 3, 2]
    plan_file = tmp_path / "plan.json"
    code, _, err = run(
        "plan", "--max-ppl-increase", "0.05", "--time-limit", "10", "-o", str(plan_file)
    )
    assert code == 0, err
    assert any(str(written) in note for note in Plan.load(plan_file).notes)


def test_a_target_without_calibration_names_the_flag_and_the_remedy(tmp_path: Path) -> None:
    model = save_checkpoint(tiny_configs()["llama"], tmp_path / "tiny")
    code, _, err = run("plan", "-m", str(model), "--max-ppl-increase", "2%")
    assert code == 2
    assert "--max-ppl-increase" in err and "pqctl calibrate" in err


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("plan", "--quality", "0.1", "--max-ppl-increase", "1%"), "--max-ppl-increase"),
        (("plan", "--max-ppl-increase", "lots"), "--max-ppl-increase"),
        (("plan", "--max-ppl-increase", "-1%"), "--max-ppl-increase"),
        (("eval",), "--plan"),
        (("eval", "--bits", "4", "--plan", "p.json"), "--bits"),
        (("eval", "--bits", "5"), "--bits"),
        (("eval", "--bits", "4", "--part", "middle"), "--part"),
        (("eval", "--bits", "4", "--tokens", "0"), "--tokens"),
        (("eval", "--plan", "missing.json"), "--plan"),
        (("calibrate", "--seq-len", "0"), "--seq-len"),
        (("calibrate", "--mixed-plans", "-1"), "--mixed-plans"),
    ],
)
def test_bad_options_exit_2_naming_the_flag(args: tuple[str, ...], flag: str) -> None:
    code, _, err = run(*args)
    assert code == 2, err
    assert flag in err
