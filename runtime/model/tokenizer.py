"""The gateway's tokenizer: the checkpoint's own, through transformers' AutoTokenizer.

Prompts are encoded the way ``tokenizer(prompt)`` does for that model (a Llama tokenizer adds
its BOS; the built-in model's adds nothing), so pqctl's token ids match a transformers user's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.errors import CheckpointError


class Tokenizer:
    """``encode(text) -> ids`` and ``decode(ids, skip_special_tokens)`` of a checkpoint."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def encode(self, text: str) -> list[int]:
        ids: list[int] = self.backend(text)["input_ids"]
        return list(ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text: str = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return text


def load_tokenizer(directory: Path) -> tuple[Tokenizer, int, tuple[int, ...]]:
    """The tokenizer of a checkpoint directory, its padding id and its end-of-sequence ids.

    Raises:
        CheckpointError: the directory has no tokenizer transformers can load.
    """
    from transformers import AutoTokenizer, GenerationConfig

    try:
        backend = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{directory}: no usable tokenizer ({exc})") from None
    eos: set[int] = set()
    if backend.eos_token_id is not None:
        eos.add(int(backend.eos_token_id))
    try:
        generation = GenerationConfig.from_pretrained(str(directory))
        configured = generation.eos_token_id
        if configured is not None:
            eos.update([configured] if isinstance(configured, int) else configured)
    except OSError:
        pass
    pad = backend.pad_token_id
    if pad is None:
        pad = min(eos) if eos else 0
    return Tokenizer(backend), int(pad), tuple(sorted(eos))
