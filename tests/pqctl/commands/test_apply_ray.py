"""`pqctl apply --ray` as an operator runs it: a real 3-node Ray cluster in a network namespace
of its own (``tests.ray_cluster``), a stage on each host, CURVE keys on every socket, the CLI's
own processes (``apply``, ``generate``, ``stop``), greedy tokens against transformers, and a
stage process killed with SIGKILL in the middle of a generation."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig

from planner.plan import Plan
from runtime.model.assets import BUILTIN_MODEL_NAME, builtin_model_dir
from tests.ray_cluster import RayNamespace
from tests.runtime.model.checkpoints import save_checkpoint
from tests.runtime.serve.plans import on_hosts, serving_plan

pytestmark = pytest.mark.multiproc
ROOT = Path(__file__).resolve().parents[3]
PQCTL = [sys.executable, "-m", "pqctl"]
HOSTS = ("hostA", "hostB", "hostC")
PROMPTS = ["ROMEO:", "HAMLET:\nTo be, or not to be"]


def transformers_greedy(prompt: str, new: int, directory: Path | None = None) -> list[int]:
    """transformers `generate` of the checkpoint (the built-in model by default), greedy, fp32."""
    directory = directory or builtin_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, ids["input_ids"].shape[1] :].tolist()  # type: ignore[no-any-return]


def three_stage_plan() -> Plan:
    """The built-in model in three stages on CPUs, 16 bits (on this host's loopback names)."""
    return serving_plan(BUILTIN_MODEL_NAME, [0, 3, 6], batch=4, prefill=2, decode=2, max_new=480)


def three_host_plan(directory: Path) -> Path:
    """The same stages, one on each host of the Ray cluster."""
    path = directory / "plan.json"
    on_hosts(three_stage_plan(), HOSTS).save(path)
    return path


class Cli:
    """pqctl commands inside the cluster's namespace, with a state directory of their own."""

    def __init__(self, cluster: RayNamespace, state: Path, keys: Path, name: str = "rayt") -> None:
        self.cluster, self.keys, self.name = cluster, keys, name
        self.env = {**cluster.env, "COLUMNS": "200", "PQCTL_STATE_DIR": str(state)}

    def run(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return self.cluster.run([*PQCTL, *args], timeout_s=timeout_s, cwd=ROOT, env=self.env)

    def run_module(self, module: str, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.cluster.run(
            [sys.executable, "-m", module, *args], timeout_s=120, cwd=ROOT, env=self.env
        )
        assert done.returncode == 0, done.stderr
        return done

    def generate(
        self, prompt: str, new: int, timeout_s: float = 60, as_json: bool = True
    ) -> list[str]:
        return [
            *PQCTL,
            "generate",
            "--name",
            self.name,
            "--keys",
            str(self.keys),
            "--max-new",
            str(new),
            "--ignore-eos",
            "--json" if as_json else "--stream",
            "--timeout",
            str(timeout_s),
            prompt,
        ]


def worker_pid(cluster: RayNamespace, stage: int) -> int:
    """The stage worker process of ``stage`` in the cluster's namespace."""
    for pid in cluster.processes():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"runtime.serve.worker" in argv
            and argv[argv.index(b"--stage") + 1] == str(stage).encode()
        ):
            return pid
    raise AssertionError(f"no worker of stage {stage} in the namespace")


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def tokens(done: subprocess.CompletedProcess[str]) -> list[int]:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[0])["token_ids"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def expected_tokens() -> dict[str, list[int]]:
    """Greedy tokens of transformers `generate` for each prompt: what the 16-bit stages must
    give, wherever they run."""
    return {p: transformers_greedy(p, 12) for p in PROMPTS}


def test_apply_over_ray_serves_exactly_on_three_hosts_and_survives_a_killed_stage(
    ray_cluster: RayNamespace, tmp_path: Path, expected_tokens: dict[str, list[int]]
) -> None:
    """Greedy tokens equal transformers `generate` of the same checkpoint."""
    keys = tmp_path / "keys"
    cli = Cli(ray_cluster, tmp_path / "state", keys)
    assert cli.run("keys", "init", str(keys)).returncode == 0
    plan = three_host_plan(tmp_path)
    started = cli.run(
        "apply", str(plan), "--ray", ray_cluster.address, "--detach", "--name", "rayt",
        "--keys", str(keys), "--endpoint", "tcp://127.0.0.1:*",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        assert "serving bard-tiny (3 stages)" in started.stderr + started.stdout
        for prompt in PROMPTS:  # greedy, through the CLI, CURVE on every socket
            done = cli.cluster.run(cli.generate(prompt, 12), cwd=ROOT, env=cli.env)
            assert tokens(done) == expected_tokens[prompt], prompt
        # each stage's log, written on its node, is followed into apply's log directory
        logs = tmp_path / "state" / "logs" / "rayt"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            f"stage {i}: ready in" in _text(logs / f"stage-{i}.log") for i in range(3)
        ):
            time.sleep(0.2)
        for i, host in enumerate(HOSTS):
            assert f"stage {i}: ready in" in _text(logs / f"stage-{i}.log"), i
            assert f"on {host}/cpu" in _text(logs / f"stage-{i}.log"), i

        long = ray_cluster.popen(
            cli.generate("ROMEO:", 470, timeout_s=60, as_json=False),
            cwd=ROOT,
            env=cli.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert long.stdout is not None
        ready, _, _ = select.select([long.stdout], [], [], 60)
        assert ready and long.stdout.read(1), "no token streamed"  # the request is in flight
        victim = worker_pid(ray_cluster, 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = long.communicate(timeout=30)
        assert time.monotonic() - killed <= 3.0, "the in-flight request was not failed in 3 s"
        assert long.returncode != 0
        assert "stage 1" in err and "hostB" in err, err

        deadline, answered = time.monotonic() + 120, None
        while time.monotonic() < deadline:  # restarted by Ray on hostB, no operator action
            done = cli.cluster.run(cli.generate(PROMPTS[0], 12), cwd=ROOT, env=cli.env)
            if done.returncode == 0:
                answered = done
                break
            time.sleep(1)
        assert answered is not None, "no answer after the stage was killed"
        assert tokens(answered) == expected_tokens[PROMPTS[0]]
        assert worker_pid(ray_cluster, 1) != victim
        seen = cli.run_module("tests.pqctl.commands.ray_monitor", "rayt")
        stages = json.loads(seen.stdout.splitlines()[-1])
        assert [s["restarts"] for s in stages] == [0, 1, 0]  # what apply's table shows
        assert all(s["metrics"] for s in stages), stages  # every host's stage reports
        assert all(s["metrics_endpoint"].startswith("tcp://127.0.0.1:") for s in stages)
    finally:
        stopped = cli.run("stop", "--name", "rayt", timeout_s=60)
    assert stopped.returncode == 0, stopped.stderr
    time.sleep(1)
    with pytest.raises(AssertionError, match="no worker"):
        worker_pid(ray_cluster, 0)


def tiny_opt(directory: Path) -> Path:
    """A random OPT checkpoint built by transformers (6 layers, the built-in tokenizer)."""
    config = OPTConfig(
        vocab_size=4096,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    save_checkpoint(config, directory, seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(builtin_model_dir() / name, directory / name)
    return directory


def test_a_transformers_built_checkpoint_serves_alike_on_three_hosts_and_on_one(
    ray_cluster: RayNamespace, tmp_path: Path
) -> None:
    """A checkpoint saved by transformers (OPT), planned by path: three stages on three Ray
    hosts give the greedy tokens the same stages give on one host, and transformers gives."""
    model = tiny_opt(tmp_path / "tiny-opt")
    base = serving_plan(str(model), [0, 2, 4], batch=4, prefill=2, decode=2, max_new=32)
    base.save(tmp_path / "one.json")
    on_hosts(base, HOSTS).save(tmp_path / "three.json")
    keys = tmp_path / "keys"
    got = {}
    for plan, name, ray in (
        ("one.json", "one", None),
        ("three.json", "three", ray_cluster.address),
    ):
        cli = Cli(ray_cluster, tmp_path / "state", keys, name=name)
        if not keys.exists():
            assert cli.run("keys", "init", str(keys)).returncode == 0
        extra = ["--ray", ray] if ray else []
        started = cli.run(
            "apply", str(tmp_path / plan), *extra, "--detach", "--name", name,
            "--keys", str(keys), "--endpoint", "tcp://127.0.0.1:*",
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        try:
            got[name] = [
                tokens(ray_cluster.run(cli.generate(p, 12), cwd=ROOT, env=cli.env)) for p in PROMPTS
            ]
        finally:
            assert cli.run("stop", "--name", name, timeout_s=60).returncode == 0
    assert got["three"] == got["one"] == [transformers_greedy(p, 12, model) for p in PROMPTS]


def test_apply_over_ray_refuses_a_plan_naming_a_host_ray_does_not_have(
    ray_cluster: RayNamespace, tmp_path: Path
) -> None:
    plan = Plan.load(three_host_plan(tmp_path))
    stages = (replace(plan.stages[0], device=replace(plan.stages[0].device, host="hostZ")),)
    moved = replace(plan, stages=stages + plan.stages[1:])
    moved.save(tmp_path / "moved.json")
    cli = Cli(ray_cluster, tmp_path / "state", tmp_path / "keys")
    done = cli.run("apply", str(tmp_path / "moved.json"), "--ray", ray_cluster.address)
    assert done.returncode == 2
    assert "hostZ" in done.stderr and "hostA, hostB, hostC" in done.stderr


def test_losing_a_host_replans_on_the_hosts_left_and_serves_exactly_again(
    tmp_path: Path, expected_tokens: dict[str, list[int]]
) -> None:
    """A cluster of its own (the shared one keeps its three hosts): hostC is removed while
    ``apply --replan-on-loss`` serves in the foreground; requests meanwhile are refused as
    re-planning at once (none hangs), apply shows the old and new stages, and the plan re-made
    on hostA and hostB serves the same greedy tokens again."""
    plan = Plan.load(three_host_plan(tmp_path))
    strict = replace(plan, quality=replace(plan.quality, budget=0.0))  # 16 bits after re-plan
    strict.save(tmp_path / "plan.json")
    out = tmp_path / "apply.out"
    with RayNamespace(HOSTS) as cluster:
        cli = Cli(cluster, tmp_path / "state", tmp_path / "keys")
        assert cli.run("keys", "init", str(cli.keys)).returncode == 0
        with open(out, "w") as sink:
            apply = cluster.popen(
                [*PQCTL, "apply", str(tmp_path / "plan.json"), "--ray", cluster.address,
                 "--replan-on-loss", "--name", "rayt", "--keys", str(cli.keys),
                 "--endpoint", "tcp://127.0.0.1:*"],
                cwd=ROOT, env=cli.env, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
        asking = None
        try:
            deadline = time.monotonic() + 120
            while "serving bard-tiny" not in out.read_text() and time.monotonic() < deadline:
                assert apply.poll() is None, out.read_text()
                time.sleep(0.2)
            asking = cluster.popen(
                [sys.executable, "-m", "tests.pqctl.commands.ray_requests", "rayt",
                 str(cli.keys), PROMPTS[1]],
                cwd=ROOT, env=cli.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            assert asking.stdout is not None
            ready, _, _ = select.select([asking.stdout], [], [], 60)
            assert ready and asking.stdout.readline().strip() == "ready"
            cluster.remove("hostC")
            report, err = asking.communicate(timeout=200)
            seen = json.loads(report.splitlines()[-1])
            assert seen["tokens"] == expected_tokens[PROMPTS[1]], (seen, err)
            codes = [code for code, _ in seen["refusals"]]
            assert "replanning" in codes, seen  # refused while the plan was re-made
            assert set(codes) <= {"replanning", "stage_failed"}, seen
            assert max(took for _, took in seen["refusals"]) < 5, seen  # at once, not hung
            state = json.loads(next((tmp_path / "state").glob("*.json")).read_text())
            replanned = Plan.load(Path(state["plan"]))
            assert {s.device.host for s in replanned.stages} <= {"hostA", "hostB"}
            assert all(b == 16 for s in replanned.stages for b in s.layer_bits)
        finally:
            if asking is not None and asking.poll() is None:
                asking.kill()
            apply.send_signal(signal.SIGINT)
            code = apply.wait(timeout=60)
        shown = out.read_text()
        assert code == 130, shown
        assert "re-planning: lost hostC" in shown or "lost hostC" in shown, shown
        assert "re-planned: stage 0: hostA/cpu" in shown and "->" in shown, shown
