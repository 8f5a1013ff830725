"""Random small planning instances and an exhaustive reference solver for them."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

import numpy as np

from planner.catalogue import gpu_device_type, lookup_device_type
from planner.cluster import ClusterSpec, DeviceSpec, HostSpec, LinkSpec
from planner.indicator import QualityIndicator, prior_indicator
from planner.model_spec import ModelSpec
from planner.plan import Workload
from planner.problem import CostTables, PlanningProblem, build_tables
from planner.simulator import StageAssignment, evaluate


def small_model(num_layers: int, tied: bool = True) -> ModelSpec:
    """A Llama-shaped model small enough that memory limits bite at a few GiB."""
    return ModelSpec(
        source="test",
        family="llama",
        num_layers=num_layers,
        hidden_size=1024,
        intermediate_size=2816,
        num_heads=16,
        num_kv_heads=8,
        head_dim=64,
        vocab_size=8000,
        max_positions=4096,
        tied_embeddings=tied,
        gated_mlp=True,
        attention_bias=False,
        output_bias=False,
        mlp_bias=False,
        position_table_rows=0,
        embed_dim=1024,
        norm_bias=False,
    )


def random_problem(rng: random.Random, per_layer: bool) -> PlanningProblem:
    """2–4 layers, 1–3 devices of two types over two hosts, 2–3 precisions, batch 4."""
    num_layers = rng.randint(2, 4)
    kinds = [
        gpu_device_type(
            "fast",
            rng.uniform(1.08, 1.22),
            rng.choice([300, 900]),
            rng.choice([10, 60]),
            peer_bandwidth_gb_s=12,
        ),
        gpu_device_type(
            "slow",
            rng.uniform(1.08, 1.3),
            300,
            30,
            fast_kernel_bits=frozenset({8, 16}),
            peer_bandwidth_gb_s=12,
        ),
    ]
    hosts = ("h0", "h1")
    devices = tuple(
        DeviceSpec(rng.choice(hosts), i, rng.choice(kinds)) for i in range(rng.randint(1, 3))
    )
    cluster = ClusterSpec(
        "random",
        tuple(HostSpec(h) for h in hosts),
        devices,
        default_link=LinkSpec(rng.choice([1.0, 10.0]), rng.choice([1e-5, 1e-3])),
    )
    model = small_model(num_layers, tied=rng.random() < 0.5)
    indicator = prior_indicator(model, 128)
    if per_layer:
        scale = np.array([[rng.uniform(0.3, 3.0)] for _ in range(num_layers)])
        indicator = QualityIndicator("random", indicator.omega * scale)
    bits = tuple(sorted(rng.sample([16, 8, 4, 3, 2], rng.randint(2, 3)), reverse=True))
    max_new = rng.choice([8, 64])
    return PlanningProblem(
        model=model,
        cluster=cluster,
        workload=Workload(4, rng.choice([64, 256]), max_new, rng.randint(1, max_new)),
        indicator=indicator,
        bits=bits,
        quality_budget=rng.choice([None, 0.02, 0.1, 0.5]),
        theta_s=rng.choice([0.0, 0.05, 1.0]),
    )


def contiguous_plans(tables: CostTables) -> list[tuple[StageAssignment, ...]]:
    """Every contiguous partition (devices may be empty) × every per-layer precision."""
    num_layers, plans = tables.num_layers, []
    for counts in itertools.product(range(num_layers + 1), repeat=tables.num_devices):
        if sum(counts) != num_layers:
            continue
        for bits in itertools.product(tables.bits, repeat=num_layers):
            stages, start = [], 0
            for j, count in enumerate(counts):
                if count:
                    stages.append(StageAssignment(j, tuple(bits[start : start + count])))
                    start += count
            plans.append(tuple(stages))
    return plans


def brute_force(tables: CostTables) -> float:
    """Least objective of any feasible plan of ``tables`` (inf when none is feasible)."""
    best = math.inf
    for stages in contiguous_plans(tables):
        allowed = all(
            tables.allowed(s.position, tables.bits.index(b)) for s in stages for b in s.layer_bits
        )
        ev = evaluate(tables, stages)
        if allowed and ev.feasible:
            best = min(best, ev.objective)
    return best


def brute_force_search(problem: PlanningProblem, orders: Sequence[Sequence[DeviceSpec]]) -> float:
    """Least objective over ``orders`` × micro-batch choices × partitions × precisions."""
    return min(
        (
            brute_force(build_tables(problem, order, p, d))
            for order in orders
            for p, d in problem.micro_batch_choices()
        ),
        default=math.inf,
    )


SYNTHETIC_TYPES = ("T4", "V100-32G", "A100-40G", "A100-80G", "L4", "H100-80G")
SYNTHETIC_SIZES = {8: (4, 2), 16: (4, 4), 32: (5, 8), 64: (6, 16)}
"""Synthetic cluster sizes: devices → (device types, hosts)."""


def synthetic_cluster(devices: int) -> ClusterSpec:
    """``devices`` GPUs (8, 16, 32 or 64), four a host; even hosts hold one type, odd hosts two
    (2 + 2); racks of four hosts, 100 Gbit/s inside a rack, 25 Gbit/s between racks."""
    types, hosts = SYNTHETIC_SIZES[devices]
    names = [f"node-{h:02d}" for h in range(hosts)]
    specs: list[DeviceSpec] = []
    kind = 0
    for h, name in enumerate(names):
        kinds = [SYNTHETIC_TYPES[kind % types]] * 4
        kind += 1
        if h % 2 == 1:
            kinds[2:] = [SYNTHETIC_TYPES[kind % types]] * 2
            kind += 1
        specs += [DeviceSpec(name, i, lookup_device_type(t)) for i, t in enumerate(kinds)]
    rack_link = LinkSpec(bandwidth_gb_s=100 / 8, latency_s=10e-6)
    cross_link = LinkSpec(bandwidth_gb_s=25 / 8, latency_s=30e-6)
    links = {
        frozenset((a, b)): rack_link if i // 4 == j // 4 else cross_link
        for i, a in enumerate(names)
        for j, b in enumerate(names)
        if i < j
    }
    return ClusterSpec(
        f"synthetic-{devices}",
        tuple(HostSpec(n) for n in names),
        tuple(specs),
        links=links,
        default_link=cross_link,
    )
