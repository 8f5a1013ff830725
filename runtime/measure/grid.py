"""The grid of operating points ``pqctl profile`` measures: which (micro-batch, length) pairs per
phase, in what order, how many passes. Plain data with no torch, so the command line can read and
check a grid before the measuring code loads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Phase = Literal["prefill", "decode"]
MIN_POINTS: dict[str, int] = {"prefill": 5, "decode": 4}
"""Fewest distinct points per (bits, phase) the regression forms need."""


@dataclass(frozen=True, slots=True)
class GridPoint:
    """One operating point: ``context_len`` is the prompt length (prefill) or the attended
    context, past + 1 (decode)."""

    phase: Phase
    micro_batch: int
    context_len: int

    @property
    def work(self) -> int:
        """Token rows times attended positions: a cost proxy for ordering and estimates."""
        rows = self.micro_batch * (self.context_len if self.phase == "prefill" else 1)
        return rows * (1 + self.context_len // 64)


@dataclass(frozen=True, slots=True)
class ProfileGrid:
    """The points to measure and how.

    Attributes:
        prefill_batches, prompt_lens: the prefill grid (every pair).
        decode_batches, contexts: the decode grid (every pair).
        repeats: passes over the grid per precision (the shortest time over passes counts).
        spread_s: the passes of one precision span at least this many seconds: when
            ``repeats`` passes are quicker, more follow (up to ``MAX_PASS_FACTOR × repeats``),
            so the samples of a small model's points are as far apart as a large one's.
        stack_layers: decoder layers in the timed stack (at most the model's). Eight rather
            than four: a stack that a real stage's weights outgrow stays partly in the CPU's
            caches and times decode too fast (bench/costmodel.py --standard on a 2-core AVX2
            CPU, decode MAPE of the h1024 model 15.1 % with 4, 12.1 % with 8; bard-tiny 6.3 %
            → 3.9 %).
    """

    prefill_batches: tuple[int, ...]
    prompt_lens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    contexts: tuple[int, ...]
    repeats: int = 5
    stack_layers: int = 8
    spread_s: float = 0.0

    def points(self, phase: Phase) -> list[GridPoint]:
        """The phase's points, the four corners and the centre first, then cheapest first."""
        if phase == "prefill":
            batches, lens = self.prefill_batches, self.prompt_lens
        else:
            batches, lens = self.decode_batches, self.contexts
        grid = [GridPoint(phase, b, n) for b in sorted(set(batches)) for n in sorted(set(lens))]
        if not grid:
            return []
        bs, ns = sorted(set(batches)), sorted(set(lens))
        centre = GridPoint(phase, bs[len(bs) // 2], ns[len(ns) // 2])
        corners = [GridPoint(phase, b, n) for b in (bs[0], bs[-1]) for n in (ns[0], ns[-1])]
        first = list(dict.fromkeys([*corners, centre]))
        return first + sorted((p for p in grid if p not in first), key=lambda p: p.work)

    def clipped(self, max_len: int) -> ProfileGrid:
        """The grid without lengths beyond ``max_len`` tokens (the model's positions)."""
        return ProfileGrid(
            self.prefill_batches,
            tuple(n for n in self.prompt_lens if n <= max_len) or (max_len,),
            self.decode_batches,
            tuple(n for n in self.contexts if n <= max_len) or (max_len,),
            self.repeats,
            self.stack_layers,
            self.spread_s,
        )


QUICK_GRID = ProfileGrid(
    (1, 2, 4), (32, 64, 128), (1, 2, 4, 8), (64, 128, 256), repeats=6, spread_s=10.0
)
FULL_GRID = ProfileGrid(
    (1, 2, 4, 8),
    (64, 128, 256, 512),
    (1, 2, 4, 8, 16),
    (128, 256, 512, 1024),
    repeats=8,
    spread_s=20.0,
)


__all__ = ["FULL_GRID", "MIN_POINTS", "QUICK_GRID", "GridPoint", "Phase", "ProfileGrid"]
