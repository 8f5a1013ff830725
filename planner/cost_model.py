"""Pure latency and memory formulas per (layer, device, bits, phase, micro-batch).

Everything here is a pure function of its arguments: no I/O, no globals, no solver. Two latency
sources share one interface (:func:`layer_latency_s`): a measured :class:`LatencyProfile` for the
device type and model shape when one exists, else an analytic roofline from the datasheet.

Roofline, per operator, written the ``estimate_mfu`` way::

    time = max(flops / (peak_flops * MATMUL_EFFICIENCY),
               bytes_moved / (bandwidth * MEMORY_EFFICIENCY)) + launch_overhead

``bytes_moved`` counts the packed weights at their precision (scales and zeros included), the
activations read and written, and in decode the KV cache read. A precision without a fast
kernel on a device is dequantized into a temporary 16-bit copy on every call, which costs an
extra pass over the weights and the device's dequantization rate.

Widths: unquantized (16-bit) linear weights keep the checkpoint's dtype where the device computes
in it, else the compute dtype (:func:`weight16_bytes`: fp32 on a CPU unless the checkpoint is
bf16 and the CPU has native bf16 dot products); per-call dequantized copies take the device's
``dense_weight_bytes``; activations, KV cache, biases, norms, embeddings and the LM head take its
``activation_bytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from planner.cluster import DeviceType, LinkSpec
from planner.model_spec import LinearOp, ModelSpec
from planner.profiles import LatencyProfile

Phase = Literal["prefill", "decode"]

MATMUL_EFFICIENCY = 0.7
"""Share of the datasheet FLOP/s a dense matmul reaches."""
MEMORY_EFFICIENCY = 0.8
"""Share of the datasheet bandwidth a streaming kernel reaches."""
LOW_BIT_COMPUTE_PENALTY = 1.15
"""Compute-bound slowdown of a fused low-bit kernel versus its 16-bit matmul."""
SCALE_BYTES = 2
"""Bytes of one fp16 scale or zero point."""
TOKEN_ID_BYTES = 8
"""Bytes of one sampled token id sent back to the first stage."""


# --------------------------------------------------------------------------- memory


def packed_linear_bytes(op: LinearOp, bits: int, group_size: int, dense_bytes: int = 2) -> int:
    """Resident bytes of one linear operator's weight at ``bits`` (bias excluded).

    16 bits: unquantized, ``dense_bytes`` per weight (the device's ``dense_weight_bytes``: 2 for
    fp16/bf16 on GPUs and on CPUs with native bf16, 4 for fp32 on other CPUs). 8 bits: int8
    weights and one fp16 scale per output row.
    2/3/4 bits: ``bits`` per weight packed densely, per output row one fp16 scale and one fp16
    zero point for each group of ``group_size`` input weights.
    """
    if bits == 16:
        return op.num_weights * dense_bytes
    if bits == 8:
        return op.num_weights + op.out_features * SCALE_BYTES
    groups_per_row = math.ceil(op.in_features / group_size)
    packed = math.ceil(op.in_features * bits / 8) * op.out_features
    return packed + op.out_features * groups_per_row * 2 * SCALE_BYTES


def default_group_size(model: ModelSpec, candidates: tuple[int, ...] = (128, 64, 32)) -> int:
    """Largest quantization group size that divides every linear operator's input width
    (whole groups suit the packed low-bit kernels; plans require it); where no candidate
    does, the largest power of two up to the first candidate that does."""
    widths = [op.in_features for op in model.layer_linears()]
    found = next((g for g in candidates if all(w % g == 0 for w in widths)), None)
    if found is not None:
        return found
    group = candidates[0]
    while any(w % group for w in widths):
        group //= 2
    return max(group, 1)


CPU_PROCESS_BASELINE_BYTES = 276 << 20
"""Resident memory of a stage process on a CPU before it holds any of the model: Python,
torch, ZeroMQ and the runtime imported. Measured as the peak RSS of ``import
runtime.serve.worker`` (torch 2.13 CPU build, Python 3.11, x86-64 Linux): 246-288 MiB, the
spread being how many pages of libtorch's mapped files the kernel counts (more when they are
hot in the page cache); 276 MiB sits within 15 % of a served stage's peak across that range."""

