"""Checkpoints of families the stage code serves through OPT's layout: GPT-2 and BLOOM.

Both are OPT's layer structure (LayerNorms with biases, an unprojected FFN, biases everywhere)
with other tensor names. GPT-2 stores Conv1D weights ``[in, out]`` (transposed from
``nn.Linear``), one fused ``c_attn`` projection for q, k and v, learned positions without OPT's
offset of 2, and uses the tanh-approximated GELU. BLOOM fuses q, k and v per head
(``query_key_value`` rows are [head][q|k|v][head_dim]), has no position table (ALiBi biases the
attention scores instead, ``runtime.model.shard``), normalises the embedding
(``word_embeddings_layernorm``) and uses the tanh GELU.

:class:`MappedCheckpoint` presents such a checkpoint under OPT's names (``model.decoder.*``):
each virtual tensor is read from its own tensor (sliced and transposed as needed) only when
asked for, so a stage still reads only its own layers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import torch

from runtime.errors import CheckpointError
from runtime.model.checkpoint import Checkpoint, TensorInfo

Transform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, slots=True)
class Virtual:
    """One tensor under OPT's name: the stored tensor it comes from, how, and its shape."""

    source: str
    transform: Transform
    shape: tuple[int, ...]


def _same(w: torch.Tensor) -> torch.Tensor:
    return w


def _t(w: torch.Tensor) -> torch.Tensor:
    return w.t().contiguous()


def _gpt2_part(index: int, hidden: int, transpose: bool) -> Transform:
    """Slice ``index`` (q 0, k 1, v 2) of a fused c_attn weight [h, 3h] or bias [3h]."""

    def take(w: torch.Tensor) -> torch.Tensor:
        part = w[..., index * hidden : (index + 1) * hidden]
        return part.t().contiguous() if transpose else part.contiguous()

    return take


def _bloom_part(index: int, heads: int) -> Transform:
    """Slice ``index`` (q 0, k 1, v 2) of BLOOM's query_key_value weight [3h, h] or bias [3h],
    whose rows are grouped per head: [head][q|k|v][head_dim]."""

    def take(w: torch.Tensor) -> torch.Tensor:
        grouped = w.reshape(heads, 3, -1, *w.shape[1:])
        return grouped[:, index].reshape(-1, *w.shape[1:]).contiguous()

    return take


