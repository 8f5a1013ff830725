"""Model shape: what the planner needs to know about a decoder-only transformer.

Built from a Hugging Face ``config.json`` (see :func:`load_model_spec`); every decoder layer of a
supported family has the same shape, so one layer's linear operators describe them all.

Supported ``model_type`` values and how their configs map onto :class:`ModelSpec`:

- ``llama``, ``mistral``, ``qwen2`` (family ``llama``): gated MLP, RMSNorm, rotary positions.
  Llama takes q/k/v and o_proj biases from ``attention_bias`` and FFN biases from ``mlp_bias``;
  Qwen2 always has q/k/v biases and nothing else; Mistral has no biases at all (its modelling
  code ignores both flags). ``head_dim`` is read when present, else ``hidden_size / heads``.
- ``opt``: two-matrix ReLU FFN, LayerNorm, learned positions with OPT's offset of 2 rows, biases
  from ``enable_bias``, token embedding of width ``word_embed_proj_dim``.
- ``bloom``: ALiBi (no position table), FFN width 4·hidden, biases everywhere; BLOOM has no
  length limit, so ``max_positions`` is ``seq_length`` when given, else its training length 2048.
- ``gpt2``: learned positions (``n_positions`` rows), FFN width ``n_inner`` (4·hidden when null).

Known approximations (all O(hidden) parameters, below 0.01 % of any real model): OPT configs
with ``layer_norm_elementwise_affine: false`` have parameter-free norms but are counted with
LayerNorm weights and biases; OPT-350m-style configs (``do_layer_norm_before: false``) have no
final norm but ``head_params`` counts one; BLOOM's LayerNorm after the token embedding is not
in ``embedding_params``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from planner.errors import ModelConfigError
from planner.plan import ModelRef

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples" / "models"
"""Bundled example configs: ``examples/models/<name>/config.json``."""

SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("bloom", "gpt2", "llama", "mistral", "opt", "qwen2")
"""Values of ``model_type`` that :func:`model_spec_from_config` understands."""

WEIGHT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""Checkpoint weight dtypes a config may name."""

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


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
        weight_dtype: the dtype the checkpoint stores its weights in (``torch_dtype`` or
            ``dtype`` of the config: ``float32``, ``bfloat16`` or ``float16``; ``float32``
            when absent, as transformers reads such a checkpoint). 16-bit layers keep it where
            the device computes in it (see ``planner.cost_model.weight16_bytes``).
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
    weight_dtype: str = "float32"

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


# --------------------------------------------------------------------------- whole-model totals


def total_params(spec: ModelSpec) -> int:
    """Parameters of the whole model: every layer, the embedding and the head, where a tied LM
    head is counted once (it is the embedding matrix)."""
    per_layer = spec.layer_weights + spec.layer_bias_params + spec.layer_norm_params
    shared = spec.vocab_size * spec.embed_dim if spec.tied_embeddings else 0
    return spec.num_layers * per_layer + spec.embedding_params + spec.head_params - shared


def example_model_names() -> tuple[str, ...]:
    """Names accepted by :func:`load_model_spec` for the bundled ``examples/models`` configs."""
    if not EXAMPLES_DIR.is_dir():
        return ()
    return tuple(sorted(p.parent.name for p in EXAMPLES_DIR.glob("*/config.json")))


# --------------------------------------------------------------------------- loading configs


def load_model_spec(model: str | Path) -> ModelSpec:
    """Read a model's shape from its Hugging Face ``config.json``.

    Args:
        model: a checkpoint directory holding ``config.json``, a path to a ``config.json``, the
            name of an example under ``examples/models`` (e.g. ``"opt-30b"``) or a Hugging Face
            hub id ``"org/name"`` (needs ``huggingface_hub`` and a reachable hub or a cached
            copy). Local paths win over example names, and both over hub ids.

    Returns:
        The shape, with ``source`` set to ``model`` as given.

    Raises:
        ModelConfigError: the config cannot be found, read or parsed, is of an unsupported
            architecture, or lacks or breaks a field; the message names the file and field.
    """
    source = str(model)
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        config_path, where = path / "config.json", str(path / "config.json")
    elif path.is_file():
        config_path, where = path, source
    elif isinstance(model, str) and (EXAMPLES_DIR / model / "config.json").is_file():
        config_path = EXAMPLES_DIR / model / "config.json"
        where = str(config_path)
    elif isinstance(model, str) and _is_hub_id(model):
        config_path, where = _download_hub_config(model), f"{model}/config.json"
    else:
        raise ModelConfigError(
            f"{source}: no config.json here; give a checkpoint directory, a config.json, "
            "a hub id (org/name) or the name of an example under examples/models"
        )
    return model_spec_from_config(_read_config(config_path, where), source, where=where)


