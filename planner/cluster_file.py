"""Cluster files: the hosts, devices and links of a cluster as TOML.

Format (``docs/cluster-file.md`` has the long version)::

    name = "paper-cluster-3"     # optional; default: the file's stem
    model = "opt-30b"            # optional: the model this cluster is meant for
    [workload]                   # optional: batch, prompt_len, max_new, expected_new (ints > 0)
    batch = 32
    prompt_len = 512
    max_new = 100
    [defaults]                   # optional: link between hosts that no [[links]] entry names
    bandwidth_gbit_s = 10        # default 10 Gbit/s
    latency_us = 100             # default 100 µs
    [[hosts]]
    name = "node-a"              # required, unique, no "/" or spaces
    address = "10.0.0.1:7390"    # optional: where the host's agent listens
    devices = [ { type = "T4", count = 3 } ]
    [[hosts]]
    name = "node-b"
    devices = [
      { type = "V100-32G" },
      { type = "custom-npu", memory_gib = 24, memory_bandwidth_gb_s = 800, fp16_tflops = 100 },
      { type = "A100-40G", memory_gib = 38 },
    ]
    [[hosts]]
    name = "cpu-box"
    devices = [ { type = "cpu", cores = 32, memory_gib = 128, memory_bandwidth_gb_s = 100 } ]
    [[links]]
    hosts = ["node-a", "node-b"] # two different hosts of this file
    bandwidth_gbit_s = 100       # default: [defaults]
    latency_us = 20              # default: [defaults]; or latency_s, in seconds

Devices (one inline table each, or ``[[hosts.devices]]`` tables):

- ``type``: a catalogue name or alias (:func:`planner.catalogue.find_device_type`: ``"T4"``,
  ``"Tesla_V100-SXM2-32GB"``...), ``"cpu"``, or any other name for a device not in the catalogue,
  which then needs ``memory_gib``, ``memory_bandwidth_gb_s`` and ``fp16_tflops`` (fp32 defaults
  to fp16 / 4, int8 to 2 × fp16, peer bandwidth to PCIe gen4; kind ``"gpu"``).
- ``count``: how many identical devices (positive integer, default 1).
- ``bits``: restricts the weight precisions (from 2, 3, 4, 8, 16) the planner may use on it.
- figures overriding the catalogue: ``memory_gib``, ``memory_bandwidth_gb_s``, ``fp16_tflops``,
  ``fp32_tflops``, ``int8_tops``, ``peer_bandwidth_gb_s``, ``runtime_reserve_gib``,
  ``usable_memory_fraction``, ``launch_overhead_s``, ``dequant_gelem_s``.
- a ``cpu`` needs ``cores`` and ``memory_gib``; ``memory_bandwidth_gb_s`` defaults to 20 and
  ``fp32_tflops`` to cores × 0.05; ``native_bf16 = true`` says it has native bf16 dot products
  (``avx512_bf16`` or ``amx_tile`` in its ``/proc/cpuinfo`` flags), so the runtime stores 16-bit
  weights there as bf16 (default false: fp32); ``packed_kernels = true`` says its stages read 2-
  and 3-bit weights through pqctl's native kernels (``avx512_bf16`` and ``avx512vbmi`` in its
  flags and a C compiler installed), so those precisions count as fast there (default false:
  dequantized per call). At most one cpu per host; it gets index -1.

Links and ``[defaults]`` may give ``latency_s`` (seconds) instead of ``latency_us``: not every
latency in seconds is some float number of µs divided by 10^6, so :func:`cluster_toml` writes
``latency_s`` for those.

GPUs get indices 0, 1, ... per host in file order. Every problem raises
:class:`~planner.errors.ClusterFileError` as ``"{path}:{line}: {field}: {problem}"`` (the line
when it can be found), with ``field`` a dotted path such as ``hosts[1].devices[0].type``.

:func:`cluster_toml` writes a cluster back as such a file.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

from planner.catalogue import (
    ALL_WEIGHT_BITS,
    DEFAULT_CPU_TFLOPS_PER_CORE,
    cpu_device_type,
    find_device_type,
    gpu_device_type,
    known_device_types,
)
from planner.cluster import (
    DEFAULT_INTER_HOST_LINK,
    GIB,
    ClusterSpec,
    DeviceSpec,
    DeviceType,
    HostSpec,
    LinkSpec,
)
from planner.errors import ClusterFileError
from planner.toml_lines import TomlLineFinder

_TOP_KEYS = ("name", "model", "workload", "defaults", "hosts", "links")
_HOST_KEYS = ("name", "address", "devices")
_LINK_KEYS = ("hosts", "bandwidth_gbit_s", "latency_us", "latency_s")
_WORKLOAD_KEYS = ("batch", "prompt_len", "max_new", "expected_new")
_CUSTOM_KEYS = ("memory_gib", "memory_bandwidth_gb_s", "fp16_tflops")
_FIGURES = (  # device figures a file may give or override
    "memory_gib",
    "memory_bandwidth_gb_s",
    "fp16_tflops",
    "fp32_tflops",
    "int8_tops",
    "peer_bandwidth_gb_s",
    "runtime_reserve_gib",
    "usable_memory_fraction",
    "launch_overhead_s",
    "dequant_gelem_s",
)
_ZERO_OK = frozenset({"int8_tops", "runtime_reserve_gib", "launch_overhead_s"})
_GPU_KEYS = ("type", "count", "bits", *_FIGURES)
_CPU_KEYS = (*_GPU_KEYS, "cores", "native_bf16", "packed_kernels")
_CPU_DEFAULT_BANDWIDTH_GB_S = 20.0


@dataclass(frozen=True, slots=True)
class ClusterFile:
    """What a cluster file holds.

    Attributes:
        cluster: the hosts, devices and links.
        model: the top-level ``model`` key (e.g. ``"opt-30b"``), or None.
        workload: the ``[workload]`` table: any of ``batch``, ``prompt_len``, ``max_new``,
            ``expected_new`` (prompts, tokens, tokens, tokens).
    """

    cluster: ClusterSpec
    model: str | None
    workload: Mapping[str, int]


def load_cluster(path: str | Path) -> ClusterSpec:
    """The cluster of a TOML cluster file (see the module docstring for the format).

    Raises:
        ClusterFileError: the file is missing, unreadable or breaks the format.
    """
    return load_cluster_file(path).cluster


def load_cluster_file(path: str | Path) -> ClusterFile:
    """Read a TOML cluster file: the cluster, and the model and workload it names if any.

    Args:
        path: the file; messages name it as given.

    Raises:
        ClusterFileError: the file is missing, unreadable or breaks the format.
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        message = f"{source}: no such file; give the path of a cluster TOML file"
        raise ClusterFileError(message) from None
    except OSError as error:
        raise ClusterFileError(f"{source}: cannot read the file: {error.strerror}") from error
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ClusterFileError(f"{source}:{line}: not valid TOML: not UTF-8 text") from error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        line, message = _toml_error_line(str(error), text)
        raise ClusterFileError(f"{source}:{line}: not valid TOML: {message}") from error
    return parse_cluster_file(data, source, text=text)


