"""``pqctl cluster``: the devices of every host and the links between hosts, from this host
(NVML, else its CPU) or from every node of a Ray cluster (``--ray``), as a table, JSON, or a
cluster file that plans the same cluster without Ray (``--save``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.table import Table

from planner.cluster import GIB, ClusterSpec
from planner.cluster_file import cluster_toml
from planner.errors import PlannerError
from pqctl.commands.options import RAY_OPTION_HELP, say_step
from pqctl.exits import EXIT_BAD_INPUT, fail
from pqctl.plan_inputs import ResolvedCluster, resolve_cluster
from pqctl.render.console import make_console


def cluster(
    ray: Annotated[str | None, typer.Option("--ray", help=RAY_OPTION_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the cluster as JSON.")] = False,
    save: Annotated[
        Path | None,
        typer.Option(
            "--save",
            help="Write the cluster as a cluster file (TOML) that pqctl plan --cluster reads.",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Show the cluster pqctl would plan for: every host's GPUs (or its CPU) and the links."""
    try:
        resolved = resolve_cluster(None, ray, progress=say_step)
    except PlannerError as exc:
        raise fail(exc.title, exc.msg, EXIT_BAD_INPUT) from exc
    if save is not None:
        _save(resolved, save)
    if as_json:
        typer.echo(json.dumps(cluster_dict(resolved), indent=2))
        return
    make_console().print(render_cluster(resolved))
    if save is not None:
        make_console().print(f"cluster file written to {save}")


def _save(resolved: ResolvedCluster, path: Path) -> None:
    comment = f"Written by pqctl cluster from {resolved.source}."
    text = cluster_toml(resolved.cluster, comment=comment)
    try:
        path.write_text(text)
    except OSError as exc:
        raise fail("cannot write", f"--save {path}: {exc.strerror or exc}", EXIT_BAD_INPUT) from exc


def cluster_dict(resolved: ResolvedCluster) -> dict[str, Any]:
    """The cluster as plain data: hosts with their devices, links, and notes."""
    spec = resolved.cluster
    return {
        "source": resolved.source,
        "name": spec.name,
        "hosts": [
            {
                "name": host.name,
                "address": host.address,
                "devices": [
                    {
                        "key": d.key,
                        "type": d.type.name,
                        "kind": d.type.kind,
                        "memory_bytes": d.type.memory_bytes,
                        "usable_memory_bytes": d.type.usable_memory_bytes,
                        "memory_bandwidth_gb_s": d.type.memory_bandwidth_gb_s,
                        "fp16_tflops": d.type.fp16_tflops,
                    }
                    for d in spec.devices
                    if d.host == host.name
                ],
            }
            for host in spec.hosts
        ],
        "links": [
            {
                "hosts": sorted(pair),
                "bandwidth_gbit_s": link.bandwidth_gb_s * 8,
                "latency_us": link.latency_s * 1e6,
            }
            for pair, link in sorted(spec.links.items(), key=lambda kv: sorted(kv[0]))
        ],
        "default_link": {
            "bandwidth_gbit_s": spec.default_link.bandwidth_gb_s * 8,
            "latency_us": spec.default_link.latency_s * 1e6,
        },
        "notes": list(resolved.notes),
    }


def render_cluster(resolved: ResolvedCluster) -> Group:
    """Devices grouped by host, then the links between hosts, then notes."""
    spec: ClusterSpec = resolved.cluster
    devices = Table(title=f"Cluster ({resolved.source})", title_justify="left")
    for name, justify in (("host", "left"), ("address", "left"), ("device", "left")):
        devices.add_column(name, justify=justify)  # type: ignore[arg-type]
    for name in ("type", "memory GiB", "usable GiB", "GB/s", "TFLOPS"):
        devices.add_column(name, justify="left" if name == "type" else "right")
    for host in spec.hosts:
        for d in (d for d in spec.devices if d.host == host.name):
            devices.add_row(
                host.name,
                host.address,
                d.key,
                d.type.name,
                f"{d.type.memory_bytes / GIB:,.1f}",
                f"{d.type.usable_memory_bytes / GIB:,.1f}",
                f"{d.type.memory_bandwidth_gb_s:,.0f}",
                f"{d.type.fp16_tflops:,.1f}",
            )
    parts: list[Any] = [devices]
    if len(spec.hosts) > 1:
        links = Table(title="Links between hosts", title_justify="left")
        given = "measured" if resolved.source.startswith("Ray") else "cluster file"
        for name in ("hosts", "Gbit/s", "latency µs", "from"):
            links.add_column(name, justify="left" if name == "hosts" else "right")
        names = [h.name for h in spec.hosts]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                link = spec.between(a, b)
                links.add_row(
                    f"{a} ↔ {b}",
                    f"{link.bandwidth_gb_s * 8:,.2f}",
                    f"{link.latency_s * 1e6:,.1f}",
                    given if frozenset((a, b)) in spec.links else "default",
                )
        parts.append(links)
    parts += [f"note: {n}" for n in resolved.notes]
    return Group(*parts)
