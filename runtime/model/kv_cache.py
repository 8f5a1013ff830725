"""Per-stage KV cache, preallocated for the plan's batch at full length and never moved.

Every sequence of the global batch owns a slot; a micro-batch is a contiguous range of slots.
Sequences are left-padded, so all slots of a micro-batch hold the same number of positions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.model.memory import huge_page_zeros


class KVCache:
    """Keys and values of a stage's layers: per layer [slots, kv_heads, max_len, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.values = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        """Resident bytes of the whole cache."""
        return sum(t.nbytes for t in self.keys) + sum(t.nbytes for t in self.values)

    def write(
        self, layer: int, slots: tuple[int, int], past: int, k: Tensor, v: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Store new keys/values at positions past.. of the slots; return all cached so far.

        Args:
            layer: the stage-local layer index.
            slots: half-open slot range of the micro-batch.
            past: positions already cached for these slots.
            k, v: [bsz, kv_heads, seqlen, head_dim] for the new tokens.

        Returns:
            keys, values: [bsz, kv_heads, past + seqlen, head_dim] views into the cache.
        """
        end = past + k.shape[2]
        keys, values = self.slot_views(layer, slots, end)
        keys[:, :, past:end] = k
        values[:, :, past:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def slot_views(self, layer: int, slots: tuple[int, int], end: int) -> tuple[Tensor, Tensor]:
        """The slots' keys and values of one layer at full length, [bsz, kv_heads, max_len,
        head_dim] views to write positions up to ``end`` into.

        Raises:
            ValueError: ``end`` is past the cache's length.
        """
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache's {self.max_len}")
        start, stop = slots
        return self.keys[layer][start:stop], self.values[layer][start:stop]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """One layer's keys or values: on the host in huge pages (every decode step reads them)."""
    if torch.device(device).type == "cpu":
        return huge_page_zeros(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)