def parse_cluster(data: Mapping[str, Any], source: str, *, text: str | None = None) -> ClusterSpec:
    """The cluster of parsed TOML ``data``; ``source`` names it in errors.

    Args:
        data: the parsed file.
        source: the file's path (or any label) for messages; its stem is the default name.
        text: the file's text, to add line numbers to messages.

    Raises:
        ClusterFileError: ``data`` breaks the format.
    """
    return parse_cluster_file(data, source, text=text).cluster


def parse_cluster_file(
    data: Mapping[str, Any], source: str, *, text: str | None = None
) -> ClusterFile:
    """Like :func:`parse_cluster`, with the file's model and workload."""
    return _Reader(source, TomlLineFinder(text) if text is not None else None).cluster_file(data)


def _toml_error_line(error: str, text: str) -> tuple[int, str]:
    """Line and bare message of a tomllib error (``"... (at line 3, column 7)"``)."""
    match = re.fullmatch(r"(.*) \(at line (\d+), column \d+\)", error, re.S)
    if match:
        return int(match.group(2)), match.group(1)
    last_line = max(1, len(text.splitlines()))
    return last_line, error.removesuffix(" (at end of document)")


def _show(value: Any) -> str:
    """A value as TOML would spell it, for messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    return "an array" if isinstance(value, list) else str(value)


class _Reader:
    """Checks parsed TOML field by field; every problem raises a ClusterFileError."""

    def __init__(self, source: str, locator: TomlLineFinder | None) -> None:
        self.source = source
        self.locator = locator

    def fail(self, field: str, problem: str, at: str | None = None) -> NoReturn:
        """Raise ``"{source}:{line}: {field}: {problem}"``, the line found for ``at or field``."""
        line = self.locator.line(at or field) if self.locator is not None else None
        where = f"{self.source}:{line}" if line is not None else self.source
        raise ClusterFileError(f"{where}: {field}: {problem}")

    def check_keys(self, table: Mapping[str, Any], accepted: Sequence[str], field: str) -> None:
        for key in table:
            if key not in accepted:
                close = difflib.get_close_matches(key, accepted, n=1)
                hint = f" (did you mean {_show(close[0])}?)" if close else ""
                problem = f"unknown field {_show(key)}{hint}; accepted: {', '.join(accepted)}"
                self.fail(f"{field}.{key}" if field else key, problem)

    def table(self, value: Any, field: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            self.fail(field, f"expected a table, got {_show(value)}")
        return value

    def string(self, table: Mapping[str, Any], key: str, field: str) -> str | None:
        value = table.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            self.fail(f"{field}{key}", f"expected a non-empty string, got {_show(value)}")
        return value

    def number(self, table: Mapping[str, Any], key: str, field: str, *, zero_ok: bool) -> float:
        """A finite number > 0 (or >= 0 when ``zero_ok``); ``field`` ends with a dot or is empty."""
        value = table[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            self.fail(f"{field}{key}", f"expected a number, got {_show(value)}")
        if value < 0 or (value == 0 and not zero_ok):
            rule = "must be zero or positive" if zero_ok else "must be positive"
            self.fail(f"{field}{key}", f"{rule}, got {_show(value)}")
        return float(value)

    def boolean(self, table: Mapping[str, Any], key: str, field: str) -> bool:
        value = table.get(key, False)
        if not isinstance(value, bool):
            self.fail(f"{field}{key}", f"expected true or false, got {_show(value)}")
        return value

    def positive_int(self, table: Mapping[str, Any], key: str, field: str) -> int:
        value = table[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            self.fail(f"{field}{key}", f"must be a positive integer, got {_show(value)}")
        return value

    def cluster_file(self, data: Mapping[str, Any]) -> ClusterFile:
        self.check_keys(data, _TOP_KEYS, "")
        name = self.string(data, "name", "") or Path(self.source).stem
        model = self.string(data, "model", "")
        default_link = self.link_figures(
            data.get("defaults", {}), "defaults", DEFAULT_INTER_HOST_LINK
        )
        hosts, devices = self.hosts(data.get("hosts"))
        links = self.links(data.get("links", []), [host.name for host in hosts], default_link)
        cluster = ClusterSpec(
            name=name, hosts=hosts, devices=devices, links=links, default_link=default_link
        )
        return ClusterFile(cluster=cluster, model=model, workload=self.workload(data))

    def workload(self, data: Mapping[str, Any]) -> dict[str, int]:
        table = self.table(data.get("workload", {}), "workload")
        self.check_keys(table, _WORKLOAD_KEYS, "workload")
        workload = {key: self.positive_int(table, key, "workload.") for key in table}
        if workload.get("expected_new", 0) > workload.get("max_new", math.inf):
            self.fail(
                "workload.expected_new",
                f"must not exceed max_new ({workload['max_new']}), got {workload['expected_new']}",
            )
        return workload

    def link_figures(self, value: Any, field: str, default: LinkSpec) -> LinkSpec:
        """A link's bandwidth (Gbit/s) and latency (µs or s) as a LinkSpec, defaults filled in."""
        table = self.table(value, field)
        accepted = _LINK_KEYS[1:] if field == "defaults" else _LINK_KEYS
        self.check_keys(table, accepted, field)
        bandwidth_gb_s, latency_s = default.bandwidth_gb_s, default.latency_s
        if "bandwidth_gbit_s" in table:
            bandwidth_gb_s = self.number(table, "bandwidth_gbit_s", f"{field}.", zero_ok=False) / 8
        if "latency_us" in table and "latency_s" in table:
            self.fail(f"{field}.latency_s", "give latency_us or latency_s, not both")
        if "latency_us" in table:
            latency_s = self.number(table, "latency_us", f"{field}.", zero_ok=True) / 1e6
        elif "latency_s" in table:
            latency_s = self.number(table, "latency_s", f"{field}.", zero_ok=True)
        return LinkSpec(bandwidth_gb_s=bandwidth_gb_s, latency_s=latency_s)

    def links(
        self, value: Any, host_names: Sequence[str], default: LinkSpec
    ) -> dict[frozenset[str], LinkSpec]:
        if not isinstance(value, list):
            self.fail("links", f"expected an array of [[links]] tables, got {_show(value)}")
        links: dict[frozenset[str], tuple[LinkSpec, int]] = {}
        for index, raw in enumerate(value):
            field = f"links[{index}]"
            spec = self.link_figures(raw, field, default)
            pair = self.link_hosts(raw, field, host_names)
            if pair in links:
                a, b = sorted(pair)
                self.fail(
                    f"{field}.hosts",
                    f"the link between {_show(a)} and {_show(b)} is "
                    f"already given in links[{links[pair][1]}]",
                )
            links[pair] = (spec, index)
        return {pair: spec for pair, (spec, _) in links.items()}

    def link_hosts(
        self, raw: Mapping[str, Any], field: str, host_names: Sequence[str]
    ) -> frozenset[str]:
        pair = raw.get("hosts")
        if pair is None:
            self.fail(f"{field}.hosts", "missing; name the two hosts the link joins")
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(h, str) for h in pair)
        ):
            self.fail(f"{field}.hosts", f"expected an array of two host names, got {_show(pair)}")
        for host in pair:
            if host not in host_names:
                self.fail(
                    f"{field}.hosts",
                    f"unknown host {_show(host)}; hosts in this file: {', '.join(host_names)}",
                )
        if pair[0] == pair[1]:
            self.fail(
                f"{field}.hosts", f"a link joins two different hosts, got {_show(pair[0])} twice"
            )
        return frozenset(pair)

    def hosts(self, value: Any) -> tuple[tuple[HostSpec, ...], tuple[DeviceSpec, ...]]:
        if value is None or value == []:
            self.fail("hosts", "no hosts; add at least one [[hosts]] table with a name and devices")
        if not isinstance(value, list):
            self.fail("hosts", f"expected an array of [[hosts]] tables, got {_show(value)}")
        hosts: list[HostSpec] = []
        devices: list[DeviceSpec] = []
        for index, raw in enumerate(value):
            host = self.host(raw, f"hosts[{index}]")
            earlier = [i for i, h in enumerate(hosts) if h.name == host.name]
            if earlier:
                self.fail(
                    f"hosts[{index}].name",
                    f"duplicate host name {_show(host.name)} "
                    f"(also hosts[{earlier[0]}].name); host names must be unique",
                )
            hosts.append(host)
            devices.extend(self.host_devices(raw, f"hosts[{index}]", host.name))
        return tuple(hosts), tuple(devices)

    def host(self, value: Any, field: str) -> HostSpec:
        table = self.table(value, field)
        self.check_keys(table, _HOST_KEYS, field)
        name = self.string(table, "name", f"{field}.")
        if name is None:
            self.fail(f"{field}.name", "missing; every host needs a unique name")
        if re.search(r"[\s/]", name):
            self.fail(f"{field}.name", f'must not contain spaces or "/", got {_show(name)}')
        address = table.get("address", "")
        if not isinstance(address, str):
            self.fail(
                f"{field}.address",
                f'expected a string such as "10.0.0.1:7390", got {_show(address)}',
            )
        return HostSpec(name=name, address=address)

    def host_devices(self, host: Mapping[str, Any], field: str, host_name: str) -> list[DeviceSpec]:
        raw_devices = host.get("devices")
        if raw_devices is None or raw_devices == []:
            self.fail(
                f"{field}.devices",
                'no devices; list at least one, e.g. devices = [{ type = "T4", count = 2 }]',
            )
        if not isinstance(raw_devices, list):
            self.fail(
                f"{field}.devices", f"expected an array of device tables, got {_show(raw_devices)}"
            )
        devices: list[DeviceSpec] = []
        cpu_field = ""
        for index, raw in enumerate(raw_devices):
            device_field = f"{field}.devices[{index}]"
            device_type, count = self.device(raw, device_field)
            if device_type.kind == "cpu":
                if cpu_field:
                    self.fail(
                        f"{device_field}.type",
                        f"a host has at most one cpu device; {cpu_field} is one already",
                    )
                cpu_field = device_field
                devices.append(DeviceSpec(host=host_name, index=-1, type=device_type))
                continue
            first = sum(1 for d in devices if d.index >= 0)
            devices.extend(
                DeviceSpec(host=host_name, index=first + i, type=device_type) for i in range(count)
            )
        return devices

    def device(self, value: Any, field: str) -> tuple[DeviceType, int]:
        """One device entry: its type (catalogue, cpu or custom, with overrides) and count."""
        table = self.table(value, field)
        type_name = table.get("type")
        if type_name is None:
            self.fail(f"{field}.type", 'missing; give a device type, e.g. "T4" or "cpu"')
        if not isinstance(type_name, str) or not type_name.strip():
            self.fail(f"{field}.type", f"expected a device type name, got {_show(type_name)}")
        known = find_device_type(type_name)
        is_cpu = known is not None and known.kind == "cpu"
        self.check_keys(table, _CPU_KEYS if is_cpu else _GPU_KEYS, field)
        figures = {
            key: self.number(table, key, f"{field}.", zero_ok=key in _ZERO_OK)
            for key in _FIGURES
            if key in table
        }
        if figures.get("usable_memory_fraction", 0.0) > 1:
            fraction = table["usable_memory_fraction"]
            self.fail(
                f"{field}.usable_memory_fraction", f"must be at most 1, got {_show(fraction)}"
            )
        count = self.positive_int(table, "count", f"{field}.") if "count" in table else 1
        if is_cpu:
            base = self.cpu(table, field, figures, count)
        else:
            base = known if known is not None else self.custom_gpu(type_name, field, figures)
        device_type = self.restrict_bits(_with_figures(base, figures), table, field)
        if device_type.usable_memory_bytes <= 0:
            self.fail(
                field,
                "no usable memory left: memory_gib × usable_memory_fraction "
                "− runtime_reserve_gib must be positive",
            )
        return device_type, count

    def cpu(
        self, table: Mapping[str, Any], field: str, figures: Mapping[str, float], count: int
    ) -> DeviceType:
        if count != 1:
            self.fail(f"{field}.count", f"a host has at most one cpu device, got {count}")
        for key in ("cores", "memory_gib"):
            if key not in table:
                self.fail(f"{field}.{key}", "missing; a cpu device needs cores and memory_gib")
        cores = self.positive_int(table, "cores", f"{field}.")
        return cpu_device_type(
            cores=cores,
            memory_bytes=int(figures["memory_gib"] * GIB),
            memory_bandwidth_gb_s=figures.get("memory_bandwidth_gb_s", _CPU_DEFAULT_BANDWIDTH_GB_S),
            fp32_tflops=figures.get("fp32_tflops", cores * DEFAULT_CPU_TFLOPS_PER_CORE),
            native_bf16=self.boolean(table, "native_bf16", f"{field}."),
            packed_kernels=self.boolean(table, "packed_kernels", f"{field}."),
        )

    def custom_gpu(self, type_name: str, field: str, figures: Mapping[str, float]) -> DeviceType:
        needed = "memory_gib, memory_bandwidth_gb_s and fp16_tflops"
        missing = [key for key in _CUSTOM_KEYS if key not in figures]
        if len(missing) == len(_CUSTOM_KEYS):
            known = ", ".join(known_device_types())
            self.fail(
                f"{field}.type",
                f"unknown device type {_show(type_name)}; known types: {known}; or give {needed}",
            )
        if missing:
            self.fail(
                f"{field}.{missing[0]}",
                f"missing; device type {_show(type_name)} is not "
                f"in the catalogue, so {needed} are all needed",
            )
        return gpu_device_type(
            type_name,
            figures["memory_gib"],
            figures["memory_bandwidth_gb_s"],
            figures["fp16_tflops"],
        )

    def restrict_bits(
        self, device_type: DeviceType, table: Mapping[str, Any], field: str
    ) -> DeviceType:
        if "bits" not in table:
            return device_type
        bits, accepted = table["bits"], ", ".join(str(b) for b in sorted(ALL_WEIGHT_BITS))
        if not isinstance(bits, list):
            self.fail(f"{field}.bits", f"expected an array of bit widths, got {_show(bits)}")
        if not bits:
            self.fail(f"{field}.bits", f"must name at least one bit width from {accepted}")
        for width in bits:
            if (
                isinstance(width, bool)
                or not isinstance(width, int)
                or width not in ALL_WEIGHT_BITS
            ):
                self.fail(
                    f"{field}.bits", f"accepted bit widths are {accepted}, got {_show(width)}"
                )
        supported = device_type.supported_bits & frozenset(bits)
        if not supported:
            self.fail(f"{field}.bits", f"{device_type.name} runs none of these bit widths")
        return replace(
            device_type,
            supported_bits=supported,
            fast_kernel_bits=device_type.fast_kernel_bits & supported,
        )


