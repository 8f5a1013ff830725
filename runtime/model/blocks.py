"""Decoder blocks, embeddings and LM heads of the supported families, gpt-fast style.

Small flat modules over plain tensors. Linear operators are handed in already built (dense or
quantized by ``runtime.quant.linear``), so quantization is applied from outside. Numerics follow the
Hugging Face implementations (RMSNorm in fp32, rotary embeddings, SDPA attention) so that a
chain of stages reproduces ``transformers`` exactly at 16 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.errors import UnsupportedArchitectureError
from runtime.model.arch import ArchConfig
from runtime.model.kv_cache import KVCache
from runtime.quant import native
from runtime.quant.linear import native_dense_product

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    # BLOOM's own tanh GELU, with its rounded constant (token-exact with its checkpoints)
    "bloom_gelu": lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
_ATTENTION_LINEARS = frozenset({"q", "k", "v", "o", "qkv"})


class FusedLinear(nn.Module):
    """Linear operators that read the same input built as one (``runtime.model.shard``'s
    ``FUSED_LINEARS``): their weights stacked by output rows in one layer, whose output is split
    back. Every output row is summed as its own operator's would be (the kernels' products are
    row by row), so the outputs are those of the separate layers, in one call and one pass."""

    def __init__(self, linear: nn.Module, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.linear, self.widths = linear, widths

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        """``x`` [..., in] -> one [..., width] view per operator."""
        out: Tensor = self.linear(x)
        return tuple(torch.split(out, list(self.widths), dim=-1))

    def dequantized_weights(self) -> tuple[Tensor, ...]:
        """Each operator's [width, in] weight as the layer multiplies by it."""
        weight: Tensor = self.linear.dequantized_weight()  # type: ignore[operator]
        return tuple(torch.split(weight, list(self.widths), dim=0))


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The FFN activation function named in the config."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        supported = ", ".join(sorted(_ACTIVATIONS))
        raise UnsupportedArchitectureError(
            f'activation "{name}" is not supported; supported: {supported}'
        ) from None


@dataclass(frozen=True)
class StepContext:
    """Everything a layer needs besides its input for one micro-batch step.

    Attributes:
        slots: half-open range of batch slots (sequences) this micro-batch occupies.
        past: tokens already in the cache for these slots (left-padded: the same for all).
        positions: [bsz, seqlen] position of each new token.
        mask: [bsz, 1, seqlen, past + seqlen] True where a query may attend to a key; for
            ALiBi families, [bsz, heads, seqlen, past + seqlen] float biases (-inf where not);
            None where every query may attend to every key (a CPU decode step without padding:
            attention without a mask gives the same bits, in less time).
        rope: (cos, sin), each [bsz, seqlen, head_dim], for rotary families; else None.
    """

    slots: tuple[int, int]
    past: int
    positions: Tensor
    mask: Tensor | None
    rope: tuple[Tensor, Tensor] | None


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 as Llama does."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def layer_norm(weight: Tensor, bias: Tensor, eps: float) -> nn.LayerNorm:
    """An nn.LayerNorm holding the given parameters."""
    norm = nn.LayerNorm(weight.shape[0], eps=eps, device=weight.device, dtype=weight.dtype)
    norm.weight = nn.Parameter(weight, requires_grad=False)
    norm.bias = nn.Parameter(bias, requires_grad=False)
    return norm


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Queries or keys ``x`` [bsz, heads, seq, hd] rotated by ``rope`` (cos, sin) [bsz, seq, hd],
    as transformers' Llama rotates them: ``x * cos + rotate_half(x) * sin``."""
    cos, sin = (t.unsqueeze(1) for t in rope)
    return x * cos + rotate_half(x) * sin


def _rope_into_cache(
    q: Tensor, k: Tensor, v: Tensor, ctx: StepContext, cache: KVCache, layer: int
) -> tuple[Tensor, Tensor, Tensor] | None:
    """On a host with the native kernels, a rotary family's step in fp32: the queries rotated,
    the keys rotated into the cache and the values copied there in one call (the same bits as
    the elementwise operations, some thirty fewer operations a layer); (queries [bsz, heads,
    seq, hd], keys and values [bsz, kv_heads, past + seq, hd]). Else None."""
    if ctx.rope is None or q.device.type != "cpu" or q.dtype != torch.float32:
        return None
    kernels = native.kernels()
    if kernels is None:
        return None
    end = ctx.past + q.shape[1]
    keys, values = cache.slot_views(layer, ctx.slots, end)
    if keys.dtype != torch.float32:
        return None
    rotated = kernels.rope_into_cache(q, k, v, ctx.rope, keys, values, ctx.past)
    return rotated, keys[:, :, :end], values[:, :, :end]


