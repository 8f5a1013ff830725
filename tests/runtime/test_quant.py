"""Tests of runtime/quant.py: packing, RTN error bounds, layer numerics per kernel path, resident
memory against the planner's model, kernel paths and errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from planner.cost_model import packed_linear_bytes
from planner.model_spec import LinearOp
from runtime import quant
from runtime.errors import QuantizationError
from runtime.quant import (
    QuantizedTensor,
    dense_weight_dtype,
    dequantize,
    pack_codes,
    quantize_linear,
    quantize_rtn,
    unpack_codes,
)

CPU = torch.device("cpu")
FP32 = torch.float32
ALL_BITS = (16, 8, 4, 3, 2)
KERNEL_TOLERANCE = 1e-2
"""Relative error of the bf16-activation paths (the input and output are rounded to bf16)."""
EXACT_TOLERANCE = 1e-5


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 0.05


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _build(rows: int, cols: int, bits: int, group: int, impl: str = "auto") -> torch.nn.Module:
    bias = torch.linspace(-1, 1, rows)
    return quantize_linear(
        _weight(rows, cols), bias, bits, group, compute_dtype=FP32, device=CPU, impl=impl
    )  # type: ignore[arg-type]


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
    monkeypatch.setattr(quant, "DEQUANT_CHUNK_ELEMENTS", 250)  # 2 rows a step
    assert torch.equal(dequantize(q), whole)
    assert torch.equal(dequantize(q, torch.bfloat16), whole.bfloat16())


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_row_blocks_matches_one_block(
    monkeypatch: pytest.MonkeyPatch, bits: int, dtype: torch.dtype
) -> None:
    w = _weight(37, 100).to(dtype)
    whole = quantize_rtn(w, bits, 32)
    monkeypatch.setattr(quant, "QUANT_CHUNK_ELEMENTS", 250)  # 2 rows a block, 1 row left
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


# --------------------------------------------------------------------------- layers

SHAPES = [(192, 512, 64), (48, 100, 32), (7, 33, 8)]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize(("rows", "cols", "group"), SHAPES)
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_layer_multiplies_by_its_dequantized_weight(
    bits: int, rows: int, cols: int, group: int, impl: str
) -> None:
    layer = _build(rows, cols, bits, group, impl)
    x = torch.randn(2, 5, cols, generator=torch.Generator().manual_seed(3))
    y = layer(x)
    assert y.shape == (2, 5, rows) and y.dtype == x.dtype
    expected = F.linear(x, layer.dequantized_weight(), layer.bias)
    exact = impl == "reference"
    assert _relative(y, expected) < (EXACT_TOLERANCE if exact else KERNEL_TOLERANCE)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_auto_and_reference_agree(bits: int) -> None:
    auto, reference = _build(192, 512, bits, 64), _build(192, 512, bits, 64, "reference")
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(4))
    assert _relative(auto(x), reference(x)) < KERNEL_TOLERANCE
    assert _relative(auto.dequantized_weight(), reference.dequantized_weight()) < 5e-3


def test_bf16_activations_stay_bf16() -> None:
    layer = _build(64, 128, 4, 64)
    x = torch.randn(3, 128).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = F.linear(x.float(), layer.dequantized_weight(), layer.bias)
    assert _relative(y, expected) < KERNEL_TOLERANCE


def test_layer_output_error_decreases_with_bits() -> None:
    w, x = _weight(128, 256), torch.randn(16, 256, generator=torch.Generator().manual_seed(5))
    exact = F.linear(x, w)
    layers = [
        quantize_linear(w, None, bits, 64, compute_dtype=FP32, device=CPU) for bits in ALL_BITS
    ]
    errors = [_relative(layer(x), exact) for layer in layers]
    assert errors == sorted(errors)


# --------------------------------------------------------------------------- memory


@pytest.fixture(scope="module")
def big_layers() -> dict[int, torch.nn.Module]:
    weight, bias = _weight(4096, 4096), torch.zeros(4096)
    return {
        bits: quantize_linear(weight, bias, bits, 128, compute_dtype=FP32, device=CPU)
        for bits in ALL_BITS
    }


def _planner_bytes(rows: int, cols: int, bits: int, group: int) -> int:
    dense = dense_weight_dtype(FP32, CPU).itemsize
    op = LinearOp("test", in_features=cols, out_features=rows, bias=True)
    return packed_linear_bytes(op, bits, group, dense_bytes=dense) + rows * FP32.itemsize


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize(("rows", "cols", "group"), [*SHAPES, (96, 4096, 128)])
def test_resident_bytes_match_the_planner(bits: int, rows: int, cols: int, group: int) -> None:
    layer = _build(rows, cols, bits, group)
    assert layer.resident_bytes() == pytest.approx(_planner_bytes(rows, cols, bits, group), 0.05)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_resident_bytes_match_the_planner_at_4096(
    big_layers: dict[int, torch.nn.Module], bits: int
) -> None:
    expected = _planner_bytes(4096, 4096, bits, 128)
    assert big_layers[bits].resident_bytes() == pytest.approx(expected, 0.05)


def test_resident_memory_shrinks_with_bits(big_layers: dict[int, torch.nn.Module]) -> None:
    sizes = [big_layers[bits].resident_bytes() for bits in ALL_BITS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert sizes[-1] < 0.15 * 4096 * 4096 * 2  # 2 bits + scales vs fp16


def test_int4_kernel_keeps_only_its_packed_copy(big_layers: dict[int, torch.nn.Module]) -> None:
    tensors = dict(big_layers[4].named_buffers())
    assert set(tensors) == {"qweight", "scales", "bias"}
    assert tensors["qweight"].nbytes == 4096 * 4096 // 2
    assert tensors["scales"].shape == (4096 // 128, 4096, 2)


@pytest.mark.parametrize(("rows", "cols"), [(2816, 1024), (2832, 256), (16, 128), (80, 512)])
def test_int4_cpu_layout_converted_in_tiles_matches_one_conversion(
    monkeypatch: pytest.MonkeyPatch, rows: int, cols: int
) -> None:
    q = quantize_rtn(_weight(rows, cols), 4, 32, torch.bfloat16)
    codes = unpack_codes(q.codes, 4, cols).to(torch.int32)  # [out, in]
    whole = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    monkeypatch.setattr(quant, "QUANT_CHUNK_ELEMENTS", 1)  # one 64-row tile a step
    assert torch.equal(quant._int4_cpu_weight(q, CPU), whole)


def test_three_bit_storage_is_packed() -> None:
    layer = _build(40, 100, 3, 32)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (40, 38)


# --------------------------------------------------------------------------- paths and errors


def test_kernel_path_per_precision_on_cpu(big_layers: dict[int, torch.nn.Module]) -> None:
    paths = {bits: layer.kernel_path for bits, layer in big_layers.items()}
    assert paths == {
        16: "dense",
        8: "int8pack_mm",
        4: "int4pack_mm_cpu",
        3: "dequant-per-call",
        2: "dequant-per-call",
    }
    assert all(layer.bits == bits for bits, layer in big_layers.items())


@pytest.mark.parametrize(
    ("bits", "rows", "cols", "group"),
    [(4, 64, 128, 16), (4, 40, 128, 32), (4, 64, 100, 32), (8, 64, 100, 32)],
)
def test_shapes_the_kernels_refuse_fall_back(bits: int, rows: int, cols: int, group: int) -> None:
    assert _build(rows, cols, bits, group).kernel_path == "dequant-per-call"


def test_reference_always_dequantizes_and_keeps_16_bit_exact() -> None:
    assert _build(64, 128, 4, 64, "reference").kernel_path == "dequant-per-call"
    dense = _build(64, 128, 16, 64, "reference")
    assert dense.kernel_path == "dense" and dense.weight.dtype == FP32


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 32])
def test_unsupported_bits_raise(bits: int) -> None:
    with pytest.raises(QuantizationError, match=f"{bits} bits"):
        _build(16, 32, bits, 32)


def test_quant_linear_refuses_16_bits_and_bad_shapes() -> None:
    with pytest.raises(QuantizationError):
        quant.QuantLinear.from_weight(_weight(4, 8), None, 16, 8, compute_dtype=FP32, device=CPU)
    with pytest.raises(QuantizationError, match="bias"):
        quantize_linear(_weight(4, 8), torch.zeros(5), 4, 8, compute_dtype=FP32, device=CPU)
    with pytest.raises(QuantizationError, match="group size"):
        quantize_linear(_weight(4, 8), None, 4, 0, compute_dtype=FP32, device=CPU)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("compute_dtype", [torch.float16, torch.bfloat16])
def test_cuda_layer_multiplies_by_its_dequantized_weight(
    bits: int, compute_dtype: torch.dtype
) -> None:
    cuda = torch.device("cuda")
    w, bias = _weight(256, 512).to(cuda), torch.zeros(256, device=cuda)
    layer = quantize_linear(w, bias, bits, 128, compute_dtype=compute_dtype, device=cuda)
    x = torch.randn(7, 512, device=cuda, dtype=compute_dtype)
    expected = F.linear(x.float(), layer.dequantized_weight(), bias)
    assert _relative(layer(x), expected) < KERNEL_TOLERANCE
    expected_bytes = packed_linear_bytes(LinearOp("t", 512, 256, True), bits, 128)
    assert layer.resident_bytes() == pytest.approx(expected_bytes + 256 * bias.itemsize, 0.05)
    if bits == 4 and torch.cuda.get_device_capability() >= (8, 0):
        assert layer.kernel_path == "int4pack_mm_cuda"


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize(("rows", "cols", "group"), [(64, 192, 64), (96, 130, 32)])
def test_packed_nbytes_predicts_resident_bytes(bits: int, rows: int, cols: int, group: int) -> None:
    from runtime.quant import packed_nbytes, quantize_linear

    weight = torch.randn(rows, cols)
    layer = quantize_linear(
        weight, None, bits, group, compute_dtype=torch.float32, device=torch.device("cpu")
    )
    assert layer.resident_bytes() == packed_nbytes(rows, cols, bits, group, 4)
