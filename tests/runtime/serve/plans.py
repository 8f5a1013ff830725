"""Plans for serving tests: a real plan from the planner, re-split into the stages a test wants.

Several stages on one machine need distinct devices in a plan: they are declared on the
loopback host names (``localhost``, ``127.0.0.1``, ``::1``), which ``pqctl apply`` serves here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from planner.catalogue import cpu_device_type
from planner.cluster import ClusterSpec, DeviceSpec, HostSpec
from planner.indicator import prior_indicator
from planner.make_plan import make_plan
from planner.model_spec import load_model_spec
from planner.plan import DeviceRef, LayerRange, MicroBatching, Plan, Stage, Workload
from planner.problem import PlanningProblem
from runtime.model.assets import BUILTIN_MODEL_NAME, builtin_model_dir

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def serving_plan(
    source: str,
    splits: list[int],
    bits: list[int] | int = 16,
    *,
    batch: int = 4,
    prompt_len: int = 32,
    max_new: int = 16,
    prefill: int = 2,
    decode: int = 2,
    group_size: int = 32,
) -> Plan:
    """A plan for ``source`` whose stage k runs layers [splits[k], splits[k+1]) on a loopback
    host's CPU, with per-layer ``bits`` and the given batch layout."""
    if source == BUILTIN_MODEL_NAME:
        model = replace(load_model_spec(builtin_model_dir()), source=BUILTIN_MODEL_NAME)
    else:
        model = load_model_spec(source)
    cpu = cpu_device_type(cores=2, memory_bytes=8 << 30, memory_bandwidth_gb_s=10, fp32_tflops=0.1)
    cluster = ClusterSpec("test", (HostSpec("localhost"),), (DeviceSpec("localhost", -1, cpu),))
    workload = Workload(batch, prompt_len, max_new, max_new)
    problem = PlanningProblem(
        model=model,
        cluster=cluster,
        workload=workload,
        indicator=prior_indicator(model, group_size),
        group_size=group_size,
    )
    base = make_plan(problem)
    layers = model.num_layers
    per_layer = [bits] * layers if isinstance(bits, int) else list(bits)
    bounds = [*splits, layers]
    template = base.stages[0]
    stages = tuple(
        Stage(
            DeviceRef(LOOPBACK_HOSTS[k], -1, template.device.device_type),
            LayerRange(bounds[k], bounds[k + 1]),
            tuple(per_layer[bounds[k] : bounds[k + 1]]),
            k == 0,
            k == len(splits) - 1,
            template.predicted,
        )
        for k in range(len(splits))
    )
    plan = replace(base, stages=stages, micro_batching=MicroBatching(prefill, decode))
    return Plan.from_json(plan.to_json())  # validated like a file


def on_hosts(plan: Plan, hosts: Sequence[str]) -> Plan:
    """``plan`` with stage k moved to ``hosts[k]`` (the same device index and type)."""
    stages = tuple(
        replace(s, device=replace(s.device, host=host))
        for s, host in zip(plan.stages, hosts, strict=True)
    )
    return replace(plan, stages=stages)


def write_plan(plan: Plan, directory: Path, name: str = "plan.json") -> Path:
    path = directory / name
    plan.save(path)
    return path