def _with_figures(base: DeviceType, figures: Mapping[str, float]) -> DeviceType:
    """``base`` with the figures a cluster file gives (GiB keys turned into bytes)."""
    changes: dict[str, Any] = {}
    for key, value in figures.items():
        if key in ("memory_gib", "runtime_reserve_gib"):
            changes[key.replace("_gib", "_bytes")] = int(value * GIB)
        else:
            changes[key] = value
    if (
        base.kind == "gpu"
        and "memory_bandwidth_gb_s" in figures
        and "dequant_gelem_s" not in figures
    ):
        changes["dequant_gelem_s"] = figures["memory_bandwidth_gb_s"] / 2
    return replace(base, **changes) if changes else base


_WRITER_SOURCE = "cluster_toml"
_FIELD_KEYS = {  # DeviceType field -> the device key that sets it
    **{key.replace("_gib", "_bytes"): key for key in _FIGURES},
    "supported_bits": "bits",
}
_KEY_ORDER = ("type", "count", "cores", *_FIGURES, "native_bf16", "packed_kernels", "bits")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def cluster_toml(
    cluster: ClusterSpec,
    *,
    model: str | None = None,
    workload: Mapping[str, int] | None = None,
    comment: str = "",
) -> str:
    """The text of a cluster file that loads back to ``cluster``, ``model`` and ``workload``.

    :func:`load_cluster_file` gives back an equal cluster: names, addresses, devices in the same
    order with the same indices, device types equal field by field, the same links. A catalogue
    device is written by name, with only the figures that differ from the catalogue; another
    GPU with the figures the loader needs and those that differ from its defaults; a cpu with
    cores, memory, bandwidth, fp32 rate, ``native_bf16`` and whatever else differs. Consecutive
    identical GPUs of a host share one entry with a ``count``. Every float reads back exactly.

    A device type keeps no core count, so a cpu's ``cores`` is the count whose default rate
    (0.05 TFLOPS per core) is nearest its ``fp32_tflops``, which is written too.

    Args:
        cluster: the cluster.
        model: the top-level ``model`` key, if any.
        workload: the ``[workload]`` table, if any.
        comment: text written first, each line as a ``#`` comment.

    Raises:
        ValueError: the format cannot express something of the cluster; the message names it.
    """
    _check_devices(cluster)
    lines = [*_comment_lines(comment), f"name = {_string(cluster.name)}"]
    if model is not None:
        lines.append(f"model = {_string(model)}")
    if workload:
        lines += ["", "[workload]", *(f"{_key(k)} = {_value(v)}" for k, v in workload.items())]
    lines += ["", "[defaults]", *_link_lines(cluster.default_link)]
    for host in cluster.hosts:
        devices = [device for device in cluster.devices if device.host == host.name]
        lines += ["", *_host_lines(host, devices)]
    for pair, link in sorted(cluster.links.items(), key=lambda item: sorted(item[0])):
        hosts = ", ".join(_string(name) for name in sorted(pair))
        lines += ["", "[[links]]", f"hosts = [{hosts}]", *_link_lines(link)]
    text = "\n".join(lines) + "\n"
    _check_loads_back(text, ClusterFile(cluster, model, dict(workload or {})))
    return text