GPU_PROCESS_BASELINE_BYTES = 512 << 20
"""Device memory a stage process holds on a GPU before any weight: the CUDA context and the
caching allocator's first blocks (NVIDIA documents 300-600 MiB depending on the GPU and CUDA
version; not measured on this project's machines)."""


def process_baseline_bytes(device: DeviceType) -> int:
    """Memory one stage process holds on ``device`` before any weight (see the constants)."""
    return CPU_PROCESS_BASELINE_BYTES if device.kind == "cpu" else GPU_PROCESS_BASELINE_BYTES


def weight16_bytes(model: ModelSpec, device: DeviceType) -> int:
    """Bytes per weight of ``model``'s 16-bit layers on ``device``.

    16 bits keeps the checkpoint's own weights: in their dtype where the device computes in it
    (GPUs, whose 16-bit dtype is the compute dtype; a bf16 checkpoint on a CPU with native bf16
    dot products), else in the device's compute dtype (fp32 on a CPU), so that unquantized
    layers compute exactly what the checkpoint holds.
    """
    if device.kind == "cpu" and model.weight_dtype != "bfloat16":
        return device.activation_bytes
    return device.dense_weight_bytes


def layer_weight_bytes(
    model: ModelSpec,
    bits: int,
    group_size: int,
    dense_bytes: int = 2,
    dense_weight_bytes: int | None = None,
) -> int:
    """Resident bytes of one decoder layer's parameters at ``bits``: packed linear weights
    (16 bits: ``dense_weight_bytes`` per weight, default ``dense_bytes``) plus biases and norms
    in the compute dtype (``dense_bytes`` per element)."""
    weight_bytes = dense_bytes if dense_weight_bytes is None else dense_weight_bytes
    linears = sum(
        packed_linear_bytes(op, bits, group_size, weight_bytes) for op in model.layer_linears()
    )
    return linears + dense_bytes * (model.layer_bias_params + model.layer_norm_params)


def kv_cache_bytes_per_layer(
    model: ModelSpec, global_batch: int, max_context: int, activation_bytes: int
) -> int:
    """KV cache of one layer for every sequence of the batch at full length, bytes.

    Every decode micro-batch keeps its cache resident for the whole run, so the whole batch's
    cache is allocated, each sequence for prompt + max new tokens.
    """
    return 2 * global_batch * max_context * model.kv_width * activation_bytes


def layer_memory_bytes(
    model: ModelSpec,
    device: DeviceType,
    bits: int,
    global_batch: int,
    max_context: int,
    group_size: int,
) -> int:
    """Memory one decoder layer needs on ``device``: weights at ``bits`` plus its KV cache."""
    dense = device.activation_bytes
    kv = kv_cache_bytes_per_layer(model, global_batch, max_context, dense)
    weights = layer_weight_bytes(model, bits, group_size, dense, weight16_bytes(model, device))
    return weights + kv


def activation_peak_bytes(
    model: ModelSpec,
    device: DeviceType,
    prefill_micro_batch: int,
    decode_micro_batch: int,
    prompt_len: int,
    max_context: int,
) -> int:
    """Peak temporary memory of a stage while one layer runs, bytes.

    The larger of a prefill micro-batch (hidden states, q/k/v, attention scores, FFN
    activations) and a decode micro-batch attending to the full context.
    """
    act = device.activation_bytes
    per_token = 4 * model.hidden_size + model.num_heads * model.head_dim + 2 * model.kv_width
    per_token += (3 if model.gated_mlp else 2) * model.intermediate_size
    prefill = act * prefill_micro_batch * prompt_len * (per_token + model.num_heads * prompt_len)
    decode = act * decode_micro_batch * (per_token + model.num_heads * max_context)
    return max(prefill, decode)


def dequant_scratch_bytes(model: ModelSpec, dense_bytes: int = 2) -> int:
    """Dense copy of the largest weight, needed by a stage running a precision that has no
    fast kernel on its device (dequantized per call), bytes. ``dense_bytes`` is the device's
    ``dense_weight_bytes``: the copy has the dtype of its 16-bit weights."""
    return dense_bytes * max(op.num_weights for op in model.layer_linears())


def embedding_bytes(model: ModelSpec, dense_bytes: int = 2) -> int:
    """Token/position embedding held by the first stage, in the device's compute dtype
    (``dense_bytes`` each), bytes."""
    return dense_bytes * model.embedding_params


