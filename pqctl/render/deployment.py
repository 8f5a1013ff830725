"""What ``pqctl apply`` shows of a deployment: its stages while they load, then every stage's
measured prefill/decode throughput beside the plan's prediction."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table
from rich.text import Text

from planner.plan import Plan
from runtime.serve.deployment import DeploymentState
from runtime.serve.monitor import Monitor, predicted_rates


def loading_view(status: dict[str, Any], plan: Plan) -> Table:
    """Per stage while the deployment loads: device, layers, state (with load progress) and
    memory, from the gateway's status."""
    table = Table(title="loading stages", title_justify="left")
    for column in ("stage", "device", "layers", "state", "memory"):
        table.add_column(column)
    for s in status["stages"]:
        stage = plan.stages[s["index"]]
        memory = s.get("resident_bytes")
        table.add_row(
            str(s["index"]),
            _device(plan, s["index"]),
            f"{stage.layer_range.start}–{stage.layer_range.stop - 1}",
            load_state(s),
            f"{memory / 2**20:.0f} MiB" if memory else "",
        )
    return table


def loading_lines(status: dict[str, Any], plan: Plan, said: dict[int, str]) -> list[str]:
    """A line per stage whose state changed since ``said`` (updated): the loading view as a
    log, for output that is not a terminal."""
    lines = []
    for s in status["stages"]:
        index, state = s["index"], load_state(s)
        if said.get(index) != state:
            said[index] = state
            stage = plan.stages[index]
            lines.append(
                f"stage {index} ({_device(plan, index)}, layers {stage.layer_range.start}–"
                f"{stage.layer_range.stop - 1}): {state}"
            )
    return lines


def load_state(stage: dict[str, Any]) -> str:
    """A stage's state from the gateway's status, with its load progress while loading:
    "loading 3/9" (decoder layers, then the embedding/head part, loaded of all)."""
    state = str(stage.get("state"))
    loaded = stage.get("loaded")
    if state == "loading" and isinstance(loaded, list) and len(loaded) == 2:
        return f"loading {loaded[0]}/{loaded[1]}"
    return state


def _device(plan: Plan, index: int) -> str:
    return plan.stages[index].device.key


def _rate(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value / 1000:.1f}k" if value >= 10_000 else f"{value:,.0f}"


def stage_table(monitor: Monitor, plan: Plan) -> Table:
    """Per stage: measured (busy) prefill/decode tokens/s beside the plan's prediction."""
    predicted = predicted_rates(plan)
    table = Table(
        title=f"{plan.model.source}: per-stage throughput (tokens/s)",
        title_justify="left",
        caption="prefill, decode: measured per busy second; pred: the plan's prediction",
    )
    for column in (
        "stage",
        "device",
        "layers",
        "prefill",
        "pred",
        "decode",
        "pred",
        "busy",
        "queue",
        "memory",
    ):
        table.add_column(column, justify="right" if column not in ("device", "layers") else "left")
    for index, stage in enumerate(plan.stages):
        m = monitor.metrics.get(index, {})
        pre, dec = m.get("prefill", {}), m.get("decode", {})
        rss = m.get("rss_bytes")
        table.add_row(
            str(index),
            _device(plan, index),
            f"{stage.layer_range.start}–{stage.layer_range.stop - 1}",
            _rate(pre.get("busy_tokens_per_s")),
            _rate(predicted[index].prefill_tokens_per_s),
            _rate(dec.get("busy_tokens_per_s")),
            _rate(predicted[index].decode_tokens_per_s),
            f"{100 * m['busy']:.0f}%" if "busy" in m else "–",
            str(m.get("queue_depth", "–")),
            f"{rss / 2**20:.0f}M" if rss else "–",
        )
    return table


def serving_summary(monitor: Monitor) -> Text:
    """The line under the stage table: phase, requests, tokens, and stages that restarted."""
    status = monitor.status or {}
    r = status.get("requests", {})
    text = Text(
        f"{status.get('phase', 'starting')}; requests: {r.get('waiting', 0)} waiting, "
        f"{r.get('active', 0)} running, {r.get('completed', 0)} done; "
        f"{status.get('generated_tokens', 0)} tokens generated. Ctrl-C stops."
    )
    for stage in status.get("stages", []):
        why = stage.get("error") or stage.get("last_failure")
        if stage.get("restarts") or why:
            text.append(
                f"\nstage {stage['index']}: restarted {stage.get('restarts', 0)}× (last: {why})",
                style="yellow",
            )
    return text


def deployment_row(state: DeploymentState, status: dict[str, Any] | None) -> dict[str, Any]:
    """What ``pqctl status`` says of one deployment (its ``--json`` object)."""
    stages = (status or {}).get("stages") or []
    requests = (status or {}).get("requests") or {}
    return {
        "name": state.name,
        "phase": (status or {}).get("phase", "no status"),
        "plan": state.plan,
        "model": state.model,
        "endpoint": state.client_endpoint,
        "http": f"http://{state.http_endpoint}/v1" if state.http_endpoint else None,
        "pid": state.pid,
        "gateway_pid": state.gateway_pid or state.pid,
        "uptime_s": round(max(0.0, time.time() - state.started), 1),
        "stages": [
            {
                "index": st.get("index"),
                "state": st.get("state"),
                "pid": st.get("pid"),
                "restarts": st.get("restarts", 0),
            }
            for st in stages
        ],
        "requests": {key: requests.get(key, 0) for key in ("active", "waiting", "completed")},
        "gateway_restarts": state.gateway_restarts,
        "keys": state.keys,
        "log_dir": state.log_dir,
    }


def deployments_table(rows: list[dict[str, Any]]) -> Table:
    """The deployments of ``pqctl status``, one line each."""
    table = Table(title="deployments", title_justify="left")
    for column in ("name", "phase", "model", "endpoint", "stages", "pid", "uptime", "requests"):
        table.add_column(column, no_wrap=True)
    table.add_column("plan")
    for row in rows:
        states = [str(st["state"]) for st in row["stages"]]
        ready = sum(s == "ready" for s in states)
        stages = f"{ready}/{len(states)} ready" if states else "?"
        restarts = sum(int(st["restarts"] or 0) for st in row["stages"])
        if restarts or row["gateway_restarts"]:
            stages += f", {restarts + row['gateway_restarts']} restarts"
        r = row["requests"]
        table.add_row(
            row["name"],
            row["phase"],
            row["model"],
            row["endpoint"] + (f"\n{row['http']}" if row.get("http") else ""),
            stages,
            str(row["pid"]),
            _uptime(row["uptime_s"]),
            f"{r['active']} running, {r['waiting']} waiting, {r['completed']} done",
            row["plan"],
        )
    return table


def _uptime(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"
