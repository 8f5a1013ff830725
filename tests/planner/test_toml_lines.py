"""Tests of planner/toml_lines.py: line numbers of dotted field paths in TOML text."""

from __future__ import annotations

import pytest

from planner.toml_lines import TomlLineFinder

TEXT = """\
name = "c"                      # 1
[workload]                      # 2
batch = 4                       # 3
[[hosts]]                       # 4
name = "a"                      # 5
devices = [                     # 6
  { type = "T4", count = 2 },   # 7
  { type = "[x]", note = "{" }, # 8
  { type = "V100",              # 9
    count = 3 },                # 10 (not valid TOML 1.0, but scanned all the same)
]                               # 11
[[hosts]]                       # 12
name = "b"                      # 13
[[hosts.devices]]               # 14
type = "L4"                     # 15
[[hosts.devices]]               # 16
type = "A10G"                   # 17
count = 0                       # 18
[[links]]                       # 19
hosts = ["a", "b"]              # 20
"""


@pytest.mark.parametrize(
    ("field", "line"),
    [
        ("name", 1),
        ("workload", 2),
        ("workload.batch", 3),
        ("workload.max_new", 2),
        ("hosts", 4),
        ("hosts[0]", 4),
        ("hosts[0].name", 5),
        ("hosts[0].devices", 6),
        ("hosts[0].devices[0].count", 7),
        ("hosts[0].devices[1]", 8),
        ("hosts[0].devices[2].type", 9),
        ("hosts[0].devices[2].count", 10),
        ("hosts[0].devices[2].bits", 9),
        ("hosts[1].name", 13),
        ("hosts[1].devices[0].type", 15),
        ("hosts[1].devices[1].count", 18),
        ("hosts[1].address", 12),
        ("links[0].hosts", 20),
        ("links[0].latency_us", 19),
        ("hosts[0].devices[5]", 6),
        ("hosts[3].name", None),
        ("defaults", None),
        ("model", None),
    ],
)
def test_lines_of_fields(field: str, line: int | None) -> None:
    assert TomlLineFinder(TEXT).line(field) == line


def test_a_text_without_headers() -> None:
    finder = TomlLineFinder('name = "x"\nmodel = "y"\n')
    assert (finder.line("model"), finder.line("hosts")) == (2, None)