def _check_devices(cluster: ClusterSpec) -> None:
    """Raise ValueError unless a file can list ``cluster.devices`` as they are: host by host in
    the order of the hosts, each host's GPUs numbered 0, 1, ... in order, at most one cpu."""
    names = [host.name for host in cluster.hosts]
    if len(set(names)) != len(names):
        raise ValueError(f"hosts: host names must be unique, got {names}")
    stray = [device.key for device in cluster.devices if device.host not in names]
    if stray:
        raise ValueError(f"devices {stray}: on no host of the cluster")
    by_host = {name: [d for d in cluster.devices if d.host == name] for name in names}
    if [d for devices in by_host.values() for d in devices] != list(cluster.devices):
        raise ValueError("devices: a cluster file lists them host by host, in the hosts' order")
    for name, devices in by_host.items():
        _check_host_devices(name, devices)


def _check_host_devices(name: str, devices: Sequence[DeviceSpec]) -> None:
    """Raise ValueError unless the host has devices, GPUs numbered 0, 1, ... and one cpu at most."""
    if not devices:
        raise ValueError(f"host {name!r}: no devices; a cluster file needs one at least")
    gpus = [device.index for device in devices if device.type.kind != "cpu"]
    if gpus != list(range(len(gpus))):
        raise ValueError(f"host {name!r}: GPU indices {gpus}; a file numbers them 0, 1, ...")
    cpus = [device.index for device in devices if device.type.kind == "cpu"]
    if cpus not in ([], [-1]):
        raise ValueError(f"host {name!r}: cpu indices {cpus}; a file has one cpu at most, -1")


