"""Tests of planner.cluster_file.cluster_toml: cluster files written back, read back equal."""

from __future__ import annotations

import itertools
import random
import re
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from planner.catalogue import CATALOGUE, cpu_device_type, gpu_device_type
from planner.cluster import GIB, ClusterSpec, DeviceSpec, DeviceType, HostSpec, LinkSpec
from planner.cluster_file import ClusterFile, cluster_toml, load_cluster_file, parse_cluster_file
from planner.errors import ClusterFileError

REPO = Path(__file__).resolve().parents[2]
FILES = sorted((REPO / "examples" / "clusters").glob("*.toml")) + [
    REPO / "tests" / "data" / "clusters" / name for name in ("good-full.toml", "minimal.toml")
]
NVML_BYTES = 25_393_692_672  # 23.65 GiB, as NVML might report a 24 GB card


def read_back(text: str) -> ClusterFile:
    """The cluster file that ``text`` holds (it must be valid TOML)."""
    return parse_cluster_file(tomllib.loads(text), "written.toml", text=text)


def one_host(*types: DeviceType, name: str = "node", address: str = "") -> ClusterSpec:
    """A one-host cluster of these device types (GPUs numbered in order, a cpu -1)."""
    devices, index = [], 0
    for device_type in types:
        if device_type.kind == "cpu":
            devices.append(DeviceSpec(name, -1, device_type))
        else:
            devices.append(DeviceSpec(name, index, device_type))
            index += 1
    return ClusterSpec("test", (HostSpec(name, address),), tuple(devices))


def device_lines(text: str) -> list[str]:
    """The device entries (inline tables) of a written file, in order."""
    return re.findall(r"\{ type = .*\}", text)


def assert_round_trip(
    cluster: ClusterSpec, model: str | None = None, workload: Mapping[str, int] | None = None
) -> str:
    text = cluster_toml(cluster, model=model, workload=workload)
    loaded = read_back(text)
    assert loaded.cluster == cluster
    assert (loaded.model, dict(loaded.workload)) == (model, dict(workload or {}))
    return text


@pytest.mark.parametrize("path", FILES, ids=lambda path: path.name)
def test_every_example_file_round_trips(path: Path, tmp_path: Path) -> None:
    original = load_cluster_file(path)
    text = cluster_toml(original.cluster, model=original.model, workload=original.workload)
    written = tmp_path / "written.toml"
    written.write_text(text, encoding="utf-8")
    assert load_cluster_file(written) == original
    assert read_back(text) == original


def test_catalogue_devices_are_written_by_name_and_folded() -> None:
    t4, v100 = CATALOGUE["T4"], CATALOGUE["V100-32G"]
    text = assert_round_trip(one_host(t4, t4, t4, v100, t4))
    assert device_lines(text) == [
        '{ type = "T4", count = 3 }',
        '{ type = "V100-32G" }',
        '{ type = "T4" }',
    ]


def test_a_cpu_between_gpus_keeps_its_place_and_the_gpu_indices() -> None:
    t4, cpu = CATALOGUE["T4"], CATALOGUE["cpu"]
    cluster = one_host(t4, cpu, t4)
    assert [device.index for device in cluster.devices] == [0, -1, 1]
    text = assert_round_trip(cluster)
    assert [line.split(",")[0] for line in device_lines(text)] == [
        '{ type = "T4" }',
        '{ type = "cpu"',
        '{ type = "T4" }',
    ]


def test_an_unknown_gpu_with_nvml_memory_is_written_with_its_figures() -> None:
    base = gpu_device_type("NVIDIA RTX PRO 6000 Blackwell", 24, 812.5, 97.3)
    odd = replace(base, memory_bytes=NVML_BYTES, launch_overhead_s=4.3e-06)
    text = assert_round_trip(one_host(odd, odd))
    assert device_lines(text) == [
        '{ type = "NVIDIA RTX PRO 6000 Blackwell", count = 2, memory_gib = 23.64971923828125, '
        "memory_bandwidth_gb_s = 812.5, fp16_tflops = 97.3, launch_overhead_s = 4.3e-06 }"
    ]


def test_an_unknown_gpu_gets_every_figure_that_differs_from_the_defaults() -> None:
    odd = replace(
        gpu_device_type("npu-x", 23.65, 1234.5678, 111.1, fp32_tflops=22.2, int8_tops=0),
        runtime_reserve_bytes=GIB * 3 // 2 + 12345,
        usable_memory_fraction=0.9123,
        dequant_gelem_s=333.3,
        peer_bandwidth_gb_s=63.9,
        supported_bits=frozenset({4, 8, 16}),
    )
    text = assert_round_trip(one_host(odd))
    (entry,) = device_lines(text)
    for key in ("fp32_tflops", "int8_tops = 0", "runtime_reserve_gib", "dequant_gelem_s", "bits"):
        assert key in entry


