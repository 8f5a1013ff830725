"""Tiny random checkpoints of every supported family, saved the way users' checkpoints are."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

COMMON = {
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "initializer_range": 0.15,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_configs() -> dict[str, PretrainedConfig]:
    """One small config per family variant the runtime supports."""
    llama = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        **COMMON,
    }
    return {
        "llama": LlamaConfig(**llama, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**llama, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**llama),
        "mistral": MistralConfig(**llama, sliding_window=6),
        "opt": OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            **COMMON,
        ),
        "opt-350m-style": OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
            **COMMON,
        ),
    }


def save_checkpoint(config: PretrainedConfig, directory: Path, seed: int = 0) -> Path:
    """Randomly initialise ``config``'s model and save it with save_pretrained."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(directory, safe_serialization=True)
    return directory
