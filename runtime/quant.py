"""Weight-only quantized linear layers with real packed storage, one per plan precision.

Storage (what :func:`quantize_rtn` produces; it matches ``planner.cost_model.packed_linear_bytes``):

- 2/3/4 bits: asymmetric round-to-nearest, per output row, groups of ``group_size`` consecutive
  input weights (the last group of a row may be shorter). Per group a 16-bit float ``scale`` and
  ``zero``, with ``w ≈ (q - 2**(bits-1)) * scale + zero``: ``zero`` is the value of the middle
  code (tinygemm's convention, so 4-bit groups feed its kernels unchanged). Codes are packed as
  a little-endian bit stream per row: code ``i`` takes bits ``[bits*i, bits*(i+1))`` of the row,
  so 4-bit holds two per byte, 2-bit four per byte, 3-bit eight in three bytes; a row takes
  ``ceil(in_features * bits / 8)`` bytes.
- 8 bits: symmetric, ``w ≈ q * scale``, int8 codes (stored as their uint8 bit pattern) and one
  16-bit scale per output row.
- 16 bits: the unquantized weight in :func:`dense_weight_dtype` (see the decision below).

Compute path per precision (``kernel_path``), chosen by :func:`choose_kernel_path`:

==== ======================= ============================== ===================================
bits CPU                     CUDA (untested here)           fallback
==== ======================= ============================== ===================================
16   ``dense``               ``dense``                      -
8    ``int8pack_mm``         ``int8pack_mm`` if it runs     ``dequant-per-call``
4    ``int4pack_mm_cpu``     ``int4pack_mm_cuda`` (sm ≥ 80) ``dequant-per-call``
3, 2 ``dequant-per-call``    ``dequant-per-call``           -
==== ======================= ============================== ===================================

The int4 kernels need ``group_size`` in {32, 64, 128, 256} dividing ``in_features`` and
``out_features`` divisible by 16 (CPU) or 8 (CUDA); the CPU int8 kernel needs ``in_features``
divisible by 16 (torch 2.13 returns garbage or segfaults otherwise); all take bf16 activations.
The int4 kernels' packed tensor (a kernel-specific layout, ``out*in/2`` bytes) replaces ours as
the resident copy. Scales are bf16 for the bf16 kernels and fp16 for dequant-per-call, which
unpacks the codes into a dense copy in the matmul dtype on every call (rows in chunks, so the
scratch beyond that copy is a few MiB: ``planner.cost_model.dequant_scratch_bytes``) and runs
``F.linear``.

16-bit on CPU, measured (2 threads, AVX-512 with avx512_bf16, torch 2.13, one 4096×4096 linear,
fp32 activations, ms, median of 3-9 calls on an otherwise idle CPU):

============ ===== ===== ===== ===== ===== ===== ============================================
rows         1     4     8     128   256   512   note
============ ===== ===== ===== ===== ===== ===== ============================================
fp32 weights 3.9   7.1   6.0   26.8  52.0  98.6  4 bytes/weight
bf16 weights 1.5   1.4   1.7   10.8  20.4  45.0  2 bytes/weight, x cast to bf16 and back
bf16 upcast  23.8  25.3  24.2  45.8  69.6  118   2 bytes/weight, fp32 copy made per call
============ ===== ===== ===== ===== ===== ===== ============================================

Decision: where the CPU has native bf16 dot products (avx512_bf16 or AMX), "16 bits" means
bf16 weights with activations cast to bf16 for the matmul: 2.2-5× faster than fp32 at every row
count and half the memory, for a bf16 rounding of the activations (~3e-3 relative output error,
as in the int8/int4 kernels). Elsewhere bf16 GEMM is emulated (278 ms at 128 rows in the
reference notes) and 16 bits keeps fp32 weights. The planner counts 16-bit weights at its CPU
device type's ``dense_weight_bytes`` (2 where ``planner.local_host.cpu_has_native_bf16`` reads
the same flags from ``/proc/cpuinfo``). ``impl="reference"`` keeps 16-bit weights in the compute
dtype (exact). Dequant-per-call layers dequantize into the same dtype as 16-bit weights: into
bf16 a 4096×4096 layer takes ~15-22 ms (2-4 bit; fp32: ~25-38 ms), ~0.55-0.75 G weights/s.

One Llama-7B-shaped layer's seven linears (``bench/kernels.py``, same CPU, ratio to 16 bits;
16 bits took 23 ms at 1 row and 511 ms at 512 rows):

======= ========== ===== ===== ===== ===== ===== ======================
bits    path       x1    x4    x8    x128  x512  resident vs fp16
======= ========== ===== ===== ===== ===== ===== ======================
8       int8       0.40  0.55  0.95  2.72  3.06  0.500
4       int4       0.25  0.43  0.71  2.31  2.44  0.266
3       dequant    16.4  16.0  13.2  3.69  1.67  0.203
2       dequant    11.3  11.7  8.84  2.81  1.49  0.141
16 fp32 dense      1.70  4.55  3.35  2.94  2.50  2.000
======= ========== ===== ===== ===== ===== ===== ======================
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.errors import QuantizationError

KernelPath = Literal[
    "dense", "int8pack_mm", "int4pack_mm_cpu", "int4pack_mm_cuda", "dequant-per-call"
]
Impl = Literal["auto", "reference"]
PACKED_BITS = (2, 3, 4, 8)
"""Precisions stored as packed integer codes."""
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes the int4 kernels accept."""
DEQUANT_CHUNK_ELEMENTS = 1 << 20
"""Weights dequantized per step of a dequant-per-call layer (bounds its scratch to ~9 MiB)."""
QUANT_CHUNK_ELEMENTS = 1 << 20
"""Weights quantized per step of :func:`quantize_rtn` (bounds its fp32 temporaries to a few
MiB, so quantizing a weight needs little more than the weight and its packed result)."""


