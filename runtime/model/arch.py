"""What a stage needs to know about a checkpoint's architecture, read from its config.json.

Supported families: Llama (also Qwen2 and Mistral, which share its layer structure), OPT, GPT-2
and BLOOM (both run through OPT's layout: ``runtime.model.mapped`` maps their tensors). Tensor
names follow the Hugging Face checkpoints of each family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import CheckpointError, UnsupportedArchitectureError

LLAMA_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TYPES = (*LLAMA_TYPES, "opt", "gpt2", "bloom")
SERVED_FAMILIES = ("llama", "opt", "gpt2", "bloom")
"""The plan families (``planner.model_spec``) a stage can run; ``pqctl apply`` refuses a plan
of any other family."""


@dataclass(frozen=True, slots=True)
class ArchConfig:
    """Shape and numerics of a decoder-only model, in the form the stage modules use.

    ``raw`` keeps the whole config.json for family-specific details (e.g. rope scaling).
    """

    model_type: str
    family: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    tied_embeddings: bool
    norm_eps: float
    attention_bias: bool
    output_bias: bool
    mlp_bias: bool
    activation: str
    sliding_window: int | None = None
    embed_dim: int = 0
    norm_before: bool = True
    final_norm: bool = True
    position_offset: int = 0  # learned positions: row of position p is p + offset (OPT: 2)
    alibi: bool = False  # ALiBi attention biases instead of a position table (BLOOM)
    embed_norm: bool = False  # a LayerNorm right after the token embedding (BLOOM)
    plan_family: str = ""  # the planner's family when the stage code runs another's layout
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def read_config(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; CheckpointError when absent or unreadable."""
    path = checkpoint / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{checkpoint}: no config.json; is this a checkpoint?") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def arch_from_config(data: dict[str, Any], source: str) -> ArchConfig:
    """Build an ArchConfig; UnsupportedArchitectureError for other families."""
    model_type = str(data.get("model_type", "<missing>"))
    if model_type in LLAMA_TYPES:
        return _llama(data, model_type)
    if model_type == "opt":
        return _opt(data)
    if model_type == "gpt2":
        return _gpt2(data)
    if model_type == "bloom":
        return _bloom(data)
    raise UnsupportedArchitectureError(
        f'unsupported architecture "{model_type}" in {source}; supported: '
        + ", ".join(sorted(SUPPORTED_TYPES))
    )


def _get(data: dict[str, Any], key: str, default: Any = None) -> Any:
    value = data.get(key, default)
    if value is None and default is None:
        raise CheckpointError(f'config.json: missing field "{key}"')
    return value


