"""Files shipped with the runtime: the built-in default model."""

from __future__ import annotations

from pathlib import Path

BUILTIN_MODEL_NAME = "bard-tiny"
"""The small Llama-architecture model pqctl uses when no --model is given."""


def builtin_model_dir() -> Path:
    """Directory of the built-in model (config.json; weights and tokenizer when trained)."""
    return Path(__file__).resolve().parent / BUILTIN_MODEL_NAME