def _host_lines(host: HostSpec, devices: Sequence[DeviceSpec]) -> list[str]:
    """A ``[[hosts]]`` table: name, address if any, and one device entry per run of devices."""
    lines = ["[[hosts]]", f"name = {_string(host.name)}"]
    if host.address:
        lines.append(f"address = {_string(host.address)}")
    entries = [_device_entry(device, count) for device, count in _runs(devices)]
    if len(entries) == 1:
        return [*lines, f"devices = [{entries[0]}]"]
    return [*lines, "devices = [", *(f"  {entry}," for entry in entries), "]"]


def _runs(devices: Sequence[DeviceSpec]) -> list[tuple[DeviceSpec, int]]:
    """Consecutive GPUs of one type folded together: (the first of them, how many)."""
    runs: list[tuple[DeviceSpec, int]] = []
    for device in devices:
        if runs and device.type.kind != "cpu" and runs[-1][0].type == device.type:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((device, 1))
    return runs


def _device_entry(device: DeviceSpec, count: int) -> str:
    """The inline table of ``count`` devices of ``device``'s type."""
    table = _device_table(device)
    if count > 1:
        table["count"] = count
    pairs = [f"{key} = {_value(table[key])}" for key in _KEY_ORDER if key in table]
    return "{ " + ", ".join(pairs) + " }"