def model_spec_from_config(
    config: Mapping[str, Any], source: str, *, where: str | None = None
) -> ModelSpec:
    """Build the shape from the contents of a Hugging Face ``config.json``.

    Args:
        config: the parsed JSON object.
        source: what the model was given as (path, example name or hub id); kept in the spec.
        where: how error messages name the config (default: ``source``).

    Raises:
        ModelConfigError: unsupported ``model_type``, or a missing or invalid field.
    """
    fields = _ConfigFields(config, where or source)
    builder = _BUILDERS.get(fields.model_type)
    if builder is None:
        raise ModelConfigError(
            f'unsupported architecture "{fields.model_type}" in {fields.where}; '
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return replace(builder(fields, source), weight_dtype=fields.weight_dtype())


def _is_hub_id(model: str) -> bool:
    """Whether ``model`` reads as a hub id ``org/name`` rather than a (missing) local path."""
    return bool(_HUB_ID.fullmatch(model)) and not model.endswith(".json")


def _download_hub_config(repo_id: str) -> Path:
    """Fetch ``config.json`` of a hub repository (or find it in the local hub cache)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise _hub_error(repo_id, "huggingface_hub is not installed") from exc
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except Exception as exc:  # any hub, network or cache failure is reported the same way
        raise _hub_error(repo_id, type(exc).__name__) from exc


def _hub_error(repo_id: str, reason: str) -> ModelConfigError:
    return ModelConfigError(
        f"{repo_id}: not a local path, and could not fetch its config.json from the Hugging Face "
        f"hub ({reason}); no hub may be reachable from here: pass a local checkpoint directory "
        "or config.json instead"
    )


def _read_config(path: Path, where: str) -> Mapping[str, Any]:
    """Parse a config file into a JSON object, naming the file on any failure."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelConfigError(f"{where}: cannot read ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ModelConfigError(f"{where}: not valid JSON: not UTF-8 text") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{where}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


class _ConfigFields:
    """Typed, validated reads of one config's fields; errors name the file, field and family."""

    def __init__(self, config: Mapping[str, Any], where: str) -> None:
        self.config = config
        self.where = where
        model_type = config.get("model_type")
        if model_type is None:
            raise ModelConfigError(
                f'{where}: missing field "model_type"; is this a Hugging Face config.json?'
            )
        self.model_type = str(model_type)

    def size(self, *keys: str, default: int | None = None) -> int:
        """A positive integer read from the first of ``keys`` that is present and not null."""
        for key in keys:
            value = self.config.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ModelConfigError(
                    f'{self.where}: field "{key}" must be a positive integer, '
                    f"got {json.dumps(value)}"
                )
            return value
        if default is not None:
            return default
        others = "".join(f'; "{k}" is also accepted' for k in keys[1:])
        raise ModelConfigError(
            f'{self.where}: missing field "{keys[0]}" (needed for {self.model_type} models{others})'
        )

    def weight_dtype(self) -> str:
        """The weights' dtype (``torch_dtype``, or ``dtype`` as transformers 5 writes it)."""
        for key in ("torch_dtype", "dtype"):
            value = self.config.get(key)
            if value is None:
                continue
            name = str(value).removeprefix("torch.")
            if name not in WEIGHT_DTYPES:
                raise ModelConfigError(
                    f'{self.where}: field "{key}" must be one of {", ".join(WEIGHT_DTYPES)}, '
                    f"got {json.dumps(value)}"
                )
            return name
        return "float32"

    def flag(self, key: str, default: bool) -> bool:
        """A boolean field, ``default`` when absent or null."""
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ModelConfigError(
                f'{self.where}: field "{key}" must be true or false, got {json.dumps(value)}'
            )
        return value

    def kv_heads(self, num_heads: int) -> int:
        """Key/value heads (``num_key_value_heads``, default ``num_heads``); must divide them."""
        num_kv_heads = self.size("num_key_value_heads", default=num_heads)
        if num_heads % num_kv_heads:
            raise ModelConfigError(
                f"{self.where}: {num_heads} attention heads are not divisible by "
                f"{num_kv_heads} key/value heads"
            )
        return num_kv_heads

    def head_dim(self, hidden_size: int, num_heads: int) -> int:
        """Width of one head: ``hidden_size / num_heads``, which must divide."""
        if hidden_size % num_heads:
            raise ModelConfigError(
                f"{self.where}: hidden size {hidden_size} is not divisible by "
                f"{num_heads} attention heads"
            )
        return hidden_size // num_heads


def _llama_family(f: _ConfigFields, source: str) -> ModelSpec:
    """Llama, Mistral and Qwen2: gated MLP, RMSNorm, rotary positions, grouped-query attention."""
    hidden = f.size("hidden_size")
    heads = f.size("num_attention_heads")
    kv_heads = f.kv_heads(heads)
    head_dim = f.size("head_dim", default=0) or f.head_dim(hidden, heads)  # 0: not in config
    if f.model_type == "qwen2":
        qkv_bias, out_bias, mlp_bias = True, False, False
    elif f.model_type == "mistral":
        qkv_bias = out_bias = mlp_bias = False
    else:
        qkv_bias = out_bias = f.flag("attention_bias", False)
        mlp_bias = f.flag("mlp_bias", False)
    return ModelSpec(
        source=source,
        family="llama",
        num_layers=f.size("num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=f.size("intermediate_size"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=f.size("vocab_size"),
        max_positions=f.size("max_position_embeddings"),
        tied_embeddings=f.flag("tie_word_embeddings", False),
        gated_mlp=True,
        attention_bias=qkv_bias,
        output_bias=out_bias,
        mlp_bias=mlp_bias,
        position_table_rows=0,
        embed_dim=hidden,
        norm_bias=False,
    )


def _opt(f: _ConfigFields, source: str) -> ModelSpec:
    """OPT: ReLU FFN, LayerNorm, learned positions with an offset of 2 rows, optional biases."""
    hidden = f.size("hidden_size")
    heads = f.size("num_attention_heads")
    max_positions = f.size("max_position_embeddings")
    bias = f.flag("enable_bias", True)
    return ModelSpec(
        source=source,
        family="opt",
        num_layers=f.size("num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=f.size("ffn_dim"),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=f.head_dim(hidden, heads),
        vocab_size=f.size("vocab_size"),
        max_positions=max_positions,
        tied_embeddings=f.flag("tie_word_embeddings", True),
        gated_mlp=False,
        attention_bias=bias,
        output_bias=bias,
        mlp_bias=bias,
        position_table_rows=max_positions + 2,
        embed_dim=f.size("word_embed_proj_dim", default=hidden),
        norm_bias=True,
    )


def _bloom(f: _ConfigFields, source: str) -> ModelSpec:
    """BLOOM: GELU FFN of width 4·hidden, LayerNorm, ALiBi, biases everywhere."""
    hidden = f.size("n_embed", "hidden_size")
    heads = f.size("n_head", "num_attention_heads")
    return ModelSpec(
        source=source,
        family="bloom",
        num_layers=f.size("n_layer", "num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=f.head_dim(hidden, heads),
        vocab_size=f.size("vocab_size"),
        max_positions=f.size("seq_length", default=2048),
        tied_embeddings=f.flag("tie_word_embeddings", True),
        gated_mlp=False,
        attention_bias=True,
        output_bias=True,
        mlp_bias=True,
        position_table_rows=0,
        embed_dim=hidden,
        norm_bias=True,
    )


def _gpt2(f: _ConfigFields, source: str) -> ModelSpec:
    """GPT-2: GELU FFN, LayerNorm, learned positions, biases everywhere."""
    hidden = f.size("n_embd", "hidden_size")
    heads = f.size("n_head", "num_attention_heads")
    max_positions = f.size("n_positions", "max_position_embeddings")
    return ModelSpec(
        source=source,
        family="gpt2",
        num_layers=f.size("n_layer", "num_hidden_layers"),
        hidden_size=hidden,
        intermediate_size=f.size("n_inner", default=4 * hidden),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=f.head_dim(hidden, heads),
        vocab_size=f.size("vocab_size"),
        max_positions=max_positions,
        tied_embeddings=f.flag("tie_word_embeddings", True),
        gated_mlp=False,
        attention_bias=True,
        output_bias=True,
        mlp_bias=True,
        position_table_rows=max_positions,
        embed_dim=hidden,
        norm_bias=True,
    )


_BUILDERS: Mapping[str, Callable[[_ConfigFields, str], ModelSpec]] = {
    "bloom": _bloom,
    "gpt2": _gpt2,
    "llama": _llama_family,
    "mistral": _llama_family,
    "opt": _opt,
    "qwen2": _llama_family,
}
assert tuple(sorted(_BUILDERS)) == SUPPORTED_MODEL_TYPES
