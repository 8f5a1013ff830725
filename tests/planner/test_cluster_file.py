"""Tests of planner/cluster_file.py: the TOML format, the example clusters, exact error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.catalogue import CATALOGUE, find_device_type
from planner.cluster import DEFAULT_INTER_HOST_LINK, GIB, INTRA_HOST_LATENCY_S, LinkSpec
from planner.cluster_file import (
    ClusterFile,
    load_cluster,
    load_cluster_file,
    parse_cluster,
    parse_cluster_file,
)
from planner.errors import ClusterFileError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "clusters"
EXAMPLES = REPO / "examples" / "clusters"
KNOWN = (
    "T4, P100-12G, V100-16G, V100-32G, A100-40G, A100-80G, A800-80G, L4, A10G, RTX3090, RTX4090, "
    "H100-80G, H200, cpu"
)
GPU_FIELDS = (
    "type, count, bits, memory_gib, memory_bandwidth_gb_s, fp16_tflops, fp32_tflops, int8_tops, "
    "peer_bandwidth_gb_s, runtime_reserve_gib, usable_memory_fraction, launch_overhead_s, "
    "dequant_gelem_s"
)

BAD_FILES = {
    "bad-syntax.toml": "{path}:5: not valid TOML: Unclosed array",
    "no-hosts.toml": (
        "{path}: hosts: no hosts; add at least one [[hosts]] table with a name and devices"
    ),
    "host-without-name.toml": "{path}:5: hosts[1].name: missing; every host needs a unique name",
    "duplicate-host.toml": (
        '{path}:6: hosts[1].name: duplicate host name "node-a" (also hosts[0].name); '
        "host names must be unique"
    ),
    "host-without-devices.toml": (
        "{path}:7: hosts[1].devices: no devices; list at least one, "
        'e.g. devices = [{{ type = "T4", count = 2 }}]'
    ),
    "device-without-type.toml": (
        '{path}:5: hosts[0].devices[1].type: missing; give a device type, e.g. "T4" or "cpu"'
    ),
    "unknown-type.toml": (
        '{path}:7: hosts[1].devices[0].type: unknown device type "T5"; known types: '
        + KNOWN
        + "; or give memory_gib, memory_bandwidth_gb_s and fp16_tflops"
    ),
    "custom-missing-field.toml": (
        '{path}:4: hosts[0].devices[0].fp16_tflops: missing; device type "custom-npu" is not in '
        "the catalogue, so memory_gib, memory_bandwidth_gb_s and fp16_tflops are all needed"
    ),
    "negative-memory.toml": "{path}:3: hosts[0].devices[0].memory_gib: must be positive, got -3",
    "not-a-number.toml": (
        '{path}:9: hosts[0].devices[1].memory_bandwidth_gb_s: expected a number, got "abc"'
    ),
    "bad-count.toml": "{path}:3: hosts[0].devices[0].count: must be a positive integer, got 2.5",
    "unknown-field.toml": (
        '{path}:9: hosts[1].devices[1].memroy_gib: unknown field "memroy_gib" '
        '(did you mean "memory_gib"?); accepted: ' + GPU_FIELDS
    ),
    "unknown-top-level-field.toml": (
        '{path}:2: hostz: unknown field "hostz" (did you mean "hosts"?); '
        "accepted: name, model, workload, defaults, hosts, links"
    ),
    "link-unknown-host.toml": (
        '{path}:10: links[0].hosts: unknown host "node-c"; hosts in this file: node-a, node-b'
    ),
    "link-to-itself.toml": (
        '{path}:7: links[0].hosts: a link joins two different hosts, got "node-a" twice'
    ),
    "duplicate-link.toml": (
        '{path}:14: links[1].hosts: the link between "node-a" and "node-b" is already given '
        "in links[0]"
    ),
    "bad-bits.toml": (
        "{path}:3: hosts[0].devices[0].bits: accepted bit widths are 2, 3, 4, 8, 16, got 5"
    ),
    "two-cpus.toml": (
        "{path}:5: hosts[0].devices[1].type: a host has at most one cpu device; "
        "hosts[0].devices[0] is one already"
    ),
    "cpu-without-cores.toml": (
        "{path}:3: hosts[0].devices[0].cores: missing; a cpu device needs cores and memory_gib"
    ),
    "zero-bandwidth-link.toml": "{path}:2: defaults.bandwidth_gbit_s: must be positive, got 0",
    "expected-over-max.toml": (
        "{path}:6: workload.expected_new: must not exceed max_new (100), got 120"
    ),
    "fraction-over-one.toml": (
        "{path}:3: hosts[0].devices[0].usable_memory_fraction: must be at most 1, got 1.5"
    ),
    "reserve-fills-memory.toml": (
        "{path}:3: hosts[0].devices[0]: no usable memory left: memory_gib × "
        "usable_memory_fraction − runtime_reserve_gib must be positive"
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_file_gives_its_exact_message(name: str) -> None:
    path = DATA / name
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert str(caught.value) == BAD_FILES[name].format(path=path)
    assert caught.value.msg == str(caught.value)
    assert caught.value.title == "bad cluster file"


def test_every_bad_fixture_is_covered() -> None:
    fixtures = {p.name for p in DATA.glob("*.toml")} - {"good-full.toml", "minimal.toml"}
    assert fixtures == set(BAD_FILES)


def test_the_path_is_named_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(ClusterFileError, match=r"^tests/data/clusters/negative-memory\.toml:3: "):
        load_cluster("tests/data/clusters/negative-memory.toml")


def test_a_missing_file() -> None:
    path = DATA / "no-such-cluster.toml"
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert str(caught.value) == f"{path}: no such file; give the path of a cluster TOML file"


def test_a_directory_is_not_a_cluster_file() -> None:
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(DATA)
    assert str(caught.value) == f"{DATA}: cannot read the file: Is a directory"


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[[hosts]]\nname = "n\xe9ud"\n')
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert str(caught.value) == f"{path}:2: not valid TOML: not UTF-8 text"


def test_a_syntax_error_at_the_end_of_the_document(tmp_path: Path) -> None:
    path = tmp_path / "cut.toml"
    path.write_text('[[hosts]]\nname = "a"\ndevices = ')
    with pytest.raises(ClusterFileError) as caught:
        load_cluster(path)
    assert str(caught.value) == f"{path}:3: not valid TOML: Invalid value"


def test_the_full_example_loads_every_feature() -> None:
    loaded = load_cluster_file(DATA / "good-full.toml")
    cluster = loaded.cluster
    assert (cluster.name, loaded.model) == ("full", "opt-30b")
    assert loaded.workload == {"batch": 16, "prompt_len": 256, "max_new": 64, "expected_new": 48}
    assert [h.name for h in cluster.hosts] == ["node-a", "node-b", "cpu-box", "node-c"]
    assert cluster.hosts[0].address == "10.0.0.1:7390"
    assert [d.key for d in cluster.devices] == [
        "node-a/cuda:0", "node-a/cuda:1", "node-a/cuda:2",
        "node-b/cuda:0", "node-b/cuda:1", "node-b/cuda:2",
        "cpu-box/cpu", "node-c/cpu", "node-c/cuda:0", "node-c/cuda:1",
    ]  # fmt: skip
    assert [d.type.name for d in cluster.devices[:4]] == ["T4", "T4", "T4", "V100-32G"]
    assert cluster.devices[0].type is CATALOGUE["T4"]


def test_bits_restrict_supported_and_fast_kernel_bits() -> None:
    v100 = load_cluster(DATA / "good-full.toml").devices[3].type
    assert v100.supported_bits == {16, 8, 4}
    assert v100.fast_kernel_bits == {16, 8}


def test_a_custom_device_gets_its_figures_and_defaults() -> None:
    npu = load_cluster(DATA / "good-full.toml").devices[4].type
    assert (npu.name, npu.kind) == ("custom-npu", "gpu")
    assert (npu.memory_bytes, npu.memory_bandwidth_gb_s) == (24 * GIB, 800)
    assert (npu.fp16_tflops, npu.fp32_tflops, npu.int8_tops) == (100, 20, 200)
    assert npu.dequant_gelem_s == 400


def test_overrides_change_only_the_given_figures() -> None:
    a100 = load_cluster(DATA / "good-full.toml").devices[5].type
    expected = CATALOGUE["A100-40G"]
    assert a100.name == "A100-40G"
    assert (a100.memory_bytes, a100.runtime_reserve_bytes) == (38 * GIB, 2 * GIB)
    assert (a100.fp16_tflops, a100.memory_bandwidth_gb_s) == (312, expected.memory_bandwidth_gb_s)


def test_cpu_devices_take_cores_memory_and_defaults() -> None:
    cluster = load_cluster(DATA / "good-full.toml")
    box, small = cluster.devices[6].type, cluster.devices[7].type
    assert (box.kind, box.memory_bytes, box.memory_bandwidth_gb_s) == ("cpu", 128 * GIB, 100)
    assert box.fp32_tflops == pytest.approx(32 * 0.05)
    assert small.memory_bandwidth_gb_s == 20
    assert small.fp32_tflops == pytest.approx(0.4)


@pytest.mark.parametrize(("value", "width"), [(True, 2), (False, 4)])
def test_a_cpu_with_native_bf16_stores_16_bit_weights_in_2_bytes(value: bool, width: int) -> None:
    device = {"type": "cpu", "cores": 4, "memory_gib": 8, "native_bf16": value}
    cluster = parse_cluster({"hosts": [{"name": "a", "devices": [device]}]}, "x")
    assert cluster.devices[0].type.dense_weight_bytes == width
    assert cluster.devices[0].type.activation_bytes == 4


def test_native_bf16_must_be_a_boolean() -> None:
    device = {"type": "cpu", "cores": 4, "memory_gib": 8, "native_bf16": 1}
    with pytest.raises(ClusterFileError) as caught:
        parse_cluster({"hosts": [{"name": "a", "devices": [device]}]}, "x")
    assert str(caught.value) == "x: hosts[0].devices[0].native_bf16: expected true or false, got 1"


def test_links_come_from_links_defaults_and_peer_bandwidth() -> None:
    cluster = load_cluster(DATA / "good-full.toml")
    by_key = {d.key: d for d in cluster.devices}
    a0, a1, b0 = by_key["node-a/cuda:0"], by_key["node-a/cuda:1"], by_key["node-b/cuda:0"]
    box, c0 = by_key["cpu-box/cpu"], by_key["node-c/cuda:0"]
    assert cluster.link(a0, b0) == LinkSpec(bandwidth_gb_s=12.5, latency_s=20e-6)
    assert cluster.link(b0, a0) == cluster.link(a0, b0)
    assert cluster.link(box, a0) == LinkSpec(bandwidth_gb_s=25 / 8, latency_s=50e-6)
    assert cluster.link(c0, b0) == LinkSpec(bandwidth_gb_s=5.0, latency_s=50e-6)
    assert cluster.link(a0, a1) == LinkSpec(bandwidth_gb_s=12.0, latency_s=INTRA_HOST_LATENCY_S)


def test_a_minimal_file_takes_its_name_from_the_file_and_default_links() -> None:
    loaded = load_cluster_file(DATA / "minimal.toml")
    assert loaded == ClusterFile(cluster=loaded.cluster, model=None, workload={})
    assert loaded.cluster.name == "minimal"
    assert loaded.cluster.default_link == DEFAULT_INTER_HOST_LINK
    assert loaded.cluster.devices[0].type is CATALOGUE["A100-40G"]


def test_parse_without_text_gives_messages_without_lines() -> None:
    data = {"hosts": [{"name": "a", "devices": [{"type": "T4", "count": 0}]}]}
    with pytest.raises(ClusterFileError) as caught:
        parse_cluster(data, "inline")
    expected = "inline: hosts[0].devices[0].count: must be a positive integer, got 0"
    assert str(caught.value) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"hosts": {"name": "a"}}, "x: hosts: expected an array of [[hosts]] tables, got a table"),
        ({"hosts": [3]}, "x: hosts[0]: expected a table, got 3"),
        ({"name": 7, "hosts": []}, "x: name: expected a non-empty string, got 7"),
        (
            {"hosts": [{"name": "a b", "devices": [{"type": "T4"}]}]},
            'x: hosts[0].name: must not contain spaces or "/", got "a b"',
        ),
        (
            {"hosts": [{"name": "a", "devices": [{"type": "T4", "fp16_tflops": True}]}]},
            "x: hosts[0].devices[0].fp16_tflops: expected a number, got true",
        ),
        (
            {
                "hosts": [
                    {
                        "name": "a",
                        "devices": [{"type": "cpu", "cores": 4, "memory_gib": 8, "count": 2}],
                    }
                ]
            },
            "x: hosts[0].devices[0].count: a host has at most one cpu device, got 2",
        ),
        (
            {"hosts": [{"name": "a", "devices": [{"type": "T4", "cores": 4}]}]},
            'x: hosts[0].devices[0].cores: unknown field "cores"; accepted: ' + GPU_FIELDS,
        ),
        (
            {"hosts": [{"name": "a", "devices": [{"type": "T4", "bits": []}]}]},
            "x: hosts[0].devices[0].bits: must name at least one bit width from 2, 3, 4, 8, 16",
        ),
        (
            {"hosts": [{"name": "a", "devices": [{"type": "T4"}]}], "links": [{"hosts": ["a"]}]},
            "x: links[0].hosts: expected an array of two host names, got an array",
        ),
        (
            {"hosts": [{"name": "a", "devices": [{"type": "T4"}]}], "workload": {"batch": 0}},
            "x: workload.batch: must be a positive integer, got 0",
        ),
    ],
)
def test_more_problems_in_parsed_data(data: dict[str, object], message: str) -> None:
    with pytest.raises(ClusterFileError) as caught:
        parse_cluster_file(data, "x")
    assert str(caught.value) == message


PAPER_CLUSTERS = {
    1: ({"V100-32G": 1}, "opt-13b"),
    2: ({"A100-40G": 1}, "opt-13b"),
    3: ({"T4": 3, "V100-32G": 1}, "opt-30b"),
    4: ({"P100-12G": 3, "V100-32G": 1}, "opt-30b"),
    5: ({"T4": 4, "V100-32G": 2}, "opt-66b"),
    6: ({"V100-32G": 2, "A100-40G": 2}, "opt-66b"),
    7: ({"V100-32G": 4, "A100-40G": 4}, "bloom-176b"),
    8: ({"V100-32G": 4, "A800-80G": 2}, "bloom-176b"),
    9: ({"T4": 4}, "opt-30b"),
    10: ({"V100-32G": 4}, "opt-66b"),
    11: ({"A800-80G": 4}, "bloom-176b"),
}


@pytest.mark.parametrize("number", sorted(PAPER_CLUSTERS))
def test_the_papers_clusters_load(number: int) -> None:
    loaded = load_cluster_file(EXAMPLES / f"cluster-{number:02d}.toml")
    gpus, model = PAPER_CLUSTERS[number]
    counts: dict[str, int] = {}
    for device in loaded.cluster.devices:
        counts[device.type.name] = counts.get(device.type.name, 0) + 1
    assert counts == gpus
    assert loaded.model == model
    assert loaded.workload == {"batch": 32, "prompt_len": 512, "max_new": 100}
    assert len(loaded.cluster.hosts) == len(gpus)
    first, last = loaded.cluster.devices[0], loaded.cluster.devices[-1]
    if first.host != last.host:
        assert loaded.cluster.link(first, last) == LinkSpec(bandwidth_gb_s=12.5, latency_s=20e-6)


def test_every_example_cluster_loads() -> None:
    paths = sorted(EXAMPLES.glob("*.toml"))
    assert len(paths) == 12
    for path in paths:
        loaded = load_cluster_file(path)
        assert loaded.cluster.devices
        assert loaded.model is not None
        assert all(d.type.usable_memory_bytes > 0 for d in loaded.cluster.devices)


def test_the_home_lab_mixes_gpus_and_a_cpu() -> None:
    cluster = load_cluster(EXAMPLES / "mixed-home-lab.toml")
    assert [d.key for d in cluster.devices] == [
        "gaming-pc/cuda:0", "workstation/cuda:0", "workstation/cuda:1", "cpu-server/cpu",
    ]  # fmt: skip
    assert {d.type.kind for d in cluster.devices} == {"gpu", "cpu"}
    assert find_device_type(cluster.devices[0].type.name) is CATALOGUE["RTX4090"]
