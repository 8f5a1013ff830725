"""Re-planning a deployment after it lost a host: ``pqctl plan --ray`` run as a process (the
planner is the command line's, not the runtime's) on what the Ray cluster still has, with the
running plan's model, workload, quality target, θ and quantization group size.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from planner.plan import Plan, PlanValidationError
from runtime.errors import RuntimeFailure
from runtime.serve.launcher import child_env, log_tail


class ReplanFailed(RuntimeFailure):
    """The planner found no plan on the hosts left (or could not run)."""

    title = "re-planning failed"


def plan_command(plan: Plan, ray_address: str, output: Path) -> list[str]:
    """``pqctl plan --ray`` for the same model, workload and quality target as ``plan``."""
    w, q = plan.workload, plan.quality
    args = [sys.executable, "-m", "pqctl", "plan", "--ray", ray_address, "-m", plan.model.source]
    args += ["--batch", str(w.global_batch), "--prompt-len", str(w.prompt_len)]
    args += ["--max-new", str(w.max_new_tokens), "--expected-new", str(w.expected_new_tokens)]
    if q.max_ppl_increase is not None:
        args += ["--max-ppl-increase", repr(q.max_ppl_increase)]
    else:
        args += ["--quality", repr(q.budget) if q.budget is not None else "-1"]
    args += ["--theta", repr(q.theta_s), "--group-size", str(plan.quantization.group_size)]
    return [*args, "-o", str(output), "--json"]


def stage_summary(plan: Plan) -> list[str]:
    """One line per stage: device, layers, precisions."""
    lines = []
    for k, s in enumerate(plan.stages):
        r = s.layer_range
        bits = "/".join(str(b) for b in sorted(set(s.layer_bits), reverse=True))
        lines.append(f"stage {k}: {s.device.key} layers {r.start}–{r.stop - 1} at {bits} bits")
    return lines


class Replanner:
    """One re-planning at a time: :meth:`start` launches the planner, :meth:`poll` (from the
    gateway's loop, never blocking) says when the new plan is ready."""

    def __init__(self, ray_address: str, directory: Path, timeout_s: float = 300.0) -> None:
        self.ray_address, self.directory, self.timeout_s = ray_address, directory, timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.count = 0
        self.output = directory / "replan.json"
        self.log = directory / "replan.log"

    def start(self, plan: Plan, lost: Sequence[str]) -> None:
        self.count += 1
        self.output = self.directory / f"replan-{self.count}.json"
        with open(self.log, "ab") as out:
            out.write(f"--- re-planning without {', '.join(lost)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                plan_command(plan, self.ray_address, self.output),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=out,
                env=child_env(),
            )
        self.started = time.monotonic()

    def poll(self) -> Path | None:
        """The new plan's file once the planner is done; None while it runs.

        Raises:
            ReplanFailed: the planner failed or ran out of time (its last lines say why).
        """
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            if time.monotonic() - self.started <= self.timeout_s:
                return None
            self.process.kill()
            self.process.wait(timeout=10)
            code = -9
        self.process = None
        if code != 0:
            raise ReplanFailed(log_tail(self.log, 4) or f"pqctl plan exited with {code}")
        try:
            Plan.load(self.output)
        except (PlanValidationError, OSError) as exc:
            raise ReplanFailed(f"{self.output}: {exc}") from exc
        return self.output
