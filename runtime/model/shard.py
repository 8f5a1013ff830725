"""A stage shard: the plan's layer range of one stage, plus the embedding / final norm / LM head
where the plan puts them, with every layer at its planned precision and the stage's KV cache.

:func:`load_shard` reads only the stage's own tensors from the checkpoint and checks
everything (tensor presence, shapes, file integrity, memory) before loading anything. It then
streams: each linear weight is read on its own, quantized (or converted) into its layer and
released before the next is read, so a low-bit stage peaks near what it keeps, not near its
16-bit size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from runtime.errors import QuantizationError, StageMemoryError
from runtime.model.arch import LINEAR_NAMES, NORM_NAMES, ArchConfig, layer_prefix
from runtime.model.blocks import (
    DecoderLayer,
    Embedding,
    FusedLinear,
    LMHead,
    RMSNorm,
    RotaryTable,
    StepContext,
    layer_norm,
)
from runtime.model.checkpoint import Checkpoint
from runtime.model.kv_cache import KVCache
from runtime.model.mapped import bloom_checkpoint, gpt2_checkpoint
from runtime.model.memory import available_bytes, onto_huge_pages, release_freed_host_memory
from runtime.model.rope import rotary_parameters
from runtime.quant import dense_weight_dtype, packed_nbytes, quantize_linear

Impl = Literal["auto", "reference"]


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What one stage holds (normally taken from a plan's stage).

    Attributes:
        layer_range: half-open [start, stop) of decoder layers.
        layer_bits: precision of each layer of the range.
        holds_embedding: the stage embeds tokens (the first stage).
        holds_lm_head: the stage ends in the final norm and LM head (the last stage).
        group_size: quantization group size.
        batch_slots: sequences the KV cache holds (the plan's global batch).
        max_len: tokens per sequence the KV cache holds (prompt + max new tokens).
    """

    layer_range: tuple[int, int]
    layer_bits: tuple[int, ...]
    holds_embedding: bool
    holds_lm_head: bool
    group_size: int
    batch_slots: int
    max_len: int