class MappedCheckpoint(Checkpoint):
    """A checkpoint's tensors under OPT's names (the module docstring)."""

    def __init__(self, base: Checkpoint, virtual: Mapping[str, Virtual]) -> None:
        # not Checkpoint.__init__: the tensors are the base's, under other names
        self.base, self.directory = base, base.directory
        self.virtual = {k: v for k, v in virtual.items() if v.source in base.tensors}
        self.tensors: dict[str, TensorInfo] = {
            name: replace(base.tensors[v.source], shape=v.shape) for name, v in self.virtual.items()
        }

    def require(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Check that every named tensor exists with the expected shape (as OPT names it)."""
        for name, shape in shapes.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(
                    f"{self.directory}: the tensor that gives {name} is missing (a checkpoint "
                    "saved by transformers' save_pretrained has every one)"
                )
            if info.shape != shape:
                raise CheckpointError(
                    f"{info.file}: tensor {self.virtual[name].source} gives {name} of shape "
                    f"{list(info.shape)}, expected {list(shape)}"
                )

    def dtype_of(self, name: str) -> torch.dtype | None:
        return self.base.dtype_of(self.virtual[name].source)

    def read(self, name: str) -> torch.Tensor:
        virtual = self.virtual[name]
        return virtual.transform(self.base.read(virtual.source))

    def load(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {name: self.read(name) for name in names}


def _shape(base: Checkpoint, name: str, transpose: bool = False) -> tuple[int, ...]:
    info = base.tensors.get(name)
    shape = info.shape if info else ()
    return tuple(reversed(shape)) if transpose else shape


def _prefix(base: Checkpoint, first: str) -> str:
    """ "transformer." when the checkpoint stores the base model under it (a *LMHeadModel)."""
    return "transformer." if f"transformer.{first}" in base.tensors else ""


def _head(base: Checkpoint, out: dict[str, Virtual]) -> None:
    if "lm_head.weight" in base.tensors:  # untied (outside the "transformer." prefix)
        out["lm_head.weight"] = Virtual("lm_head.weight", _same, _shape(base, "lm_head.weight"))


def gpt2_checkpoint(base: Checkpoint, num_layers: int, hidden: int) -> MappedCheckpoint:
    """A GPT-2 checkpoint under OPT's names."""
    p = _prefix(base, "wte.weight")
    out: dict[str, Virtual] = {
        "model.decoder.embed_tokens.weight": Virtual(
            f"{p}wte.weight", _same, _shape(base, f"{p}wte.weight")
        ),
        "model.decoder.embed_positions.weight": Virtual(
            f"{p}wpe.weight", _same, _shape(base, f"{p}wpe.weight")
        ),
    }
    for part in ("weight", "bias"):
        out[f"model.decoder.final_layer_norm.{part}"] = Virtual(f"{p}ln_f.{part}", _same, (hidden,))
    _head(base, out)
    for layer in range(num_layers):
        ours, theirs = f"model.decoder.layers.{layer}.", f"{p}h.{layer}."
        for k, short in enumerate(("q", "k", "v")):
            out[f"{ours}self_attn.{short}_proj.weight"] = Virtual(
                f"{theirs}attn.c_attn.weight", _gpt2_part(k, hidden, True), (hidden, hidden)
            )
            out[f"{ours}self_attn.{short}_proj.bias"] = Virtual(
                f"{theirs}attn.c_attn.bias", _gpt2_part(k, hidden, False), (hidden,)
            )
        for mine, stored in (("self_attn.out_proj", "attn.c_proj"), ("fc1", "mlp.c_fc"),
                             ("fc2", "mlp.c_proj")):  # fmt: skip
            weight, bias = f"{theirs}{stored}.weight", f"{theirs}{stored}.bias"
            out[f"{ours}{mine}.weight"] = Virtual(weight, _t, _shape(base, weight, True))
            out[f"{ours}{mine}.bias"] = Virtual(bias, _same, _shape(base, bias))
        _layer_norms(out, ours, theirs, ("ln_1", "ln_2"), hidden)
    return MappedCheckpoint(base, out)


def bloom_checkpoint(
    base: Checkpoint, num_layers: int, hidden: int, heads: int
) -> MappedCheckpoint:
    """A BLOOM checkpoint under OPT's names (plus ``model.decoder.embed_layer_norm``)."""
    p = _prefix(base, "word_embeddings.weight")
    embed = f"{p}word_embeddings.weight"
    out: dict[str, Virtual] = {
        "model.decoder.embed_tokens.weight": Virtual(embed, _same, _shape(base, embed))
    }
    for part in ("weight", "bias"):
        out[f"model.decoder.embed_layer_norm.{part}"] = Virtual(
            f"{p}word_embeddings_layernorm.{part}", _same, (hidden,)
        )
        out[f"model.decoder.final_layer_norm.{part}"] = Virtual(f"{p}ln_f.{part}", _same, (hidden,))
    _head(base, out)
    for layer in range(num_layers):
        ours, theirs = f"model.decoder.layers.{layer}.", f"{p}h.{layer}."
        fused = f"{theirs}self_attention.query_key_value"
        for k, short in enumerate(("q", "k", "v")):
            out[f"{ours}self_attn.{short}_proj.weight"] = Virtual(
                f"{fused}.weight", _bloom_part(k, heads), (hidden, hidden)
            )
            out[f"{ours}self_attn.{short}_proj.bias"] = Virtual(
                f"{fused}.bias", _bloom_part(k, heads), (hidden,)
            )
        for mine, stored in (
            ("self_attn.out_proj", "self_attention.dense"),
            ("fc1", "mlp.dense_h_to_4h"),
            ("fc2", "mlp.dense_4h_to_h"),
        ):
            weight, bias = f"{theirs}{stored}.weight", f"{theirs}{stored}.bias"
            out[f"{ours}{mine}.weight"] = Virtual(weight, _same, _shape(base, weight))
            out[f"{ours}{mine}.bias"] = Virtual(bias, _same, _shape(base, bias))
        _layer_norms(out, ours, theirs, ("input_layernorm", "post_attention_layernorm"), hidden)
    return MappedCheckpoint(base, out)


def _layer_norms(
    out: dict[str, Virtual], ours: str, theirs: str, names: tuple[str, str], hidden: int
) -> None:
    for mine, stored in zip(("self_attn_layer_norm", "final_layer_norm"), names, strict=True):
        for part in ("weight", "bias"):
            out[f"{ours}{mine}.{part}"] = Virtual(f"{theirs}{stored}.{part}", _same, (hidden,))