def test_a_catalogue_gpu_with_other_memory_gets_only_memory_gib() -> None:
    a100 = replace(CATALOGUE["A100-80G"], memory_bytes=85_520_809_984)
    text = assert_round_trip(one_host(a100, CATALOGUE["A100-80G"]))
    assert device_lines(text) == [
        '{ type = "A100-80G", memory_gib = 79.6474609375 }',
        '{ type = "A100-80G" }',
    ]


def test_a_catalogue_gpu_with_other_bandwidth_keeps_its_dequant_rate() -> None:
    # the loader sets dequant_gelem_s to bandwidth / 2 when only the bandwidth is given
    t4 = replace(CATALOGUE["T4"], memory_bandwidth_gb_s=300.0)
    text = assert_round_trip(one_host(t4))
    assert device_lines(text) == [
        '{ type = "T4", memory_bandwidth_gb_s = 300, dequant_gelem_s = 160 }'
    ]
    halved = replace(t4, dequant_gelem_s=150.0)
    assert device_lines(assert_round_trip(one_host(halved))) == [
        '{ type = "T4", memory_bandwidth_gb_s = 300 }'
    ]


@pytest.mark.parametrize(
    "memory_bytes", [NVML_BYTES, 16 * GIB + 1, 3 * GIB - 1, 123_456_789_012_345, 2**53 - 1]
)
def test_odd_byte_counts_come_back_exactly(memory_bytes: int) -> None:
    gpu = replace(gpu_device_type("npu-x", 4, 100, 10), memory_bytes=memory_bytes)
    cpu = cpu_device_type(4, memory_bytes, 20.0, 0.2)
    loaded = read_back(cluster_toml(one_host(gpu, cpu))).cluster
    assert [device.type.memory_bytes for device in loaded.devices] == [memory_bytes] * 2


def test_a_byte_count_no_float_of_gib_gives_is_refused() -> None:
    gpu = replace(gpu_device_type("npu-x", 4, 100, 10), memory_bytes=2**60 + 1)
    with pytest.raises(ValueError, match=r"node/cuda:0 \(npu-x\).*memory_bytes"):
        cluster_toml(one_host(gpu))


@pytest.mark.parametrize(("native_bf16", "packed"), [(True, True), (True, False), (False, False)])
def test_a_measured_cpu_round_trips(native_bf16: bool, packed: bool) -> None:
    cpu = cpu_device_type(
        12,
        67_345_678_901,
        23.456789012345678,
        0.6170000000000001,
        native_bf16=native_bf16,
        packed_kernels=packed,
    )
    cpu = replace(cpu, launch_overhead_s=1.7e-05, usable_memory_fraction=0.8)
    text = assert_round_trip(one_host(CATALOGUE["RTX4090"], cpu))
    flag = "true" if native_bf16 else "false"
    packed_key = ", packed_kernels = true" if packed else ""
    assert device_lines(text)[1] == (
        '{ type = "cpu", cores = 12, memory_gib = 62.72055106330663, '
        "memory_bandwidth_gb_s = 23.456789012345677, fp32_tflops = 0.6170000000000001, "
        f"usable_memory_fraction = 0.8, launch_overhead_s = 1.7e-05, native_bf16 = {flag}"
        f"{packed_key} }}"
    )
    assert ({2, 3} <= cpu.fast_kernel_bits) == packed


def test_links_with_odd_floats_round_trip() -> None:
    rng = random.Random(7)
    names = [f"h{i}" for i in range(6)]
    hosts = tuple(HostSpec(name) for name in names)
    devices = tuple(DeviceSpec(name, 0, CATALOGUE["L4"]) for name in names)
    links = {
        frozenset((a, b)): LinkSpec(rng.uniform(0.1, 50.0), rng.uniform(1e-6, 1e-3))
        for a, b in itertools.pairwise(names)
    }
    links[frozenset(("h0", "h5"))] = LinkSpec(12.5, 0.0)
    default = LinkSpec(1.2345678901234567, 9.87654321e-05)
    cluster = ClusterSpec("links", hosts, devices, links, default)
    text = assert_round_trip(cluster)
    assert text.count("[[links]]") == len(links)
    assert 'hosts = ["h0", "h5"]\nbandwidth_gbit_s = 100\nlatency_us = 0\n' in text


def test_a_latency_no_float_of_us_gives_is_written_in_seconds() -> None:
    latency_s = next(x for x in (i * 1.0000001e-7 for i in range(1, 1000)) if (x * 1e6) / 1e6 != x)
    cluster = replace(one_host(CATALOGUE["T4"]), default_link=LinkSpec(1.25, latency_s))
    text = assert_round_trip(cluster)
    assert f"[defaults]\nbandwidth_gbit_s = 10\nlatency_s = {latency_s!r}\n" in text