def _device_table(device: DeviceSpec) -> dict[str, Any]:
    """The keys from which the loader builds ``device.type``: the base ones, then one figure at a
    time, the first that the keys so far leave different (a bandwidth before the dequantization
    rate that follows from it), until none is."""
    target = device.type
    table = _base_table(device)
    while True:
        built = _build(table, device)
        missing = [
            key
            for field, key in _FIELD_KEYS.items()
            if key not in table and getattr(built, field) != getattr(target, field)
        ]
        if not missing:
            break
        table[missing[0]] = _figure(target, missing[0])
    wrong = [
        f.name for f in fields(DeviceType) if getattr(built, f.name) != getattr(target, f.name)
    ]
    if wrong:
        what = ", ".join(wrong)
        raise ValueError(
            f"device {device.key} ({target.name}): a cluster file cannot give its {what}"
        )
    return table


def _base_table(device: DeviceSpec) -> dict[str, Any]:
    """The keys a device entry always has: the type, and what the loader needs for it."""
    device_type = device.type
    if device_type.kind == "cpu":
        figures = ("memory_gib", "memory_bandwidth_gb_s", "fp32_tflops")
        return {
            "type": "cpu",
            "cores": _cpu_cores(device_type.fp32_tflops),
            **{key: _figure(device_type, key) for key in figures},
            "native_bf16": device_type.dense_weight_bytes == 2,
            **({"packed_kernels": True} if {2, 3} & device_type.fast_kernel_bits else {}),
        }
    known = find_device_type(device_type.name)
    if known is None:
        return {"type": device_type.name, **{k: _figure(device_type, k) for k in _CUSTOM_KEYS}}
    if known.name != device_type.name or known.kind != device_type.kind:
        raise ValueError(
            f"device {device.key}: a cluster file reads the type name "
            f"{device_type.name!r} as the catalogue's {known.kind} {known.name!r}"
        )
    return {"type": device_type.name}


