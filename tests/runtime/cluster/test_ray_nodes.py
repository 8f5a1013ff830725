"""The Ray side of the inventory that needs no cluster: naming nodes, addresses, link fits."""

from __future__ import annotations

import pytest

from runtime.cluster.ray_nodes import RayClusterError, fit_link, name_nodes, resolve_address


def raw(node_id: str, hostname: str, *labels: str) -> dict[str, object]:
    resources = {"CPU": 4.0, **{f"pqctl-host-{label}": 1.0 for label in labels}}
    return {
        "NodeID": node_id,
        "NodeManagerHostname": hostname,
        "NodeManagerAddress": "10.0.0.1",
        "Resources": resources,
        "Alive": True,
    }


def test_nodes_are_named_by_label_else_hostname_and_repeats_numbered_by_node_id() -> None:
    nodes = name_nodes(
        [raw("c", "box"), raw("a", "box"), raw("b", "gpu node", "rack1/a"), raw("d", "other")]
    )
    assert [(n.host, n.node_id) for n in nodes] == [
        ("box", "a"),
        ("box-2", "c"),
        ("other", "d"),
        ("rack1-a", "b"),
    ]
    assert nodes[0].cpus == 4


def test_link_fit_recovers_latency_and_bandwidth_from_round_trips() -> None:
    latency, bandwidth = 40e-6, 2.5  # one way; GB/s
    samples = [(size, 2 * latency + size / (bandwidth * 1e9)) for size in (4096, 2**20, 2**23)]
    fit = fit_link(samples)
    assert fit.latency_s == pytest.approx(latency, rel=1e-6)
    assert fit.bandwidth_gb_s == pytest.approx(bandwidth, rel=1e-6)


def test_link_fit_of_a_flat_slope_is_capped_not_infinite() -> None:
    fit = fit_link([(4096, 1e-4), (2**20, 1e-4), (2**23, 0.9e-4)])
    assert fit.bandwidth_gb_s == 100.0 and fit.latency_s > 0


@pytest.mark.parametrize(
    ("given", "expected"),
    [("10.0.0.1:6379", "10.0.0.1:6379"), ("ray://head:10001", "head:10001")],
)
def test_addresses_are_host_and_port(given: str, expected: str) -> None:
    assert resolve_address(given) == expected


@pytest.mark.parametrize("bad", ["head", "head:", "head:0", "head:70000", ":6379 x"])
def test_a_bad_address_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(RayClusterError, match="is not HOST:PORT"):
        resolve_address(bad)


def test_auto_reads_ray_address_then_the_head_this_machine_started(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_address("auto") == "10.1.2.3:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(RayClusterError, match="RAY_ADDRESS is not set"):
        resolve_address("auto")
    (tmp_path / "ray").mkdir()  # type: ignore[operator]
    (tmp_path / "ray" / "ray_current_cluster").write_text("10.9.8.7:6379\n")  # type: ignore[operator]
    assert resolve_address("auto") == "10.9.8.7:6379"