class Attention(nn.Module):
    """Multi-head (grouped-query) self-attention writing its keys/values to the stage cache."""

    def __init__(self, arch: ArchConfig, linears: Mapping[str, nn.Module]) -> None:
        super().__init__()
        if "qkv" in linears:  # q, k and v as one FusedLinear
            self.qkv: nn.Module | None = linears["qkv"]
        else:
            self.qkv = None
            self.q_proj, self.k_proj, self.v_proj = linears["q"], linears["k"], linears["v"]
        self.o_proj = linears["o"]
        self.heads, self.kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.scale = arch.head_dim**-0.5

    def forward(self, x: Tensor, ctx: StepContext, cache: KVCache, layer: int) -> Tensor:
        bsz, seqlen, _ = x.shape  # x: [bsz, seqlen, hidden]
        if self.qkv is not None:
            q, k, v = self.qkv(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if (rotated := _rope_into_cache(q, k, v, ctx, cache, layer)) is not None:
            q, keys, values = rotated
        else:
            q = q.view(bsz, seqlen, self.heads, self.head_dim).transpose(1, 2)
            k = k.view(bsz, seqlen, self.kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(bsz, seqlen, self.kv_heads, self.head_dim).transpose(1, 2)
            if ctx.rope is not None:
                q, k = rotate(q, ctx.rope), rotate(k, ctx.rope)
            keys, values = cache.write(layer, ctx.slots, ctx.past, k, v)  # [bsz, kvh, past+t, hd]
        group = self.heads // self.kv_heads
        if group == 1:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=ctx.mask, scale=self.scale
            )
        else:  # grouped-query: each key/value head's query heads as rows of one head, so the
            # cached keys and values are read in place, never copied per query head
            total = keys.shape[2]
            q = q.reshape(bsz, self.kv_heads, group * seqlen, self.head_dim)
            mask = ctx.mask  # [bsz, 1 or heads, seqlen, total]
            if mask is not None:
                mask = mask.expand(bsz, self.heads, seqlen, total).reshape(
                    bsz, self.kv_heads, group * seqlen, total
                )
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
            out = out.reshape(bsz, self.heads, seqlen, self.head_dim)
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.heads * self.head_dim)
        projected: Tensor = self.o_proj(out)
        return projected


class DecoderLayer(nn.Module):
    """One decoder layer: pre-norm attention and FFN with residuals (OPT-350m: post-norm)."""

    def __init__(
        self,
        arch: ArchConfig,
        index: int,
        linears: Mapping[str, nn.Module],
        norms: tuple[nn.Module, nn.Module],
    ) -> None:
        super().__init__()
        self.index = index
        self.family = arch.family
        self.norm_before = arch.norm_before
        self.attn = Attention(arch, linears)
        self.attn_norm, self.mlp_norm = norms
        self.act = activation(arch.activation)
        self.mlp = nn.ModuleDict({k: v for k, v in linears.items() if k not in _ATTENTION_LINEARS})

    def _ffn(self, x: Tensor) -> Tensor:
        out: Tensor
        if self.family == "llama":
            if "gate_up" in self.mlp:
                gate, up = self.mlp["gate_up"](x)
            else:
                gate, up = self.mlp["gate"](x), self.mlp["up"](x)
            out = self.mlp["down"](self.act(gate) * up)
        else:
            out = self.mlp["fc2"](self.act(self.mlp["fc1"](x)))
        return out

    def forward(self, x: Tensor, ctx: StepContext, cache: KVCache, layer: int) -> Tensor:
        # x: [bsz, seqlen, hidden]
        if self.norm_before:
            x = x + self.attn(self.attn_norm(x), ctx, cache, layer)
            return x + self._ffn(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x, ctx, cache, layer))
        out: Tensor = self.mlp_norm(x + self._ffn(x))
        return out


class Embedding(nn.Module):
    """Token (and, for OPT, learned position) embedding of the first stage."""

    def __init__(
        self,
        tokens: Tensor,
        positions: Tensor | None = None,
        project_in: Tensor | None = None,
        out_dtype: torch.dtype | None = None,
        position_offset: int = 2,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.position_offset, self.norm = position_offset, norm
        self.out_dtype = out_dtype or tokens.dtype  # the tables may be stored narrower
        self.tokens = nn.Parameter(tokens, requires_grad=False)
        self.positions = None if positions is None else nn.Parameter(positions, requires_grad=False)
        self.project_in = (
            None if project_in is None else nn.Parameter(project_in, requires_grad=False)
        )

    def forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        x = F.embedding(ids, self.tokens)  # ids: [bsz, seqlen] → [bsz, seqlen, embed_dim]
        if self.project_in is not None:
            x = F.linear(x, self.project_in)
        x = x.to(self.out_dtype)
        if self.norm is not None:  # BLOOM's word_embeddings_layernorm
            x = self.norm(x)
        if self.positions is not None:  # learned positions (OPT's offset by 2)
            rows = positions + self.position_offset
            x = x + F.embedding(rows, self.positions).to(self.out_dtype)
        return x


class LMHead(nn.Module):
    """Final norm (and OPT's projection) plus the vocabulary projection of the last stage."""

    def __init__(
        self, norm: nn.Module | None, weight: Tensor, project_out: Tensor | None = None
    ) -> None:
        super().__init__()
        self.norm = norm
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.project_out = (
            None if project_out is None else nn.Parameter(project_out, requires_grad=False)
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: [bsz, seqlen, hidden] → logits [bsz, seqlen, vocab] in fp32
        if self.norm is not None:
            x = self.norm(x)
        if self.project_out is None:  # decode rows in fp32 through the native kernel, as a layer's
            rows = x.reshape(-1, x.shape[-1])
            logits = native_dense_product(rows, self.weight)
            if logits is not None:
                return logits.reshape(*x.shape[:-1], -1)
        x = x.to(self.weight.dtype)  # the projections may be stored narrower (bf16 on a CPU)
        if self.project_out is not None:
            x = F.linear(x, self.project_out)
        return F.linear(x, self.weight).float()


class RotaryTable(nn.Module):
    """cos/sin of rotary position embeddings for given positions."""

    def __init__(self, inv_freq: Tensor, scaling: float) -> None:
        super().__init__()
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [bsz, seqlen] → cos, sin: [bsz, seqlen, head_dim]
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)