def _cpu_cores(fp32_tflops: float) -> int:
    """The core count whose default rate is nearest ``fp32_tflops`` (at least 1)."""
    if not math.isfinite(fp32_tflops):
        return 1
    return max(1, round(fp32_tflops / DEFAULT_CPU_TFLOPS_PER_CORE))


def _figure(device_type: DeviceType, key: str) -> Any:
    """The value of a device key for ``device_type`` (GiB keys from bytes, exactly)."""
    if key == "bits":
        return sorted(device_type.supported_bits)
    value = getattr(device_type, key.replace("_gib", "_bytes"))
    return value / GIB if key.endswith("_gib") else value


def _build(table: Mapping[str, Any], device: DeviceSpec) -> DeviceType:
    """The device type the loader builds from ``table``."""
    try:
        return _Reader(_WRITER_SOURCE, None).device(table, f"device {device.key}")[0]
    except ClusterFileError as error:
        raise ValueError(error.msg) from None


def _link_lines(link: LinkSpec) -> list[str]:
    """Bandwidth and latency lines that the loader reads back as ``link`` exactly."""
    bandwidth = f"bandwidth_gbit_s = {_number(link.bandwidth_gb_s * 8)}"
    latency_us = _latency_us(link.latency_s)
    if latency_us is None:
        return [bandwidth, f"latency_s = {_number(link.latency_s)}"]
    return [bandwidth, f"latency_us = {_number(latency_us)}"]


