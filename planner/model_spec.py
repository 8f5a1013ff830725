"""Model shape: what the planner needs to know about a decoder-only transformer.

Built from a Hugging Face ``config.json`` (see :func:`load_model_spec`); every decoder layer of a
supported family has the same shape, so one layer's linear operators describe them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.plan import ModelRef


@dataclass(frozen=True, slots=True)
class LinearOp:
    """One linear operator of a decoder layer: y = W x (+ b), W is out_features × in_features."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def num_weights(self) -> int:
        """Weight elements of the operator."""
        return self.in_features * self.out_features


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Shape of a decoder-only transformer.

    Attributes:
        source: the path or hub id the shape was read from.
        family: ``llama`` (also Qwen2, Mistral), ``opt``, ``bloom`` or ``gpt2``.
        num_layers: decoder layers (L).
        hidden_size: model width (h1).
        intermediate_size: FFN width (h2).
        num_heads: attention heads.
        num_kv_heads: key/value heads (< num_heads under grouped-query attention).
        head_dim: width of one head.
        vocab_size: vocabulary size (rows of the embedding and the LM head).
        max_positions: longest sequence the model accepts, tokens.
        tied_embeddings: the LM head shares the embedding matrix.
        gated_mlp: the FFN has gate, up and down projections (Llama) instead of two.
        attention_bias: q/k/v projections have biases.
        output_bias: the attention output projection has a bias.
        mlp_bias: the FFN projections have biases.
        position_table_rows: rows of a learned position embedding (0 for rotary or ALiBi).
        embed_dim: width of the token embedding (OPT-350m projects it to hidden_size).
        norm_bias: the norms have a bias (LayerNorm) or not (RMSNorm).
    """

    source: str
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
    gated_mlp: bool
    attention_bias: bool
    output_bias: bool
    mlp_bias: bool
    position_table_rows: int
    embed_dim: int
    norm_bias: bool

    @property
    def kv_width(self) -> int:
        """Width of the K (or V) projection output."""
        return self.num_kv_heads * self.head_dim

    def layer_linears(self) -> tuple[LinearOp, ...]:
        """The linear operators of one decoder layer, in execution order."""
        h, kv, inter = self.hidden_size, self.kv_width, self.intermediate_size
        q_width = self.num_heads * self.head_dim
        ops = [
            LinearOp("q_proj", h, q_width, self.attention_bias),
            LinearOp("k_proj", h, kv, self.attention_bias),
            LinearOp("v_proj", h, kv, self.attention_bias),
            LinearOp("o_proj", q_width, h, self.output_bias),
        ]
        if self.gated_mlp:
            ops += [
                LinearOp("gate_proj", h, inter, self.mlp_bias),
                LinearOp("up_proj", h, inter, self.mlp_bias),
                LinearOp("down_proj", inter, h, self.mlp_bias),
            ]
        else:
            ops += [
                LinearOp("fc1", h, inter, self.mlp_bias),
                LinearOp("fc2", inter, h, self.mlp_bias),
            ]
        return tuple(ops)

    @property
    def layer_weights(self) -> int:
        """Linear weight elements of one decoder layer."""
        return sum(op.num_weights for op in self.layer_linears())

    @property
    def layer_norm_params(self) -> int:
        """Parameters of the two norms of one decoder layer."""
        return 2 * self.hidden_size * (2 if self.norm_bias else 1)

    @property
    def layer_bias_params(self) -> int:
        """Bias parameters of one decoder layer's linear operators."""
        return sum(op.out_features for op in self.layer_linears() if op.bias)

    @property
    def embedding_params(self) -> int:
        """Parameters on the first stage: token (+ position) embedding and any projection."""
        params = self.vocab_size * self.embed_dim + self.position_table_rows * self.hidden_size
        if self.embed_dim != self.hidden_size:
            params += self.embed_dim * self.hidden_size
        return params

    @property
    def head_params(self) -> int:
        """Parameters on the last stage: final norm, any projection and the LM head."""
        params = self.hidden_size * (2 if self.norm_bias else 1) + self.vocab_size * self.embed_dim
        if self.embed_dim != self.hidden_size:
            params += self.embed_dim * self.hidden_size
        return params

    def to_ref(self) -> ModelRef:
        """The plan's record of this model."""
        return ModelRef(
            source=self.source,
            family=self.family,
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            vocab_size=self.vocab_size,
            tied_embeddings=self.tied_embeddings,
        )
