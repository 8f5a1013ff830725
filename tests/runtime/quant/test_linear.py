"""Tests of runtime/quant/linear.py: layer numerics per kernel path, resident memory against the
planner's model, kernel paths and errors, and the names it re-exports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from planner.cost_model import packed_linear_bytes
from planner.model_spec import LinearOp
from runtime import quant
from runtime.errors import QuantizationError
from runtime.quant import (
    dense_weight_dtype,
    kernels,
    native,
    packed_nbytes,
    quantize_linear,
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


NATIVE = native.kernels() is not None
"""Whether pqctl's native kernels load here (an AVX-512 CPU with a C compiler)."""
STREAM = NATIVE and bool(getattr(native.kernels(), "stream_dot", False))
"""Whether 2- and 3-bit layers take the native bit-stream kernels here."""
needs_native = pytest.mark.skipif(
    not NATIVE, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)


@pytest.fixture(params=["native", "torch"])
def kernel_family(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with pqctl's native CPU kernels and again with torch's."""
    if request.param == "native" and not NATIVE:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    if request.param == "torch":
        monkeypatch.setattr(native, "kernels", lambda: None)
    return str(request.param)


# --------------------------------------------------------------------------- layers

SHAPES = [(192, 512, 64), (48, 100, 32), (7, 33, 8)]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize(("rows", "cols", "group"), SHAPES)
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_layer_multiplies_by_its_dequantized_weight(
    bits: int, rows: int, cols: int, group: int, impl: str, kernel_family: str
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


@pytest.mark.parametrize(
    ("bits", "path", "kernel_name"),
    [
        (8, "int8pack_mm", "_weight_int8pack_mm"),
        (8, "native-int8", "int8_matmul"),
        (4, "native-int4", "int4_matmul"),
        (3, "native-int3", "stream_matmul"),
        (2, "native-int2", "stream_matmul"),
    ],
)
def test_prefill_runs_dense_gemm_over_dequantized_blocks(
    monkeypatch: pytest.MonkeyPatch, bits: int, path: str, kernel_name: str
) -> None:
    if path.startswith("native") and not NATIVE:
        pytest.skip(f"native kernels unavailable: {native.unavailable_reason()}")
    if bits < 4 and not STREAM:
        pytest.skip("no 2- and 3-bit kernels on this CPU (avx512_bf16 and avx512_vbmi)")
    owner: object = torch
    if path.startswith("native"):
        owner = native.NativeKernels
    else:
        monkeypatch.setattr(native, "kernels", lambda: None)
    layer = _build(192, 512, bits, 64)
    assert layer.kernel_path == path
    kernel_calls: list[int] = []
    kernel = getattr(owner, kernel_name)

    def counted(*args: object) -> torch.Tensor:
        x = next(a for a in args if isinstance(a, torch.Tensor))
        kernel_calls.append(x.shape[0])
        return kernel(*args)

    monkeypatch.setattr(owner, kernel_name, counted)
    gen = torch.Generator().manual_seed(5)
    dense_from = kernels.DENSE_ROWS[layer.kernel_path]
    decode = torch.randn(dense_from - 1, 512, generator=gen)
    prefill = torch.randn(dense_from, 512, generator=gen)
    weight = layer.dequantized_weight()
    assert _relative(layer(decode), F.linear(decode, weight, layer.bias)) < KERNEL_TOLERANCE
    assert kernel_calls == [dense_from - 1]  # decode: the kernel
    whole = layer(prefill)
    assert kernel_calls == [dense_from - 1]  # prefill: dense GEMM instead
    assert _relative(whole, F.linear(prefill, weight, layer.bias)) < KERNEL_TOLERANCE
    monkeypatch.setattr(kernels, "DENSE_BLOCK_ELEMENTS", 50 * 512)  # 4 blocks, last short
    # the same products, summed in the order the GEMM's blocking picks for each block's shape
    # (equal to the bit on an AVX2 CPU, ~1e-7 apart where oneDNN tiles bf16-capable CPUs)
    assert _relative(layer(prefill), whole) < EXACT_TOLERANCE


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
    dense = dense_weight_dtype(FP32, CPU, FP32).itemsize  # the tests' weights are fp32
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


@pytest.mark.parametrize("native", [False, True])
def test_16_bits_keeps_the_weights_own_dtype_where_the_cpu_computes_it(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """fp32 and fp16 weights stay exact (fp32) on a CPU; bf16 ones stay bf16 where the CPU
    has native bf16 dot products: 16 bits never rounds a checkpoint's weights."""
    monkeypatch.setattr(kernels, "_cpu_has_native_bf16", lambda: native)
    weight = _weight(64, 128)
    for stored, held in (
        (torch.float32, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.bfloat16 if native else torch.float32),
    ):
        layer = quantize_linear(weight.to(stored), None, 16, 64, compute_dtype=FP32, device=CPU)
        assert layer.weight.dtype == held
        assert torch.equal(layer.weight.float(), weight.to(stored).float())


def test_resident_memory_shrinks_with_bits(big_layers: dict[int, torch.nn.Module]) -> None:
    sizes = [big_layers[bits].resident_bytes() for bits in ALL_BITS]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert sizes[-1] < 0.15 * 4096 * 4096 * 2  # 2 bits + scales vs fp16


def test_int4_kernel_keeps_only_its_packed_copy(big_layers: dict[int, torch.nn.Module]) -> None:
    layer = big_layers[4]
    tensors = dict(layer.named_buffers())
    assert tensors["qweight"].nbytes == 4096 * 4096 // 2
    if layer.kernel_path == "native-int4":  # our own packing, read as it is
        assert set(tensors) == {"qweight", "scales", "zeros", "bias"}
        assert tensors["scales"].shape == tensors["zeros"].shape == (4096, 4096 // 128)
    else:  # torch's int4 layout replaces ours
        assert set(tensors) == {"qweight", "scales", "bias"}
        assert tensors["scales"].shape == (4096 // 128, 4096, 2)


def test_three_bit_storage_is_packed() -> None:
    layer = _build(40, 100, 3, 32)
    assert layer.qweight.dtype == torch.uint8 and layer.qweight.shape == (40, 38)


# --------------------------------------------------------------------------- paths and errors


def test_kernel_path_per_precision_on_cpu(big_layers: dict[int, torch.nn.Module]) -> None:
    paths = {bits: layer.kernel_path for bits, layer in big_layers.items()}
    assert paths == {
        16: "dense",
        8: "native-int8" if NATIVE else "int8pack_mm",
        4: "native-int4" if NATIVE else "int4pack_mm_cpu",
        3: "native-int3" if STREAM else "dequant-per-call",
        2: "native-int2" if STREAM else "dequant-per-call",
    }
    assert all(layer.bits == bits for bits, layer in big_layers.items())


@pytest.mark.parametrize(
    ("bits", "rows", "cols", "group"),
    [(4, 64, 128, 16), (4, 40, 128, 32), (4, 64, 100, 32), (8, 64, 100, 32)],
)
def test_shapes_torchs_kernels_refuse_fall_back(
    monkeypatch: pytest.MonkeyPatch, bits: int, rows: int, cols: int, group: int
) -> None:
    monkeypatch.setattr(native, "kernels", lambda: None)
    assert _build(rows, cols, bits, group).kernel_path == "dequant-per-call"


@needs_native
@pytest.mark.parametrize(
    ("bits", "rows", "cols", "group", "path"),
    [
        (4, 64, 128, 16, "dequant-per-call"),  # group not a multiple of 32
        (4, 64, 100, 32, "dequant-per-call"),  # groups do not fill the rows
        (4, 40, 128, 32, "native-int4"),  # any number of output rows
        (8, 64, 100, 32, "native-int8"),  # any number of inputs
        (3, 40, 128, 32, "native-int3" if STREAM else "dequant-per-call"),
        (3, 64, 100, 32, "dequant-per-call"),  # groups do not fill the rows
        (2, 64, 128, 16, "dequant-per-call"),  # group not a multiple of 32
    ],
)
def test_shapes_of_the_native_kernels(
    bits: int, rows: int, cols: int, group: int, path: str
) -> None:
    assert _build(rows, cols, bits, group).kernel_path == path


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
    weight = torch.randn(rows, cols)
    layer = quantize_linear(
        weight, None, bits, group, compute_dtype=torch.float32, device=torch.device("cpu")
    )
    assert layer.resident_bytes() == packed_nbytes(rows, cols, bits, group, 4)


# --------------------------------------------------------------------------- re-exports


def test_the_storage_and_kernel_names_are_reachable_from_quant() -> None:
    from runtime.quant import kernels, packing

    for name in quant.__all__:
        assert hasattr(quant, name), name
    assert quant.quantize_rtn is packing.quantize_rtn and quant.dequantize is packing.dequantize
    assert quant.pack_codes is packing.pack_codes and quant.unpack_codes is packing.unpack_codes
    assert quant.packed_nbytes is packing.packed_nbytes
    assert quant.dense_weight_dtype is kernels.dense_weight_dtype
    assert quant.choose_kernel_path is kernels.choose_kernel_path


def test_impl_torch_builds_on_torchs_kernels_only() -> None:
    paths = {bits: _build(64, 256, bits, 64, "torch").kernel_path for bits in (8, 4)}
    assert paths == {8: "int8pack_mm", 4: "int4pack_mm_cpu"}
    weight = _weight(64, 256).bfloat16()
    dense = quantize_linear(weight, None, 16, 64, compute_dtype=FP32, device=CPU, impl="torch")
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(6))
    # a bf16 GEMM: the activations rounded to bf16, the result too
    assert torch.equal(dense(x), F.linear(x.bfloat16(), weight).float())
