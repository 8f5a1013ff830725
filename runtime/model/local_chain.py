"""Run a plan's stage shards one after another in this process.

The reference for the distributed pipeline: same shards, same micro-batch layout (prefill
chunks of ``prefill_size`` sequences merging into decode micro-batches of ``decode_size``),
no sockets. Sequences are left-padded to the batch's longest prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.model.shard import StageShard


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions of left-padded prompts: 0.. over real tokens, 0 at padding. [bsz, seqlen]"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class GreedyResult:
    """New tokens [bsz, steps] and the fp32 logits that chose them, one [bsz, vocab] per step."""

    tokens: Tensor
    logits: list[Tensor]


class LocalChain:
    """The stages of a plan, chained in-process."""

    def __init__(self, shards: Sequence[StageShard]) -> None:
        if not shards or shards[0].embedding is None or shards[-1].head is None:
            raise ValueError("a chain starts with the embedding stage and ends with the head")
        self.shards = list(shards)

    def step(
        self,
        x: Tensor,
        slots: tuple[int, int],
        past: int,
        positions: Tensor,
        key_valid: Tensor,
        last_only: bool = True,
    ) -> Tensor:
        """One micro-batch through every stage; fp32 logits out."""
        for shard in self.shards:
            x = shard(x, shard.context(slots, past, positions, key_valid), last_only)
        return x

    def greedy(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new: int,
        prefill_size: int | None = None,
        decode_size: int | None = None,
    ) -> GreedyResult:
        """Greedy generation of ``max_new`` tokens for a left-padded batch.

        Args:
            input_ids: [bsz, seqlen] prompt tokens, left-padded.
            attention_mask: [bsz, seqlen] 1 at real tokens, 0 at padding.
            max_new: tokens to generate per sequence.
            prefill_size / decode_size: micro-batch sizes (default: the whole batch).
        """
        bsz, seqlen = input_ids.shape
        decode = decode_size or bsz
        prefill = prefill_size or decode
        valid = attention_mask.bool()
        positions = positions_from_mask(attention_mask)
        logits = torch.empty(bsz, self.shards[-1].arch.vocab_size)
        for start in range(0, bsz, prefill):
            rows = slice(start, min(start + prefill, bsz))
            out = self.step(
                input_ids[rows], (rows.start, rows.stop), 0, positions[rows], valid[rows]
            )
            logits[rows] = out[:, -1].cpu()
        steps, tokens = [logits], [logits.argmax(-1)]
        for past in range(seqlen, seqlen + max_new - 1):
            positions = positions[:, -1:] + 1
            valid = torch.cat([valid, torch.ones(bsz, 1, dtype=torch.bool)], dim=1)
            logits = torch.empty_like(logits)
            for start in range(0, bsz, decode):
                rows = slice(start, min(start + decode, bsz))
                out = self.step(
                    tokens[-1][rows, None],
                    (rows.start, rows.stop),
                    past,
                    positions[rows],
                    valid[rows],
                )
                logits[rows] = out[:, -1].cpu()
            steps.append(logits)
            tokens.append(logits.argmax(-1))
        return GreedyResult(torch.stack(tokens, dim=1), steps)