def linear_shapes(arch: ArchConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear operator of a layer, by short name."""
    h, q, kv, inter = (
        arch.hidden_size,
        arch.num_heads * arch.head_dim,
        arch.num_kv_heads * arch.head_dim,
        arch.intermediate_size,
    )
    shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}
    if arch.family == "llama":
        return shapes | {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    return shapes | {"fc1": (inter, h), "fc2": (h, inter)}


def _bias_of(arch: ArchConfig, short: str) -> bool:
    if short in ("q", "k", "v"):
        return arch.attention_bias
    return arch.output_bias if short == "o" else arch.mlp_bias


FUSED_LINEARS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
"""Linear operators that read the same input, built as one layer on a CPU with ``impl="auto"``
(:class:`runtime.model.blocks.FusedLinear`): one call and one pass over their weights. Outputs
are bit for bit those of the separate layers. Shaped as the ``--large`` bench's model (hidden
2048, 16 layers' weights read from memory) on a 2-core Zen 4 EPYC, q/k/v and gate/up alone took
0.94-0.97x the time of the separate layers at 16 bits (1 and 8 rows), 0.96-0.98x at 8 bits,
0.76-0.96x at 4 bits; a whole decode step of that model 0.96-1.00x at batch 1 (4 bits
0.89-0.95x) and 0.95-1.04x at batch 8, where the machine's noise is as large."""


def layer_tensors(arch: ArchConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of one decoder layer."""
    prefix = layer_prefix(arch, layer)
    out: dict[str, tuple[int, ...]] = {}
    for short, (rows, cols) in linear_shapes(arch).items():
        name = prefix + LINEAR_NAMES[arch.family][short]
        out[f"{name}.weight"] = (rows, cols)
        if _bias_of(arch, short):
            out[f"{name}.bias"] = (rows,)
    for norm in NORM_NAMES[arch.family].values():
        out[f"{prefix}{norm}.weight"] = (arch.hidden_size,)
        if arch.family == "opt":
            out[f"{prefix}{norm}.bias"] = (arch.hidden_size,)
    return out


def end_tensors(
    arch: ArchConfig, checkpoint: Checkpoint, first: bool, last: bool
) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of the embedding (first) and head (last) parts."""
    h, e, vocab = arch.hidden_size, arch.embed_dim, arch.vocab_size
    base = "model.decoder." if arch.family == "opt" else "model."
    out: dict[str, tuple[int, ...]] = {}
    if first or (last and "lm_head.weight" not in checkpoint.tensors):
        out[f"{base}embed_tokens.weight"] = (vocab, e)
    if last and "lm_head.weight" in checkpoint.tensors:
        out["lm_head.weight"] = (vocab, e)
    if arch.family == "opt":
        if first and not arch.alibi:
            rows = arch.max_positions + arch.position_offset
            out["model.decoder.embed_positions.weight"] = (rows, h)
        if first and e != h:
            out["model.decoder.project_in.weight"] = (h, e)
        if first and arch.embed_norm:
            out["model.decoder.embed_layer_norm.weight"] = (h,)
            out["model.decoder.embed_layer_norm.bias"] = (h,)
        if last and e != h:
            out["model.decoder.project_out.weight"] = (e, h)
        if last and arch.final_norm:
            out["model.decoder.final_layer_norm.weight"] = (h,)
            out["model.decoder.final_layer_norm.bias"] = (h,)
    elif last:
        out["model.norm.weight"] = (h,)
    return out


def alibi_slopes(heads: int) -> Tensor:
    """BLOOM's per-head ALiBi slopes, fp32 as BLOOM computes them: a geometric sequence, with
    interleaved extras when the head count is not a power of two."""
    closest = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        more = torch.arange(1, 1 + 2 * min(closest, heads - closest), 2, dtype=torch.int32)
        slopes = torch.cat([slopes, torch.pow(extra, more)])
    return slopes


def open_checkpoint(directory: Path, arch: ArchConfig) -> Checkpoint:
    """The checkpoint's tensors under the names the stage code reads (GPT-2's and BLOOM's
    mapped onto OPT's layout, runtime.model.mapped)."""
    checkpoint = Checkpoint(directory)
    if arch.model_type == "gpt2":
        return gpt2_checkpoint(checkpoint, arch.num_layers, arch.hidden_size)
    if arch.model_type == "bloom":
        return bloom_checkpoint(checkpoint, arch.num_layers, arch.hidden_size, arch.num_heads)
    return checkpoint


def estimate_bytes(
    arch: ArchConfig,
    spec: StageSpec,
    ends: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    stored: torch.dtype | None,
    impl: Impl = "auto",
) -> int:
    """Memory the stage will hold once loaded on ``device``, bytes.

    Linear weights at their precisions (16-bit ones, stored in ``stored`` in the checkpoint,
    in :func:`dense_weight_dtype`, or in ``dtype`` with ``impl="reference"``); the ends
    (embedding tables, LM head), biases, norms and the KV cache in ``dtype``.
    """
    dense = dtype.itemsize
    weight_dtype = dtype if impl == "reference" else dense_weight_dtype(dtype, device, stored)
    shapes = linear_shapes(arch).values()
    per_bits = {
        bits: sum(
            packed_nbytes(r, c, bits, spec.group_size, weight_dtype.itemsize) for r, c in shapes
        )
        for bits in set(spec.layer_bits)
    }
    weights = sum(per_bits[b] for b in spec.layer_bits)
    layers = spec.layer_range[1] - spec.layer_range[0]
    vectors = sum(  # biases and norms: the layer's 1-D tensors
        math.prod(shape) for shape in layer_tensors(arch, 0).values() if len(shape) == 1
    )
    ends_bytes = sum(  # tables and projections as 16-bit weights, like the linears
        math.prod(s) * (weight_dtype.itemsize if len(s) == 2 else dense) for s in ends.values()
    )
    kv = 2 * layers * spec.batch_slots * spec.max_len * arch.num_kv_heads * arch.head_dim * dense
    return weights + layers * vectors * dense + ends_bytes + kv


class StageShard(nn.Module):
    """Runs one stage: embed (first stage), its decoder layers, head (last stage)."""

    def __init__(
        self,
        arch: ArchConfig,
        spec: StageSpec,
        layers: Sequence[DecoderLayer],
        embedding: Embedding | None,
        head: LMHead | None,
        rope: RotaryTable | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.arch, self.spec, self.dtype, self.device = arch, spec, dtype, device
        self.layers = nn.ModuleList(layers)
        self.embedding, self.head, self.rope = embedding, head, rope
        self.slopes = (
            alibi_slopes(arch.num_heads).to(device=device, dtype=dtype) if arch.alibi else None
        )
        start, stop = spec.layer_range
        self.cache = KVCache(
            stop - start,
            spec.batch_slots,
            arch.num_kv_heads,
            spec.max_len,
            arch.head_dim,
            dtype,
            device,
        )

    def context(
        self, slots: tuple[int, int], past: int, positions: Tensor, key_valid: Tensor
    ) -> StepContext:
        """The step context of a micro-batch (see :class:`StepContext`).

        Args:
            slots: batch slots of the micro-batch.
            past: tokens already cached for them.
            positions: [bsz, seqlen] positions of the new tokens.
            key_valid: [bsz, past + seqlen] False at padding.
        """
        seqlen = positions.shape[1]
        q_idx = torch.arange(past, past + seqlen, device=self.device)[:, None]
        k_idx = torch.arange(past + seqlen, device=self.device)[None, :]
        allowed = k_idx <= q_idx
        if self.arch.sliding_window:
            allowed &= (q_idx - k_idx) < self.arch.sliding_window
        visible = (allowed[None] & key_valid.to(self.device)[:, None, :]) | (k_idx == q_idx)[None]
        rope = None
        if self.rope is not None:
            rope = self.rope(positions.to(self.device), self.dtype)
        visible = visible[:, None]
        mask: Tensor | None = visible
        if self.slopes is not None:  # ALiBi: slope × the key's position within its sequence
            valid = key_valid.to(self.device)
            key_pos = ((valid.cumsum(-1) - 1) * valid).to(self.dtype)[:, None, None, :]
            bias = self.slopes[None, :, None, None] * key_pos
            mask = bias.masked_fill(~visible, float("-inf"))
        elif seqlen == 1 and self.device.type == "cpu" and bool(visible.all()):
            mask = None  # every key visible: attention without a mask, the same bits
        return StepContext(slots, past, positions.to(self.device), mask, rope)

    @torch.inference_mode()
    def forward(self, x: Tensor, ctx: StepContext, last_only: bool = True) -> Tensor:
        """Token ids [bsz, seqlen] (first stage) or hidden states [bsz, seqlen, hidden] in;
        hidden states out, or fp32 logits [bsz, 1 or seqlen, vocab] from the last stage."""
        if self.embedding is not None:
            x = self.embedding(x.to(self.device), ctx.positions)
        x = x.to(device=self.device, dtype=self.dtype)
        for local, layer in enumerate(self.layers):
            x = layer(x, ctx, self.cache, local)
        if self.head is None:
            return x
        logits: Tensor = self.head(x[:, -1:] if last_only else x)
        return logits

    def resident_bytes(self) -> int:
        """Bytes of every parameter, buffer and cache tensor the stage holds; a tensor shared by
        two modules (a tied embedding and LM head) counts once."""
        quantized = [m for m in self.modules() if hasattr(m, "kernel_path")]
        inside = {id(t) for m in quantized for t in (*m.parameters(), *m.buffers())}
        storages: dict[int, int] = {}  # storage address -> bytes
        for t in (*self.parameters(), *self.buffers()):
            if id(t) not in inside:
                storages[t.untyped_storage().data_ptr()] = t.nbytes
        held = sum(int(m.resident_bytes()) for m in quantized)  # type: ignore[operator,misc]
        return held + sum(storages.values()) + self.cache.nbytes

    def kernel_paths(self) -> dict[int, list[str]]:
        """Per global layer index, the compute path of each of its linear operators."""
        start = self.spec.layer_range[0]
        return {
            start + i: [str(m.kernel_path) for m in layer.modules() if hasattr(m, "kernel_path")]
            for i, layer in enumerate(self.layers)
        }


def load_shard(
    checkpoint_dir: Path,
    arch: ArchConfig,
    spec: StageSpec,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    impl: Impl = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> StageShard:
    """Build a stage from only its own tensors, quantized per ``spec.layer_bits``.

    ``progress(done, total)`` is called as parts are loaded: once before the first, then after
    each decoder layer and after the embedding / final norm / LM head (one part together).

    On a host, each layer's tensors from 2 MiB, the embedding table and the LM head are copied
    into transparent huge pages as they are built (:func:`~runtime.model.memory.onto_huge_pages`,
    one tensor at a time), where the kernel allows them: a decode step streams every weight.

    Raises:
        CheckpointError: a needed tensor is missing, misshapen, or its file is truncated.
        StageMemoryError: the stage would not fit the device's free memory.
        QuantizationError: a precision or group size the layers cannot represent.
    """
    dev = torch.device(device)
    checkpoint = open_checkpoint(checkpoint_dir, arch)
    start, stop = spec.layer_range
    if len(spec.layer_bits) != stop - start:
        raise QuantizationError(f"{len(spec.layer_bits)} precisions for {stop - start} layers")
    ends = end_tensors(arch, checkpoint, spec.holds_embedding, spec.holds_lm_head)
    needed = dict(ends)
    for layer in range(start, stop):
        needed |= layer_tensors(arch, layer)
    checkpoint.require(needed)
    stored = checkpoint.dtype_of(next(iter(layer_tensors(arch, start)))) if stop > start else None
    need = estimate_bytes(arch, spec, ends, dtype, dev, stored, impl)
    free = available_bytes(dev)
    if need > free:
        gib = 1024**3
        raise StageMemoryError(
            f"layers {start}–{stop - 1} need {need / gib:.2f} GiB on {dev}, {free / gib:.2f} GiB "
            "is free; re-plan with this device's real memory or fewer layers here"
        )
    total = stop - start + (1 if ends else 0)
    report = progress or (lambda done, total: None)
    report(0, total)
    layers = []
    for layer, bits in zip(range(start, stop), spec.layer_bits, strict=True):
        built = _build_layer(arch, checkpoint, layer, bits, spec.group_size, dtype, dev, impl)
        onto_huge_pages(built)  # on a host: a decode step streams every weight, fewer TLB misses
        layers.append(built)
        report(len(layers), total)
    tensors = {  # norms in the compute dtype; tables and projections as 16-bit weights are
        k: v.to(device=dev, dtype=_end_dtype(v, dtype, dev, impl))
        for k, v in checkpoint.load(ends).items()
    }
    embedding = _embedding(arch, tensors, dtype) if spec.holds_embedding else None
    head = _head(arch, tensors) if spec.holds_lm_head else None
    rope = None
    if arch.family == "llama":
        inv_freq, scaling = rotary_parameters(arch)
        rope = RotaryTable(inv_freq.to(dev), scaling)
    # a tied table and head as one module: they keep sharing one copy
    onto_huge_pages(nn.ModuleList([m for m in (embedding, head) if m is not None]))
    shard = StageShard(arch, spec, layers, embedding, head, rope, dtype, dev)
    if ends:
        report(total, total)
    return shard


def _build_layer(
    arch: ArchConfig,
    checkpoint: Checkpoint,
    layer: int,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
    impl: Impl,
) -> DecoderLayer:
    """One decoder layer at ``bits``, its linears read and quantized one after the other (on a
    CPU, those of :data:`FUSED_LINEARS` as one)."""
    prefix = layer_prefix(arch, layer)
    shapes = linear_shapes(arch)
    fused = {
        name: parts
        for name, parts in FUSED_LINEARS.items()
        if impl == "auto" and device.type == "cpu" and all(p in shapes for p in parts)
    }
    linears: dict[str, nn.Module] = {}
    for short in shapes:
        group = next((name for name, members in fused.items() if short in members), None)
        if group in linears:  # built with the first of its operators
            continue
        parts = [
            (prefix + LINEAR_NAMES[arch.family][p], shapes[p][0])
            for p in (fused[group] if group else (short,))
        ]
        has_bias = _bias_of(arch, short)
        built = _load_linear(checkpoint, parts, has_bias, bits, group_size, dtype, device, impl)
        if group is None:
            linears[short] = built
        else:
            linears[group] = FusedLinear(built, tuple(rows for _, rows in parts))
        release_freed_host_memory()  # the fp32 weight and the quantizer's temporaries
    norms = tuple(
        _norm(arch, checkpoint, f"{prefix}{NORM_NAMES[arch.family][key]}", dtype, device)
        for key in ("attn_norm", "mlp_norm")
    )
    return DecoderLayer(arch, layer, linears, (norms[0], norms[1]))


def _load_linear(
    checkpoint: Checkpoint,
    parts: Sequence[tuple[str, int]],
    has_bias: bool,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    device: torch.device,
    impl: Impl,
) -> nn.Module:
    """Read the weights (and biases) of linear operators that share their input (``parts``:
    module path and output rows of each), stacked by output rows, and build one layer of them
    at ``bits``.

    The weight stays in the checkpoint's dtype (the quantizer converts blocks of rows to fp32)
    and lives only until the layer is built: the caller reads the next one after this returns.
    Loading a stage so needs, beyond what the stage keeps, one layer's stacked weight as stored
    and one operator's (the gate and up projections of a Llama layer), a few MiB of quantizer
    blocks, and for an int4 kernel an int32 copy of its codes.
    """
    weight = _stacked(checkpoint, [(f"{n}.weight", rows) for n, rows in parts])  # [out, in]
    bias = _stacked(checkpoint, [(f"{n}.bias", rows) for n, rows in parts]) if has_bias else None
    return quantize_linear(
        weight, bias, bits, group_size, compute_dtype=dtype, device=device, impl=impl
    )


def _stacked(checkpoint: Checkpoint, parts: Sequence[tuple[str, int]]) -> Tensor:
    """The named tensors (name, first dimension) concatenated along their first dimension, each
    copied into its rows as it is read (one tensor: as read)."""
    if len(parts) == 1:
        return checkpoint.read(parts[0][0])
    out: Tensor | None = None
    start = 0
    for name, rows in parts:
        tensor = checkpoint.read(name)
        if out is None:
            total = sum(r for _, r in parts)
            out = torch.empty((total, *tensor.shape[1:]), dtype=tensor.dtype)
        out[start : start + rows] = tensor
        del tensor  # gone before the next part is read
        start += rows
    assert out is not None
    return out


def _norm(
    arch: ArchConfig,
    checkpoint: Checkpoint,
    name: str,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    weight = checkpoint.read(f"{name}.weight").to(device=device, dtype=dtype)
    if arch.family == "opt":
        bias = checkpoint.read(f"{name}.bias").to(device=device, dtype=dtype)
        return layer_norm(weight, bias, arch.norm_eps)
    return RMSNorm(weight, arch.norm_eps)


def _end_dtype(tensor: Tensor, dtype: torch.dtype, device: torch.device, impl: Impl) -> torch.dtype:
    """An end part's tensor dtype: embedding tables and the LM head's projections (2-D) as the
    stage's 16-bit linears hold their weights (:func:`dense_weight_dtype`: a bf16 checkpoint's
    stay bf16 on a CPU that multiplies bf16 natively, which makes a batch-8 LM head step of a
    32000 × 2048 head 4.6× faster than in fp32 there); norms in the compute dtype. Lossless:
    a weight is never narrowed below what the checkpoint stores."""
    if tensor.dim() == 2 and impl == "auto":
        return dense_weight_dtype(dtype, device, tensor.dtype)
    return dtype


def _loaded_norm(arch: ArchConfig, t: Mapping[str, Tensor], name: str) -> nn.LayerNorm:
    """The LayerNorm ``name`` of an end part, from its loaded weight and bias."""
    return layer_norm(t[f"{name}.weight"], t[f"{name}.bias"], arch.norm_eps)


def _embedding(arch: ArchConfig, t: Mapping[str, Tensor], dtype: torch.dtype) -> Embedding:
    if arch.family == "opt":
        norm = _loaded_norm(arch, t, "model.decoder.embed_layer_norm") if arch.embed_norm else None
        return Embedding(
            t["model.decoder.embed_tokens.weight"],
            t.get("model.decoder.embed_positions.weight"),
            t.get("model.decoder.project_in.weight"),
            out_dtype=dtype,
            position_offset=arch.position_offset,
            norm=norm,
        )
    return Embedding(t["model.embed_tokens.weight"], out_dtype=dtype)


def _head(arch: ArchConfig, t: Mapping[str, Tensor]) -> LMHead:
    base = "model.decoder." if arch.family == "opt" else "model."
    weight = t.get("lm_head.weight", t.get(f"{base}embed_tokens.weight"))
    assert weight is not None
    if arch.family == "opt":
        norm = _loaded_norm(arch, t, "model.decoder.final_layer_norm") if arch.final_norm else None
        return LMHead(norm, weight, t.get("model.decoder.project_out.weight"))
    return LMHead(RMSNorm(t["model.norm.weight"], arch.norm_eps), weight)
