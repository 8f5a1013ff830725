"""Round-to-nearest weight quantization and its packed storage format, without any layer.

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
- 16 bits: the unquantized weight (``runtime.quant.kernels.dense_weight_dtype``); not packed here.

:func:`quantize_rtn` and :func:`dequantize` work through blocks of rows (each row is quantized on
its own), so their temporaries stay a few MiB whatever the weight's size; :func:`packed_nbytes`
gives the resident size of each format without building it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.errors import QuantizationError

PACKED_BITS = (2, 3, 4, 8)
"""Precisions stored as packed integer codes."""
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


def check_bits(bits: int) -> None:
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
    check_bits(bits)
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


def unpack_words(packed: Tensor, bits: int, cols: int) -> Tensor:
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
    check_bits(bits)
    if bits == 8:
        return packed  # packed: [rows, cols] uint8
    return unpack_words(packed, bits, cols)[:, :cols].to(torch.uint8)


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
    check_bits(bits)
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


def affine_into(
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


def dequantize_rows_into(q: QuantizedTensor, start: int, stop: int, out: Tensor) -> None:
    """Dequantize rows [start, stop) of ``q`` into ``out`` [stop - start, in] (any float dtype:
    computed in fp32, rounded once)."""
    cols = q.shape[1]
    packed = q.codes[start:stop]
    # codes: [rows, in], int8 (8 bits) or int32
    codes = packed.view(torch.int8) if q.bits == 8 else unpack_words(packed, q.bits, cols)[:, :cols]
    zeros = None if q.zeros is None else q.zeros[start:stop]
    affine_into(out, codes, q.scales[start:stop], zeros, q.bits, q.group_size)


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
        dequantize_rows_into(q, start, stop, out[start:stop])
    return out


# --------------------------------------------------------------------------- sizes


def packed_nbytes(rows: int, cols: int, bits: int, group_size: int, dense_bytes: int) -> int:
    """Resident bytes of a (rows × cols) weight stored at ``bits`` in this module's format,
    without building it: dense at 16 (``dense_bytes`` per weight), int8 plus one 16-bit scale
    per row at 8, packed codes plus a 16-bit scale and zero per group below."""
    if bits == 16:
        return rows * cols * dense_bytes
    if bits == 8:
        return rows * cols + rows * 2
    return math.ceil(cols * bits / 8) * rows + rows * math.ceil(cols / group_size) * 4