def _latency_us(latency_s: float) -> float | None:
    """A latency in µs that the loader's division by 10^6 turns into ``latency_s`` exactly (a
    short decimal where one does), or None: some floats are no float divided by 10^6."""
    near = latency_s * 1e6
    for candidate in (float(f"{near:.12g}"), near):
        if candidate / 1e6 == latency_s:
            return candidate
    return None


def _check_loads_back(text: str, expected: ClusterFile) -> None:
    """Raise ValueError unless ``text`` loads back to ``expected``."""
    try:
        loaded = parse_cluster_file(tomllib.loads(text), _WRITER_SOURCE)
    except ClusterFileError as error:
        raise ValueError(error.msg) from None
    got, want = loaded.cluster, expected.cluster
    parts = {
        "name": (got.name, want.name),
        "hosts": (got.hosts, want.hosts),
        "devices": (got.devices, want.devices),
        "links": (dict(got.links), dict(want.links)),
        "default_link": (got.default_link, want.default_link),
        "model": (loaded.model, expected.model),
        "workload": (dict(loaded.workload), dict(expected.workload)),
    }
    wrong = [name for name, (a, b) in parts.items() if a != b]
    if wrong:
        raise ValueError(
            f"cluster {want.name!r}: the file would load back other {', '.join(wrong)}"
        )


def _comment_lines(comment: str) -> list[str]:
    """``comment`` as ``#`` lines and a blank line (none for no comment)."""
    lines = comment.splitlines()
    for line in lines:
        _check_unicode(line, "comment")
        if any(char != "\t" and _is_control(char) for char in line):
            raise ValueError(f"comment: a TOML comment cannot hold control characters: {line!r}")
    return [f"# {line}".rstrip() for line in lines] + ([""] if lines else [])


def _value(value: Any) -> str:
    """A TOML value: boolean, integer, float, string or array of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise ValueError(f"a cluster file cannot hold {value!r}")


def _number(value: float) -> str:
    """A float that TOML reads back equal: an integer where it is one, else its repr."""
    value = float(value)
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def _key(key: str) -> str:
    """A TOML key: bare where it can be, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _string(key)


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    _check_unicode(text, "string")
    escaped = (
        _ESCAPES.get(char, f"\\u{ord(char):04X}" if _is_control(char) else char) for char in text
    )
    return '"' + "".join(escaped) + '"'


def _is_control(char: str) -> bool:
    return char < " " or char == "\x7f"


def _check_unicode(text: str, what: str) -> None:
    """Raise ValueError when ``text`` cannot be written as UTF-8 (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {text!r}: not valid Unicode text") from None