def _llama(data: dict[str, Any], model_type: str) -> ArchConfig:
    hidden, heads = int(_get(data, "hidden_size")), int(_get(data, "num_attention_heads"))
    head_dim = data.get("head_dim") or hidden // heads
    attention_bias = bool(data.get("attention_bias", False))
    qkv_bias = model_type == "qwen2" or (model_type == "llama" and attention_bias)
    window = data.get("sliding_window")
    if model_type == "qwen2" and not data.get("use_sliding_window", False):
        window = None
    return ArchConfig(
        model_type=model_type,
        family="llama",
        num_layers=int(_get(data, "num_hidden_layers")),
        hidden_size=hidden,
        intermediate_size=int(_get(data, "intermediate_size")),
        num_heads=heads,
        num_kv_heads=int(data.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        vocab_size=int(_get(data, "vocab_size")),
        max_positions=int(data.get("max_position_embeddings", 2048)),
        tied_embeddings=bool(data.get("tie_word_embeddings", False)),
        norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        attention_bias=qkv_bias,
        output_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and bool(data.get("mlp_bias", False)),
        activation=str(data.get("hidden_act", "silu")),
        sliding_window=int(window) if window else None,
        embed_dim=hidden,
        raw=data,
    )


def _opt(data: dict[str, Any]) -> ArchConfig:
    hidden, heads = int(_get(data, "hidden_size")), int(_get(data, "num_attention_heads"))
    bias = bool(data.get("enable_bias", True))
    if not data.get("layer_norm_elementwise_affine", True):
        raise UnsupportedArchitectureError(
            "OPT checkpoints without elementwise-affine layer norms are not supported"
        )
    before = bool(data.get("do_layer_norm_before", True))
    return ArchConfig(
        model_type="opt",
        family="opt",
        num_layers=int(_get(data, "num_hidden_layers")),
        hidden_size=hidden,
        intermediate_size=int(_get(data, "ffn_dim")),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=int(_get(data, "vocab_size")),
        max_positions=int(data.get("max_position_embeddings", 2048)),
        tied_embeddings=bool(data.get("tie_word_embeddings", True)),
        norm_eps=1e-5,
        attention_bias=bias,
        output_bias=bias,
        mlp_bias=bias,
        activation=str(data.get("activation_function", "relu")),
        embed_dim=int(data.get("word_embed_proj_dim") or hidden),
        norm_before=before,
        final_norm=before and not data.get("_remove_final_layer_norm", False),
        position_offset=2,
        raw=data,
    )


def _gpt2(data: dict[str, Any]) -> ArchConfig:
    """GPT-2, served through OPT's layout (runtime.model.mapped maps its tensors)."""
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if data.get(flag):
            raise UnsupportedArchitectureError(f"GPT-2 checkpoints with {flag} are not supported")
    if data.get("scale_attn_weights", True) is False:
        raise UnsupportedArchitectureError("GPT-2 checkpoints with scale_attn_weights=false")
    hidden, heads = int(_get(data, "n_embd")), int(_get(data, "n_head"))
    return ArchConfig(
        model_type="gpt2",
        family="opt",
        num_layers=int(_get(data, "n_layer")),
        hidden_size=hidden,
        intermediate_size=int(data.get("n_inner") or 4 * hidden),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=int(_get(data, "vocab_size")),
        max_positions=int(data.get("n_positions", 1024)),
        tied_embeddings=bool(data.get("tie_word_embeddings", True)),
        norm_eps=float(data.get("layer_norm_epsilon", 1e-5)),
        attention_bias=True,
        output_bias=True,
        mlp_bias=True,
        activation=str(data.get("activation_function", "gelu_new")),
        embed_dim=hidden,
        position_offset=0,
        plan_family="gpt2",
        raw=data,
    )


def _bloom(data: dict[str, Any]) -> ArchConfig:
    """BLOOM, served through OPT's layout with ALiBi (runtime.model.mapped maps its tensors)."""
    if data.get("apply_residual_connection_post_layernorm"):
        raise UnsupportedArchitectureError(
            "BLOOM checkpoints with apply_residual_connection_post_layernorm are not supported"
        )
    hidden = int(data.get("hidden_size") or _get(data, "n_embed"))
    heads = int(data.get("n_head") or _get(data, "num_attention_heads"))
    return ArchConfig(
        model_type="bloom",
        family="opt",
        num_layers=int(data.get("n_layer") or _get(data, "num_hidden_layers")),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        vocab_size=int(_get(data, "vocab_size")),
        max_positions=int(data.get("seq_length") or data.get("max_position_embeddings") or 2048),
        tied_embeddings=bool(data.get("tie_word_embeddings", True)),
        norm_eps=float(data.get("layer_norm_epsilon", 1e-5)),
        attention_bias=True,
        output_bias=True,
        mlp_bias=True,
        activation="bloom_gelu",
        embed_dim=hidden,
        alibi=True,
        embed_norm=True,
        plan_family="bloom",
        raw=data,
    )


def layer_prefix(arch: ArchConfig, layer: int) -> str:
    """Tensor-name prefix of decoder layer ``layer``."""
    if arch.family == "opt":
        return f"model.decoder.layers.{layer}."
    return f"model.layers.{layer}."


LINEAR_NAMES = {
    "llama": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj",
        "up": "mlp.up_proj",
        "down": "mlp.down_proj",
    },
    "opt": {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "fc1": "fc1",
        "fc2": "fc2",
    },
}
"""Linear operators of one layer: our short name → the checkpoint's module path."""

NORM_NAMES = {
    "llama": {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"},
    "opt": {"attn_norm": "self_attn_layer_norm", "mlp_norm": "final_layer_norm"},
}
"""Norms of one layer: our short name → the checkpoint's module path."""