def head_bytes(model: ModelSpec, micro_batch: int, dense_bytes: int = 2) -> int:
    """Final norm and LM head held by the last stage plus its fp32 logits buffer, bytes."""
    return dense_bytes * model.head_params + 4 * micro_batch * model.vocab_size


def tied_saving_bytes(model: ModelSpec, dense_bytes: int = 2) -> int:
    """Bytes saved when one stage holds both ends of a model with tied embeddings."""
    return dense_bytes * model.vocab_size * model.embed_dim if model.tied_embeddings else 0


# --------------------------------------------------------------------------- latency


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Where a layer runs: phase, sequences in the micro-batch, new tokens per sequence and
    tokens of context attended to."""

    phase: Phase
    micro_batch: int
    new_tokens: int
    context: int


def prefill_point(micro_batch: int, prompt_len: int) -> OperatingPoint:
    """Prefill of ``micro_batch`` prompts of ``prompt_len`` tokens."""
    return OperatingPoint("prefill", micro_batch, prompt_len, prompt_len)


def decode_point(micro_batch: int, prompt_len: int, expected_new_tokens: int) -> OperatingPoint:
    """One decode step at the average context length of generation (prompt + mu_n / 2)."""
    return OperatingPoint("decode", micro_batch, 1, prompt_len + expected_new_tokens // 2)


def _roofline_s(device: DeviceType, flops: float, num_bytes: float, low_bit: bool) -> float:
    peak = device.fp16_tflops * 1e12 * MATMUL_EFFICIENCY
    if low_bit:
        peak /= LOW_BIT_COMPUTE_PENALTY
    bandwidth = device.memory_bandwidth_gb_s * 1e9 * MEMORY_EFFICIENCY
    return max(flops / peak, num_bytes / bandwidth) + device.launch_overhead_s


def linear_latency_s(
    op: LinearOp,
    device: DeviceType,
    bits: int,
    tokens: int,
    group_size: int,
    weight16: int | None = None,
) -> float:
    """Time of one linear operator over ``tokens`` token rows at ``bits``, seconds.

    ``weight16``: bytes per weight at 16 bits (:func:`weight16_bytes`; default the device's
    ``dense_weight_bytes``)."""
    flops = 2.0 * tokens * op.num_weights
    activations = tokens * (op.in_features + op.out_features) * device.activation_bytes
    width16 = device.dense_weight_bytes if weight16 is None else weight16
    packed = packed_linear_bytes(op, bits, group_size, width16)
    if bits == 16 or bits in device.fast_kernel_bits:
        return _roofline_s(device, flops, packed + activations, low_bit=bits != 16)
    dense = op.num_weights * device.dense_weight_bytes
    dequant_s = op.num_weights / (device.dequant_gelem_s * 1e9)
    unpack_s = _roofline_s(device, 0.0, packed + dense, low_bit=False)
    return dequant_s + unpack_s + _roofline_s(device, flops, dense + activations, low_bit=False)


def attention_latency_s(model: ModelSpec, device: DeviceType, point: OperatingPoint) -> float:
    """Time of the attention core (scores, softmax, weighted sum) of one layer, seconds.

    Prefill is causal (half the score matrix); decode reads the whole KV cache.
    """
    b, t, ctx = point.micro_batch, point.new_tokens, point.context
    width = model.num_heads * model.head_dim
    causal = 0.5 if point.phase == "prefill" else 1.0
    flops = 4.0 * b * t * ctx * width * causal
    kv_read = 2 * b * ctx * model.kv_width * device.activation_bytes
    qo = 2 * b * t * width * device.activation_bytes
    return _roofline_s(device, flops, kv_read + qo, low_bit=False)


def elementwise_latency_s(model: ModelSpec, device: DeviceType, tokens: int) -> float:
    """Norms, residual adds, rotary and the FFN activation of one layer, seconds."""
    passes = 10 * model.hidden_size + 3 * model.intermediate_size
    num_bytes = tokens * passes * device.activation_bytes
    return _roofline_s(device, 0.0, num_bytes, low_bit=False) + 4 * device.launch_overhead_s


def layer_latency_s(
    model: ModelSpec,
    device: DeviceType,
    bits: int,
    point: OperatingPoint,
    group_size: int,
    profile: LatencyProfile | None = None,
) -> float:
    """Time of one decoder layer at ``bits`` on ``device`` at ``point``, seconds.

    Uses the measured profile when given and it covers ``bits`` (measured, or marked
    unavailable), else the roofline. Returns ``math.inf`` when the precision cannot run there.
    """
    if bits not in device.supported_bits:
        return math.inf
    if profile is not None and profile.covers(bits):
        return profile.layer_latency_s(bits, point.phase, point.micro_batch, point.context)
    tokens = point.micro_batch * point.new_tokens
    linears = sum(
        linear_latency_s(op, device, bits, tokens, group_size, weight16_bytes(model, device))
        for op in model.layer_linears()
    )
    return (
        linears
        + attention_latency_s(model, device, point)
        + elementwise_latency_s(model, device, tokens)
    )


def embedding_latency_s(
    model: ModelSpec,
    device: DeviceType,
    point: OperatingPoint,
    profile: LatencyProfile | None = None,
) -> float:
    """Token (and position) embedding lookup on the first stage, seconds (measured when the
    profile times it)."""
    measured = _measured_part(profile, "embedding", point)
    if measured is not None:
        return measured
    tokens = point.micro_batch * point.new_tokens
    num_bytes = 2 * tokens * (model.embed_dim + model.hidden_size) * device.activation_bytes
    return _roofline_s(device, 0.0, num_bytes, low_bit=False)


def head_latency_s(
    model: ModelSpec,
    device: DeviceType,
    point: OperatingPoint,
    profile: LatencyProfile | None = None,
) -> float:
    """Final norm, LM head and sampling on the last stage, seconds (measured when the profile
    times it).

    Only the last position of each sequence reaches the LM head, in prefill too.
    """
    measured = _measured_part(profile, "head", point)
    if measured is not None:
        return measured
    rows = point.micro_batch
    flops = 2.0 * rows * model.embed_dim * model.vocab_size
    weights = device.activation_bytes * model.embed_dim * model.vocab_size
    logits = rows * model.vocab_size * 4 * 3  # written, read by softmax/argmax, read by sampling
    norm = point.micro_batch * point.new_tokens * model.hidden_size * device.activation_bytes * 2
    return _roofline_s(device, flops, weights + logits + norm, low_bit=False)


def stage_overhead_s(point: OperatingPoint, profile: LatencyProfile | None = None) -> float:
    """Fixed cost of one stage call per micro-batch outside its layers (step context: masks,
    rotary table; dispatch), seconds: measured when the profile times it, else 0 (the
    roofline charges launch overheads per operator instead)."""
    measured = _measured_part(profile, "stage", point)
    return 0.0 if measured is None else measured


def _measured_part(
    profile: LatencyProfile | None, part: str, point: OperatingPoint
) -> float | None:
    if profile is None:
        return None
    return profile.part_latency_s(part, point.phase, point.micro_batch, point.context)


def measured_link(link: LinkSpec, profile: LatencyProfile | None, gpu: bool) -> LinkSpec:
    """The path between two stage processes of one host, with the profile's measured hop
    (ZeroMQ over loopback) when it has one, else ``link``.

    Its latency is the measured one. Between CPU stages the measured bandwidth replaces the
    catalogue's; a GPU stage's frame also crosses the device's peer path (``link``), so the
    two bandwidths combine in series and a GPU hop never looks faster than either part.
    """
    if profile is None or profile.transfer is None:
        return link
    bandwidth = profile.transfer.bandwidth_gb_s
    if gpu:
        bandwidth = 1.0 / (1.0 / bandwidth + 1.0 / link.bandwidth_gb_s)
    return LinkSpec(bandwidth_gb_s=bandwidth, latency_s=profile.transfer.latency_s)


def hidden_transfer_bytes(model: ModelSpec, point: OperatingPoint, activation_bytes: int) -> int:
    """Bytes of the hidden states one stage sends to the next for a micro-batch."""
    return point.micro_batch * point.new_tokens * model.hidden_size * activation_bytes


def hop_latency_s(
    link: LinkSpec, model: ModelSpec, point: OperatingPoint, activation_bytes: int
) -> float:
    """Time to send a micro-batch's hidden states over ``link`` (alpha + bytes / beta)."""
    return link.transfer_s(hidden_transfer_bytes(model, point, activation_bytes))


def token_return_latency_s(link: LinkSpec, micro_batch: int) -> float:
    """Time to send a micro-batch's sampled token ids from the last stage to the first."""
    return link.transfer_s(micro_batch * TOKEN_ID_BYTES)