# --------------------------------------------------------------------------- packing


def _lanes(bits: int) -> tuple[int, int]:
    """Codes and bytes in one packing unit: the smallest run of codes filling whole bytes."""
    unit_bits = math.lcm(bits, 8)
    return unit_bits // bits, unit_bits // 8


def _check_bits(bits: int) -> None:
    if bits not in PACKED_BITS:
        raise QuantizationError(
            f"cannot pack {bits}-bit codes; packed precisions are {PACKED_BITS} (16 bits is dense)"
        )


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes densely, row by row, as a little-endian bit stream.

    Args:
        codes: uint8 [rows, cols], each value < 2**bits.
        bits: 2, 3, 4 or 8.

    Returns:
        uint8 [rows, ceil(cols * bits / 8)]; the unused high bits of the last byte are zero.
    """
    _check_bits(bits)
    rows, cols = codes.shape  # codes: [rows, cols] uint8
    if bits == 8:
        return codes.contiguous().clone()
    per_unit, unit_bytes = _lanes(bits)
    units = -(-cols // per_unit)
    padded = F.pad(codes, (0, units * per_unit - cols)).view(rows, units, per_unit)
    word = torch.zeros(rows, units, dtype=torch.int32, device=codes.device)
    for lane in range(per_unit):  # a handful of lanes, each a whole-tensor op
        word |= padded[..., lane].to(torch.int32) << (bits * lane)
    shifts = torch.arange(unit_bytes, dtype=torch.int32, device=codes.device) * 8
    packed = ((word.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)
    return packed.view(rows, units * unit_bytes)[:, : math.ceil(cols * bits / 8)].contiguous()


def _word_bytes(bits: int) -> int:
    """Bytes read as one int32 word when unpacking: 4 (8 or 16 codes) or 3 (eight 3-bit codes)."""
    return 4 if 32 % bits == 0 else 3


def _unpack_words(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Codes of ``packed`` [rows, ceil(cols * bits / 8)] as int32 [rows, >= cols] (tail padding).

    Reads each row as little-endian int32 words holding whole codes (3-bit: overlapping 4-byte
    reads every 3 bytes), then shifts and masks: three whole-tensor ops, no per-element loops.
    """
    if sys.byteorder != "little":
        raise QuantizationError("packed layers need a little-endian machine")
    rows, row_bytes = packed.shape  # packed: [rows, row_bytes] uint8
    word_bytes = _word_bytes(bits)
    per_word = 8 * word_bytes // bits
    words = -(-cols // per_word)
    pad = words * word_bytes + 4 - word_bytes - row_bytes
    padded = F.pad(packed, (0, pad)) if pad else packed
    if word_bytes == 4:
        word = padded.view(torch.int32)  # [rows, words]
    else:  # 3 bytes a word: gather 4-byte windows at a 3-byte stride (top byte masked off)
        windows = padded.as_strided((rows, words, 4), (padded.shape[1], 3, 1))
        gathered = torch.empty(rows, words, 4, dtype=torch.uint8, device=packed.device)
        word = gathered.copy_(windows).view(torch.int32).view(rows, words)
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
    codes = word.unsqueeze(-1) >> shifts  # [rows, words, per_word]
    codes &= (1 << bits) - 1
    return codes.view(rows, words * per_word)


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_codes`.

    Args:
        packed: uint8 [rows, ceil(cols * bits / 8)].
        bits: 2, 3, 4 or 8.
        cols: codes per row.

    Returns:
        uint8 [rows, cols].
    """
    _check_bits(bits)
    if bits == 8:
        return packed  # packed: [rows, cols] uint8
    return _unpack_words(packed, bits, cols)[:, :cols].to(torch.uint8)


# --------------------------------------------------------------------------- quantization


@dataclass(frozen=True, eq=False, slots=True)
class QuantizedTensor:
    """A weight matrix quantized to ``bits``, in the storage format described in the module doc.

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: input weights sharing one scale; ``shape[1]`` at 8 bits (one per row).
        shape: (out_features, in_features) of the original weight.
        codes: uint8 [out, ceil(in * bits / 8)] packed codes (8 bits: the int8 bit patterns).
        scales: 16-bit float [out, groups] (8 bits: [out]).
        zeros: 16-bit float [out, groups], the value of code 2**(bits-1); None at 8 bits.
    """

    bits: int
    group_size: int
    shape: tuple[int, int]
    codes: Tensor
    scales: Tensor
    zeros: Tensor | None

    @property
    def nbytes(self) -> int:
        """Bytes of codes, scales and zeros."""
        zeros = 0 if self.zeros is None else self.zeros.nbytes
        return self.codes.nbytes + self.scales.nbytes + zeros


def _round_up_to(value: Tensor, dtype: torch.dtype) -> Tensor:
    """``value`` (fp32) in ``dtype``, rounded up so the stored scale never shrinks the grid."""
    stored = value.to(dtype)
    return torch.where(stored.float() < value, torch.nextafter(stored, stored + 1), stored)


def _symmetric8(w: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor, None]:
    """(int8 codes as uint8 [rows, in], scales [rows], None) of ``w`` [rows, in] fp32."""
    scales = _round_up_to(w.abs().amax(dim=1) / 127, scale_dtype)
    divisor = torch.where(scales == 0, 1.0, scales.float()).unsqueeze(1)
    codes = torch.clamp(torch.round(w / divisor), -127, 127).to(torch.int8).view(torch.uint8)
    return codes, scales, None


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """``w`` [rows, cols] as [rows, groups, group_size]; the last group padded with its last value
    (which changes neither its min nor its max)."""
    rows, cols = w.shape
    pad = -cols % group_size
    padded = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1) if pad else w
    return padded.view(rows, -1, group_size)


def _asymmetric(
    w: Tensor, bits: int, group_size: int, scale_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """(packed codes, scales [rows, groups], zeros [rows, groups]) of ``w`` [rows, in] fp32."""
    rows, cols = w.shape
    groups = _grouped(w, group_size)  # [rows, groups, group_size]
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    mid, top = 1 << (bits - 1), (1 << bits) - 1
    scales = _round_up_to((high - low) / top, scale_dtype)
    zeros = (low + mid * scales.float()).to(scale_dtype)
    divisor = torch.where(scales == 0, 1.0, scales.float()).unsqueeze(2)
    steps = groups - zeros.float().unsqueeze(2)  # one fp32 temporary, then in place
    steps.div_(divisor).round_().add_(mid).clamp_(0, top)
    codes = steps.to(torch.uint8).view(rows, -1)[:, :cols]
    return pack_codes(codes, bits), scales, zeros


def _check_quantizable(bits: int, group_size: int, scale_dtype: torch.dtype) -> None:
    _check_bits(bits)
    if scale_dtype not in (torch.float16, torch.bfloat16):
        raise QuantizationError(f"scales must be float16 or bfloat16, not {scale_dtype}")
    if group_size < 1:
        raise QuantizationError(f"group size must be at least 1, got {group_size}")


def _empty_quantized(
    shape: tuple[int, int],
    bits: int,
    group_size: int,
    scale_dtype: torch.dtype,
    device: torch.device,
) -> QuantizedTensor:
    """Uninitialised storage for a weight of ``shape`` at ``bits`` (the module doc's format)."""
    rows, cols = shape
    group = cols if bits == 8 else group_size
    groups = -(-cols // max(group, 1))
    codes = torch.empty(rows, math.ceil(cols * bits / 8), dtype=torch.uint8, device=device)
    scale_shape = (rows,) if bits == 8 else (rows, groups)
    scales = torch.empty(scale_shape, dtype=scale_dtype, device=device)
    zeros = None if bits == 8 else torch.empty(scale_shape, dtype=scale_dtype, device=device)
    return QuantizedTensor(bits, group, shape, codes, scales, zeros)


def quantize_rtn(
    weight: Tensor, bits: int, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Round-to-nearest weight-only quantization of a linear layer's weight.

    Works through blocks of rows of about ``QUANT_CHUNK_ELEMENTS`` weights (each row is
    quantized on its own, so the result does not depend on the blocks): beyond ``weight`` and
    the result, it needs a few MiB, whatever the weight's size or dtype.

    Args:
        weight: float [out_features, in_features], any float dtype.
        bits: 2, 3, 4 (group-wise asymmetric) or 8 (per-row symmetric).
        group_size: input weights per scale/zero group (ignored at 8 bits); ≥ 1.
        scale_dtype: torch.float16 or torch.bfloat16 for scales and zeros.

    Returns:
        The packed codes with their scales and zeros; every weight is within half a step
        (``scale / 2``) of its dequantized value, up to the 16-bit rounding of ``zero``.

    Raises:
        QuantizationError: unsupported bits, group size or scale dtype, or non-finite weights.
    """
    _check_quantizable(bits, group_size, scale_dtype)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise QuantizationError(f"expected a 2-D float weight, got {tuple(weight.shape)}")
    rows, cols = weight.shape  # weight: [out, in]
    q = _empty_quantized((rows, cols), bits, group_size, scale_dtype, weight.device)
    step = max(1, QUANT_CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):  # row blocks, not elements
        stop = min(start + step, rows)
        w = weight[start:stop].detach().float()  # [block, in] fp32
        if not bool(torch.isfinite(w).all()):
            raise QuantizationError("the weight holds NaN or infinite values; check the checkpoint")
        if bits == 8:
            codes, scales, zeros = _symmetric8(w, scale_dtype)
        else:
            codes, scales, zeros = _asymmetric(w, bits, group_size, scale_dtype)
        q.codes[start:stop], q.scales[start:stop] = codes, scales
        if q.zeros is not None and zeros is not None:
            q.zeros[start:stop] = zeros
    return q


def _affine_into(
    out: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor | None, bits: int, group_size: int
) -> Tensor:
    """``out`` [rows, cols] = ``(codes - mid) * scale + zero`` per group, in one fp32 pass.

    ``codes`` is an integer [rows, cols] tensor; the fp32 result is rounded once into
    ``out``'s dtype. Written as ``codes * scale + (zero - mid * scale)``.
    """
    rows, cols = codes.shape
    s = scales.float().reshape(rows, -1)  # [rows, groups]
    offset = None if zeros is None else zeros.float() - (1 << (bits - 1)) * s
    full = cols // group_size
    parts = [(slice(0, full * group_size), slice(0, full), full)]
    if full * group_size < cols:
        parts.append((slice(full * group_size, cols), slice(full, full + 1), 1))
    for columns, groups, count in parts:
        if count == 0:
            continue
        target = out[:, columns].view(rows, count, -1)  # [rows, groups, group_size]
        source = codes[:, columns].view(rows, count, -1)
        scale = s[:, groups].unsqueeze(2)
        if offset is None:
            torch.mul(source, scale, out=target)
        else:
            torch.addcmul(offset[:, groups].unsqueeze(2), source, scale, out=target)
    return out


def _dequantize_rows(q: QuantizedTensor, start: int, stop: int, out: Tensor) -> None:
    """Dequantize rows [start, stop) of ``q`` into ``out`` [stop - start, in]."""
    cols = q.shape[1]
    packed = q.codes[start:stop]
    if q.bits == 8:
        codes = packed.view(torch.int8)  # [rows, in]
    else:
        codes = _unpack_words(packed, q.bits, cols)[:, :cols]  # [rows, in] int32
    zeros = None if q.zeros is None else q.zeros[start:stop]
    _affine_into(out, codes, q.scales[start:stop], zeros, q.bits, q.group_size)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense weight a quantized tensor stands for, computed in fp32 and rounded once.

    Args:
        q: the quantized weight.
        dtype: floating dtype of the result.

    Returns:
        [out_features, in_features] in ``dtype``, on ``q.codes``' device. Works through the
        rows in chunks of about ``DEQUANT_CHUNK_ELEMENTS`` weights, so the scratch beyond the
        result stays a few MiB.
    """
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=dtype, device=q.codes.device)
    step = max(1, DEQUANT_CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):  # row chunks, not elements
        stop = min(start + step, rows)
        _dequantize_rows(q, start, stop, out[start:stop])
    return out


# --------------------------------------------------------------------------- platform


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX); else bf16 is emulated.

    ``planner.local_host.cpu_has_native_bf16`` applies the same rule to ``/proc/cpuinfo``.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def dense_weight_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Dtype of 16-bit weights and of per-call dequantized copies on ``device``.

    bf16 on a CPU with native bf16 dot products when the model computes in fp32 (the measured
    decision in the module docstring); the compute dtype everywhere else.
    """
    if device.type == "cpu" and compute_dtype == torch.float32 and _cpu_has_native_bf16():
        return torch.bfloat16
    return compute_dtype


def _cuda_int8pack_runs(device: torch.device) -> bool:
    """Whether this torch build has ``_weight_int8pack_mm`` for CUDA (probed on a tiny input)."""
    x = torch.ones(1, 16, dtype=torch.bfloat16, device=device)
    w = torch.ones(16, 16, dtype=torch.int8, device=device)
    try:
        torch._weight_int8pack_mm(x, w, torch.ones(16, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


def _int8_kernel_runs(device: torch.device) -> bool:
    return device.type == "cpu" or (device.type == "cuda" and _cuda_int8pack_runs(device))


def _cuda_inner_k_tiles(in_features: int) -> int | None:
    """Largest tinygemm inner-K tiling (8, 4 or 2) that divides ``in_features``; None if none."""
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), None)


def _int4_kernel_path(
    in_features: int, out_features: int, group_size: int, device: torch.device
) -> KernelPath:
    if group_size not in TINYGEMM_GROUP_SIZES or in_features % group_size:
        return "dequant-per-call"
    if device.type == "cpu" and out_features % 16 == 0:
        return "int4pack_mm_cpu"
    if (  # CUDA tinygemm: bf16 tensor cores, compute capability 8.0 or newer
        device.type == "cuda"
        and out_features % 8 == 0
        and _cuda_inner_k_tiles(in_features) is not None
        and torch.cuda.get_device_capability(device) >= (8, 0)
    ):
        return "int4pack_mm_cuda"
    return "dequant-per-call"


def choose_kernel_path(
    bits: int,
    in_features: int,
    out_features: int,
    group_size: int,
    device: torch.device,
    impl: Impl = "auto",
) -> KernelPath:
    """The compute path a layer of this shape and precision takes on ``device``.

    ``impl="reference"`` always dequantizes per call (16 bits stays dense). The CPU int8 kernel
    needs ``in_features % 16 == 0``: torch 2.13 returns garbage or crashes otherwise.
    """
    if bits == 16:
        return "dense"
    if impl == "reference":
        return "dequant-per-call"
    if bits == 8 and in_features % 16 == 0 and _int8_kernel_runs(device):
        return "int8pack_mm"
    if bits == 4:
        return _int4_kernel_path(in_features, out_features, group_size, device)
    return "dequant-per-call"


def _scale_dtype(path: KernelPath) -> torch.dtype:
    """bf16 where a bf16 kernel reads the scales, fp16 (3 more mantissa bits) otherwise."""
    return torch.float16 if path == "dequant-per-call" else torch.bfloat16


# --------------------------------------------------------------------------- modules


def _with_bias(y: Tensor, dtype: torch.dtype, bias: Tensor | None) -> Tensor:
    """``y`` [M, out] from a matmul, in ``dtype``, plus ``bias`` [out]."""
    y = y.to(dtype)
    return y if bias is None else y.add_(bias.to(dtype))


def _check_weight(weight: Tensor, bias: Tensor | None) -> None:
    if weight.dim() != 2:
        raise QuantizationError(f"a linear weight is 2-D, got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise QuantizationError(
            f"bias shape {tuple(bias.shape)} does not match {weight.shape[0]} output features"
        )


def packed_nbytes(rows: int, cols: int, bits: int, group_size: int, dense_bytes: int) -> int:
    """Resident bytes of a (rows × cols) weight stored at ``bits`` in this module's format,
    without building it: dense at 16 (``dense_bytes`` per weight), int8 plus one 16-bit scale
    per row at 8, packed codes plus a 16-bit scale and zero per group below."""
    if bits == 16:
        return rows * cols * dense_bytes
    if bits == 8:
        return rows * cols + rows * 2
    return math.ceil(cols * bits / 8) * rows + rows * math.ceil(cols / group_size) * 4


def _module_bytes(module: nn.Module) -> int:
    tensors = [*module.buffers(), *module.parameters()]
    return sum(t.nbytes for t in tensors)


class DenseLinear(nn.Module):
    """A 16-bit linear layer: the unquantized weight in :func:`dense_weight_dtype`.

    Activations are cast to the weight's dtype for the matmul and the result back to theirs.
    """

    weight: Tensor
    bias: Tensor | None
    bits = 16
    kernel_path: KernelPath = "dense"

    def __init__(self, weight: Tensor, bias: Tensor | None, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape  # weight: [out, in]
        self.group_size = group_size
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        bits: int,
        group_size: int,
        *,
        compute_dtype: torch.dtype,
        device: torch.device | str,
        impl: Impl = "auto",
    ) -> DenseLinear:
        """Hold ``weight`` [out, in] unquantized; ``bias`` [out] stays in ``compute_dtype``.

        The weight goes to :func:`dense_weight_dtype`, or to ``compute_dtype`` itself with
        ``impl="reference"`` (exact numerics for tests). ``group_size`` is unused.
        """
        _check_weight(weight, bias)
        if bits != 16:
            raise QuantizationError(f"DenseLinear holds 16-bit layers, not {bits}-bit ones")
        device = torch.device(device)
        auto = impl == "auto"
        dtype = dense_weight_dtype(compute_dtype, device) if auto else compute_dtype
        with torch.no_grad():
            w = weight.detach().to(device=device, dtype=dtype).contiguous()
            b = None if bias is None else bias.detach().to(device=device, dtype=compute_dtype)
        return cls(w, b, group_size)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] -> [..., out] in x's dtype."""
        if x.dtype == self.weight.dtype:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, self.weight, bias)
        x2 = x.reshape(-1, self.in_features).to(self.weight.dtype)  # [M, in]
        y = _with_bias(F.linear(x2, self.weight), x.dtype, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def resident_bytes(self) -> int:
        """Bytes of every tensor the module keeps (weight and bias)."""
        return _module_bytes(self)

    def dequantized_weight(self) -> Tensor:
        """fp32 [out, in]: the weight the layer multiplies by."""
        return self.weight.float()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}, dense"


def _tinygemm_scales_and_zeros(q: QuantizedTensor) -> Tensor:
    """[groups, out, 2] bf16: tinygemm's interleaved (scale, zero) per group and output row."""
    assert q.zeros is not None
    return torch.stack([q.scales.t(), q.zeros.t()], dim=-1).to(torch.bfloat16).contiguous()


INT4_CPU_TILE_ROWS = 64
"""Output rows the CPU int4 layout packs together: tiles of 64 rows (and the last, shorter one)
convert independently, so a weight is converted a block of tiles at a time."""


def _int4_cpu_weight(q: QuantizedTensor, device: torch.device) -> Tensor:
    """uint8 [out, in / 2]: the CPU int4 kernel's layout, converted from int32 codes a block of
    whole tiles at a time so the int32 copy stays a few MiB."""
    rows, cols = q.shape
    packed = q.codes.to(device)
    out = torch.empty(rows, cols // 2, dtype=torch.uint8, device=device)
    tiles = max(1, QUANT_CHUNK_ELEMENTS // (cols * INT4_CPU_TILE_ROWS))
    step = tiles * INT4_CPU_TILE_ROWS
    for start in range(0, rows, step):  # blocks of tiles, not elements
        stop = min(start + step, rows)
        codes = _unpack_words(packed[start:stop], 4, cols)[:, :cols]  # [block, in] int32
        out[start:stop] = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    return out


def _int4_kernel_weight(q: QuantizedTensor, path: KernelPath, device: torch.device) -> Tensor:
    """The packed tensor an int4 kernel reads, ``out * in / 2`` bytes, built from our codes."""
    if path == "int4pack_mm_cpu":
        return _int4_cpu_weight(q, device)
    # CUDA (untested here): uint8 [out, in/2] with the even code in the high nibble.
    packed = q.codes.to(device)
    swapped = ((packed & 0x0F) << 4) | (packed >> 4)
    tiles = _cuda_inner_k_tiles(q.shape[1])
    assert tiles is not None
    return torch._convert_weight_to_int4pack(swapped.contiguous(), tiles)


def _kernel_buffers(
    q: QuantizedTensor, path: KernelPath, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(qweight, scales, zeros) the layer keeps for ``path``."""
    if path == "int8pack_mm":
        return q.codes.view(torch.int8).to(device), q.scales.to(device), None
    if path in ("int4pack_mm_cpu", "int4pack_mm_cuda"):
        scales = _tinygemm_scales_and_zeros(q).to(device)
        return _int4_kernel_weight(q, path, device), scales, None
    zeros = None if q.zeros is None else q.zeros.to(device)
    return q.codes.to(device), q.scales.to(device), zeros


class QuantLinear(nn.Module):
    """A weight-only quantized linear layer over real packed storage (2, 3, 4 or 8 bits).

    Buffers by ``kernel_path``: ``qweight`` holds our packed codes (dequant-per-call), int8 codes
    (int8pack_mm) or the int4 kernel's packed tensor; ``scales`` holds the per-group or per-row
    scales, or tinygemm's [groups, out, 2] scales-and-zeros; ``zeros`` only for dequant-per-call.
    """

    qweight: Tensor
    scales: Tensor
    zeros: Tensor | None
    bias: Tensor | None

    def __init__(
        self,
        shape: tuple[int, int],
        bits: int,
        group_size: int,
        kernel_path: KernelPath,
        matmul_dtype: torch.dtype,
        buffers: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = shape
        self.bits, self.group_size = bits, group_size
        self.kernel_path: KernelPath = kernel_path
        self.matmul_dtype = matmul_dtype
        for name, tensor in zip(("qweight", "scales", "zeros", "bias"), buffers, strict=True):
            self.register_buffer(name, tensor)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        bits: int,
        group_size: int,
        *,
        compute_dtype: torch.dtype,
        device: torch.device | str,
        impl: Impl = "auto",
    ) -> QuantLinear:
        """Quantize ``weight`` [out, in] (RTN) and place it on ``device`` for its kernel path.

        Args:
            weight: float [out_features, in_features], on any device.
            bias: [out_features] or None; kept in ``compute_dtype``.
            bits: 2, 3, 4 or 8.
            group_size: input weights per scale group (2-4 bits).
            compute_dtype: the model's activation dtype on ``device``.
            device: where the layer runs.
            impl: "auto" picks the fastest path; "reference" dequantizes per call into
                ``compute_dtype`` (same quantized values, for tests).

        Raises:
            QuantizationError: unsupported bits or group size, or a malformed weight.
        """
        _check_weight(weight, bias)
        _check_bits(bits)
        if group_size < 1:
            raise QuantizationError(f"group size must be at least 1, got {group_size}")
        device = torch.device(device)
        out_features, in_features = weight.shape
        auto = choose_kernel_path(bits, in_features, out_features, group_size, device)
        path = auto if impl == "auto" else "dequant-per-call"
        matmul = compute_dtype if impl == "reference" else dense_weight_dtype(compute_dtype, device)
        with torch.no_grad():
            q = quantize_rtn(weight, bits, group_size, _scale_dtype(auto))
            qweight, scales, zeros = _kernel_buffers(q, path, device)
            b = None if bias is None else bias.detach().to(device=device, dtype=compute_dtype)
        shape = (out_features, in_features)
        return cls(shape, bits, q.group_size, path, matmul, (qweight, scales, zeros, b))

    def _quantized(self) -> QuantizedTensor:
        """Our storage format over the buffers (dequant-per-call and int8pack_mm only)."""
        codes = self.qweight.view(torch.uint8)
        shape = (self.out_features, self.in_features)
        return QuantizedTensor(self.bits, self.group_size, shape, codes, self.scales, self.zeros)

    def dense_weight(self) -> Tensor:
        """[out, in] in ``matmul_dtype``: the copy a dequant-per-call layer builds on every call.

        Raises:
            QuantizationError: the layer runs an int4 kernel, whose layout is not ours.
        """
        if self.kernel_path in ("int4pack_mm_cpu", "int4pack_mm_cuda"):
            raise QuantizationError("int4 kernel layers have no dense copy; dequantized_weight()")
        return dequantize(self._quantized(), self.matmul_dtype)

    def _matmul(self, x: Tensor) -> Tensor:
        """``x`` [M, in] -> [M, out] in the path's output dtype."""
        path = self.kernel_path
        if path == "int8pack_mm":
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self.scales)
        if path == "int4pack_mm_cpu":
            x16 = x.to(torch.bfloat16)
            return torch._weight_int4pack_mm_for_cpu(
                x16, self.qweight, self.group_size, self.scales
            )
        if path == "int4pack_mm_cuda":  # untested here: needs an sm80+ GPU
            x16 = x.to(torch.bfloat16)
            return torch._weight_int4pack_mm(x16, self.qweight, self.group_size, self.scales)
        return F.linear(x.to(self.matmul_dtype), self.dense_weight())

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] -> [..., out] in x's dtype."""
        x2 = x.reshape(-1, self.in_features).contiguous()  # [M, in]
        y = _with_bias(self._matmul(x2), x.dtype, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def resident_bytes(self) -> int:
        """Bytes of every tensor the module keeps: packed weight, scales, zeros, bias."""
        return _module_bytes(self)

    def dequantized_weight(self) -> Tensor:
        """fp32 [out, in]: the weight the layer effectively multiplies by.

        For the int4 kernels the codes are read back through the kernel itself (unit scales, an
        identity input), which costs a matmul with ``in_features`` rows: meant for tests.
        """
        if self.kernel_path == "int8pack_mm":  # the kernel scales fp32 sums: no bf16 rounding
            return dequantize(self._quantized(), torch.float32)
        if self.kernel_path == "dequant-per-call":
            return self.dense_weight().float()
        codes = self._int4_codes_via_kernel()  # [out, in] fp32, 0..15
        scales, zeros = self.scales[..., 0].t(), self.scales[..., 1].t()
        return _affine_into(torch.empty_like(codes), codes, scales, zeros, 4, self.group_size)

    def _int4_codes_via_kernel(self) -> Tensor:
        rows, device = self.in_features, self.qweight.device
        groups = self.in_features // self.group_size
        unit = torch.zeros(groups, self.out_features, 2, dtype=torch.bfloat16, device=device)
        unit[..., 0] = 1
        identity = torch.eye(rows, dtype=torch.bfloat16, device=device)
        minus8 = self._kernel_with(identity, unit)  # [in, out]: code - 8, exact in bf16
        return minus8.t().float().add_(8).contiguous()

    def _kernel_with(self, x: Tensor, scales_and_zeros: Tensor) -> Tensor:
        if self.kernel_path == "int4pack_mm_cpu":
            return torch._weight_int4pack_mm_for_cpu(
                x, self.qweight, self.group_size, scales_and_zeros
            )
        return torch._weight_int4pack_mm(x, self.qweight, self.group_size, scales_and_zeros)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bits={self.bits}, "
            f"group={self.group_size}, path={self.kernel_path}"
        )


# --------------------------------------------------------------------------- registry

QUANTIZERS: Mapping[int, Callable[..., nn.Module]] = MappingProxyType(
    {
        16: DenseLinear.from_weight,
        8: QuantLinear.from_weight,
        4: QuantLinear.from_weight,
        3: QuantLinear.from_weight,
        2: QuantLinear.from_weight,
    }
)
"""Module constructor per plan precision, each ``(weight, bias, bits, group_size, *,
compute_dtype, device, impl) -> nn.Module``."""


def quantize_linear(
    weight: Tensor,
    bias: Tensor | None,
    bits: int,
    group_size: int,
    *,
    compute_dtype: torch.dtype,
    device: torch.device | str,
    impl: Impl = "auto",
) -> nn.Module:
    """The module that runs a linear layer at the plan's precision ``bits``.

    Args:
        weight: float [out_features, in_features].
        bias: [out_features] or None.
        bits: 16, 8, 4, 3 or 2.
        group_size: input weights per scale group (2-4 bits).
        compute_dtype: the model's activation dtype on ``device``.
        device: where the layer runs.
        impl: "auto" or "reference" (always dequantize per call; for tests).

    Returns:
        A :class:`DenseLinear` or :class:`QuantLinear`; both expose ``bits``, ``group_size``,
        ``kernel_path``, ``resident_bytes()`` and ``dequantized_weight()``.

    Raises:
        QuantizationError: ``bits`` is not a supported precision, or the weight is malformed.
    """
    make = QUANTIZERS.get(bits)
    if make is None:
        supported = ", ".join(str(b) for b in sorted(QUANTIZERS, reverse=True))
        raise QuantizationError(
            f"no quantized layer for {bits} bits; a plan may use {supported} bits"
        )
    return make(
        weight, bias, bits, group_size, compute_dtype=compute_dtype, device=device, impl=impl
    )
