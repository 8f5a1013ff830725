"""Tests of runtime/quant/packing.py: code packing, RTN error bounds, row-block quantization and
dequantization, resident sizes."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.errors import QuantizationError
from runtime.quant import packing
from runtime.quant.packing import (
    QuantizedTensor,
    dequantize,
    pack_codes,
    packed_nbytes,
    quantize_rtn,
    unpack_codes,
)


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 0.05


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _per_element(values: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """[out, groups] per-group values spread over [out, in]."""
    return values.float().repeat_interleave(q.group_size, dim=1)[:, : q.shape[1]]


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 3, 7, 8, 9, 33, 64, 100])
def test_pack_unpack_round_trip(bits: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, math.ceil(cols * bits / 8))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_three_bits_take_three_bytes_per_eight_values() -> None:
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0] * 2], dtype=torch.uint8)
    packed = pack_codes(codes, 3)
    assert packed.shape == (1, 6)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0, :8]))
    assert packed[0, :3].tolist() == [(stream >> (8 * k)) & 0xFF for k in range(3)]
    assert pack_codes(codes[:, :3], 3).shape == (1, 2)  # 9 bits -> 2 bytes


def test_four_and_two_bits_pack_low_bits_first() -> None:
    assert pack_codes(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0x39]]


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_packing_rejects_other_widths(bits: int) -> None:
    with pytest.raises(QuantizationError):
        pack_codes(torch.zeros(1, 8, dtype=torch.uint8), bits)


# --------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("cols", "group"), [(256, 64), (100, 32), (50, 64)])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_rtn_error_is_at_most_half_a_step(
    bits: int, cols: int, group: int, scale_dtype: torch.dtype
) -> None:
    w = _weight(24, cols)
    q = quantize_rtn(w, bits, group, scale_dtype)
    assert q.scales.shape == (24, math.ceil(cols / group)) and q.scales.dtype == scale_dtype
    assert q.zeros is not None
    scale, zero = _per_element(q.scales, q), _per_element(q.zeros, q)
    ulp = zero.abs() * torch.finfo(scale_dtype).eps + 1e-7  # 16-bit rounding of the zero
    assert bool(((dequantize(q) - w).abs() <= scale / 2 + ulp).all())


def test_rtn_8_bit_is_symmetric_per_row() -> None:
    w = _weight(16, 96)
    q = quantize_rtn(w, 8, 32)
    assert q.zeros is None and q.scales.shape == (16,) and q.group_size == 96
    assert q.codes.shape == (16, 96)
    bound = q.scales.float().unsqueeze(1) / 2 + 1e-7
    assert bool(((dequantize(q) - w).abs() <= bound).all())


def test_rtn_error_decreases_with_bits() -> None:
    w = _weight(64, 256)
    errors = [_relative(dequantize(quantize_rtn(w, bits, 64)), w) for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01 < errors[0]


def test_constant_groups_dequantize_exactly() -> None:
    w = torch.full((4, 64), 0.25)
    for bits in (2, 3, 4):
        assert torch.equal(dequantize(quantize_rtn(w, bits, 32)), w)


def test_chunked_dequantization_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    q = quantize_rtn(_weight(37, 100), 3, 32)
    whole = dequantize(q)
    monkeypatch.setattr(packing, "DEQUANT_CHUNK_ELEMENTS", 250)  # 2 rows a step
    assert torch.equal(dequantize(q), whole)
    assert torch.equal(dequantize(q, torch.bfloat16), whole.bfloat16())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_row_blocks_matches_one_block(
    monkeypatch: pytest.MonkeyPatch, bits: int, dtype: torch.dtype
) -> None:
    w = _weight(37, 100).to(dtype)
    whole = quantize_rtn(w, bits, 32)
    monkeypatch.setattr(packing, "QUANT_CHUNK_ELEMENTS", 250)  # 2 rows a block, 1 row left
    blocks = quantize_rtn(w, bits, 32)
    assert torch.equal(blocks.codes, whole.codes) and torch.equal(blocks.scales, whole.scales)
    assert whole.zeros is None or (
        blocks.zeros is not None and torch.equal(blocks.zeros, whole.zeros)
    )
    assert torch.equal(quantize_rtn(w.float(), bits, 32).codes, whole.codes)  # dtype-independent


def test_non_finite_weights_are_refused() -> None:
    w = _weight(4, 32)
    w[1, 3] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_rtn(w, 4, 32)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize(("rows", "cols", "group"), [(64, 192, 64), (96, 130, 32)])
def test_packed_nbytes_counts_what_quantize_rtn_stores(
    bits: int, rows: int, cols: int, group: int
) -> None:
    q = quantize_rtn(_weight(rows, cols), bits, group)
    assert packed_nbytes(rows, cols, bits, group, 2) == q.nbytes