def test_a_short_latency_in_us_is_written_short() -> None:
    for latency_us in (20, 0.3, 12.34, 99.99):
        link = LinkSpec(1.25, latency_us / 1e6)
        text = cluster_toml(replace(one_host(CATALOGUE["T4"]), default_link=link))
        assert f"latency_us = {latency_us}\n" in text


def test_the_loader_reads_latency_s_but_not_with_latency_us() -> None:
    base = 'name = "x"\n[[hosts]]\nname = "a"\ndevices = [{ type = "T4" }]\n'
    loaded = read_back(base + "[defaults]\nlatency_s = 3.5e-05\n").cluster
    assert loaded.default_link == LinkSpec(1.25, 3.5e-05)
    with pytest.raises(ClusterFileError, match=r"defaults.latency_s: give latency_us or latency_s"):
        read_back(base + "[defaults]\nlatency_us = 35\nlatency_s = 3.5e-05\n")


@pytest.mark.parametrize(
    "name",
    ['quote"d', "back\\slash", "hash#=[x]", "nœud-ü-節点", "ctl\x01\x7f", "apo'strophe", "1.5"],
)
def test_host_names_are_quoted_and_escaped(name: str) -> None:
    cluster = one_host(CATALOGUE["T4"], name=name, address='addr "x"\n\t\\ 10.0.0.1:7390')
    other = replace(cluster, hosts=(*cluster.hosts, HostSpec("b")))
    other = replace(other, devices=(*other.devices, DeviceSpec("b", 0, CATALOGUE["L4"])))
    other = replace(other, links={frozenset((name, "b")): LinkSpec(2.0, 1e-05)})
    assert_round_trip(other)


def test_model_workload_and_comment() -> None:
    workload = {"batch": 8, "prompt_len": 512, "max_new": 128, "expected_new": 96}
    cluster = one_host(CATALOGUE["T4"])
    text = cluster_toml(cluster, model='opt "30b"', workload=workload, comment="one\n\ntwo  ")
    assert text.startswith('# one\n#\n# two\n\nname = "test"\nmodel = "opt \\"30b\\""\n')
    loaded = read_back(text)
    assert (loaded.model, dict(loaded.workload)) == ('opt "30b"', workload)
    assert "[workload]" not in cluster_toml(cluster)


TWO_HOSTS = ClusterSpec(
    "c",
    (HostSpec("a"), HostSpec("b")),
    (DeviceSpec("a", 0, CATALOGUE["T4"]), DeviceSpec("b", 0, CATALOGUE["T4"])),
)


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        (one_host(CATALOGUE["T4"], name="has space"), "hosts\\[0\\].name: must not contain spaces"),
        (replace(TWO_HOSTS, name=" "), "name: expected a non-empty string"),
        (replace(TWO_HOSTS, devices=TWO_HOSTS.devices[::-1]), "host by host"),
        (replace(TWO_HOSTS, devices=TWO_HOSTS.devices[:1]), "host 'b': no devices"),
        (replace(TWO_HOSTS, devices=(DeviceSpec("zz", 0, CATALOGUE["T4"]),)), "zz/cuda:0"),
        (replace(TWO_HOSTS, devices=(DeviceSpec("a", 1, CATALOGUE["T4"]),)), "indices \\[1\\]"),
        (replace(TWO_HOSTS, hosts=(HostSpec("a"), HostSpec("a"))), "unique"),
        (replace(TWO_HOSTS, links={frozenset(("a", "q")): LinkSpec(1, 0)}), 'unknown host "q"'),
        (replace(TWO_HOSTS, default_link=LinkSpec(0.0, 0.0)), "defaults.bandwidth_gbit_s"),
        (replace(TWO_HOSTS, default_link=LinkSpec(1.0, float("nan"))), "defaults.latency_s"),
    ],
)
def test_what_a_file_cannot_express_raises(cluster: ClusterSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_toml(cluster)


@pytest.mark.parametrize(
    ("device_type", "message"),
    [
        (replace(CATALOGUE["T4"], name="Tesla_T4"), "catalogue's gpu 'T4'"),
        (replace(gpu_device_type("npu", 8, 100, 10), name="cpu"), "catalogue's cpu 'cpu'"),
        (replace(CATALOGUE["T4"], fast_kernel_bits=frozenset({16})), "fast_kernel_bits"),
        (replace(CATALOGUE["T4"], activation_bytes=4), "activation_bytes"),
        (replace(gpu_device_type("npu", 8, 100, 10), memory_bytes=0), "memory_gib: must be"),
        (replace(CATALOGUE["cpu"], name="xeon"), r"\(xeon\).*name"),
        (replace(CATALOGUE["T4"], supported_bits=frozenset({5})), "bits"),
    ],
)
def test_device_types_a_file_cannot_express_raise(device_type: DeviceType, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cluster_toml(one_host(device_type))


def test_a_comment_with_control_characters_raises() -> None:
    with pytest.raises(ValueError, match="comment"):
        cluster_toml(one_host(CATALOGUE["T4"]), comment="bell\x07")
