"""Line numbers of fields in a TOML text, so that error messages can say ``file:line``.

tomllib returns plain dicts with no positions; :class:`TomlLineFinder` scans the text instead.
It is best effort: when a field cannot be found, the line of its nearest parent is returned.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_Span = tuple[int, int]


class TomlLineFinder:
    """Best-effort line numbers for dotted field paths, found by scanning a TOML text.

    Understands top-level keys, ``[table]`` and ``[[array]]`` headers (nested ones too), and
    arrays of inline tables (``devices = [{ ... }, { ... }]``). Strings and comments are skipped
    when brackets are matched; a key is looked for only inside its parent's span.
    """

    _HEADER = re.compile(r'^[ \t]*\[(\[?)[ \t]*([\w.\-" ]+?)[ \t]*\]\]?[ \t]*(?:#.*)?$', re.M)

    def __init__(self, text: str) -> None:
        self.text = text
        found = [
            (m.group(2).replace('"', "").replace(" ", ""), m.start())
            for m in self._HEADER.finditer(text)
        ]
        ends = [start for _, start in found[1:]] + [len(text)]
        self.headers = [
            (name, (start, end)) for (name, start), end in zip(found, ends, strict=False)
        ]

    def line(self, field: str) -> int | None:
        """The line of ``field`` (e.g. ``hosts[1].devices[0].type``), or of its nearest parent."""
        span: _Span = (0, self.headers[0][1][0] if self.headers else len(self.text))
        table, line = "", None
        for key, index in re.findall(r"([^.\[\]]+)(?:\[(\d+)\])?", field):
            found = self._key(span, key, index) or self._table(span, table, key, index)
            if found is None:
                break
            span, line = found
            table = f"{table}.{key}" if table else key
        return line

    def _line_of(self, offset: int) -> int:
        return self.text.count("\n", 0, offset) + 1

    def _key(self, span: _Span, key: str, index: str) -> tuple[_Span, int] | None:
        """``key = value`` inside ``span``: the span of the inline table it names, and its line."""
        pattern = re.compile(rf'(?:^|[{{,])[ \t]*(?P<key>"?{re.escape(key)}"?)[ \t]*=[ \t]*', re.M)
        match = pattern.search(self.text, span[0], span[1])
        if match is None:
            return None
        inner = self._inline_table(match.end(), span[1], int(index) if index else None)
        if inner is None:
            return (match.end(), match.end()), self._line_of(match.start("key"))
        return inner, self._line_of(inner[0])

    def _table(self, span: _Span, table: str, key: str, index: str) -> tuple[_Span, int] | None:
        """The ``index``-th ``[table.key]`` header inside ``span``'s table (or anywhere)."""
        name = f"{table}.{key}" if table else key
        start, limit = (span[0], self._subtables_end(span)) if table else (0, len(self.text))
        matches = [
            h_span
            for h_name, h_span in self.headers
            if h_name == name and start <= h_span[0] < limit
        ]
        position = int(index) if index else 0
        if position >= len(matches):
            return None
        return matches[position], self._line_of(matches[position][0])

    def _subtables_end(self, span: _Span) -> int:
        """Where the table whose header starts ``span`` ends, its sub-tables included."""
        owner = next((name for name, h_span in self.headers if h_span[0] == span[0]), None)
        if owner is None:
            return span[1]
        later = (
            h_span[0]
            for name, h_span in self.headers
            if h_span[0] > span[0] and not name.startswith(owner + ".")
        )
        return next(later, len(self.text))

    def _inline_table(self, offset: int, limit: int, index: int | None) -> _Span | None:
        """The ``{...}`` value at ``offset``, or the ``index``-th one of the array there."""
        opener = "{" if index is None else "["
        if not self.text.startswith(opener, offset):
            return None
        depth, count, start, target = 0, -1, offset, 1 if index is None else 2
        for position, char in self._brackets(offset, limit):
            if char in "[{":
                depth += 1
                if depth == target and char == "{":
                    count, start = count + 1, position
                continue
            depth -= 1
            if depth == target - 1 and char == "}" and count == (index or 0):
                return start, position + 1
            if depth == 0:
                return None
        return None

    def _brackets(self, offset: int, limit: int) -> Iterator[tuple[int, str]]:
        """Brackets and braces from ``offset`` on, outside strings and comments."""
        quote, comment, escaped = "", False, False
        for position in range(offset, limit):
            char = self.text[position]
            if comment:
                comment = char != "\n"
            elif escaped:
                escaped = False
            elif quote:
                escaped = char == "\\" and quote == '"'
                quote = "" if char == quote else quote
            elif char in "\"'#":
                quote, comment = ("", True) if char == "#" else (char, False)
            elif char in "[]{}":
                yield position, char
