"""Tests of runtime/quant/kernels.py: the kernel layouts built from the packed codes."""

from __future__ import annotations

import pytest
import torch

from runtime.quant import kernels, native
from runtime.quant.packing import quantize_rtn, unpack_codes

CPU = torch.device("cpu")


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 0.05


@pytest.mark.parametrize(("rows", "cols"), [(2816, 1024), (2832, 256), (16, 128), (80, 512)])
def test_int4_cpu_layout_converted_in_tiles_matches_one_conversion(
    monkeypatch: pytest.MonkeyPatch, rows: int, cols: int
) -> None:
    q = quantize_rtn(_weight(rows, cols), 4, 32, torch.bfloat16)
    codes = unpack_codes(q.codes, 4, cols).to(torch.int32)  # [out, in]
    whole = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    monkeypatch.setattr(kernels, "INT4_CPU_BLOCK_ELEMENTS", 1)  # one 64-row tile a step
    assert torch.equal(kernels._int4_cpu_weight(q, CPU), whole)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_16_bit_weights_are_bf16_only_on_a_bf16_cpu_computing_in_fp32(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool
) -> None:
    monkeypatch.setattr(kernels, "_cpu_has_native_bf16", lambda: native_bf16)
    expected = torch.bfloat16 if native_bf16 else torch.float32
    assert kernels.dense_weight_dtype(torch.float32, CPU) == expected
    assert kernels.dense_weight_dtype(torch.float16, CPU) == torch.float16
    assert kernels.dense_weight_dtype(torch.float16, torch.device("cuda")) == torch.float16


def test_kernel_paths_by_shape_on_cpu_with_torch_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "kernels", lambda: None)  # no compiler, or not AVX-512
    choose = kernels.choose_kernel_path
    assert choose(16, 100, 100, 32, CPU) == "dense"
    assert choose(8, 128, 64, 32, CPU) == "int8pack_mm"
    assert choose(8, 100, 64, 32, CPU) == "dequant-per-call"  # in_features % 16
    assert choose(4, 256, 64, 128, CPU) == "int4pack_mm_cpu"
    assert choose(4, 256, 40, 128, CPU) == "dequant-per-call"  # out_features % 16
    assert choose(4, 256, 64, 16, CPU) == "dequant-per-call"  # group size
    assert choose(4, 256, 64, 128, CPU, impl="reference") == "dequant-per-call"
    assert choose(3, 256, 64, 128, CPU) == "dequant-per-call"
    assert kernels.scale_dtype_for("int4pack_mm_cpu") == torch.bfloat16
    assert kernels.scale_dtype_for("dequant-per-call") == torch.float16


def test_kernel_paths_by_shape_on_cpu_with_native_kernels() -> None:
    if native.kernels() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    choose = kernels.choose_kernel_path
    assert choose(16, 100, 100, 32, CPU) == "dense"
    assert choose(8, 128, 64, 32, CPU) == "native-int8"
    assert choose(8, 100, 64, 32, CPU) == "native-int8"  # any in_features
    assert choose(4, 256, 64, 128, CPU) == "native-int4"
    assert choose(4, 256, 40, 32, CPU) == "native-int4"  # any out_features
    assert choose(4, 256, 64, 16, CPU) == "dequant-per-call"  # group size not a multiple of 32
    assert choose(4, 320, 64, 128, CPU) == "dequant-per-call"  # groups must fill the rows
    assert choose(4, 320, 64, 64, CPU) == "native-int4"
    assert choose(8, 128, 64, 32, CPU, impl="reference") == "dequant-per-call"
    stream = native.kernels().stream_dot  # type: ignore[union-attr]
    assert choose(3, 256, 64, 128, CPU) == ("native-int3" if stream else "dequant-per-call")
    assert choose(2, 256, 40, 32, CPU) == ("native-int2" if stream else "dequant-per-call")
    assert choose(3, 256, 64, 16, CPU) == "dequant-per-call"  # group size not a multiple of 32
    assert choose(2, 256, 64, 128, CPU, impl="torch") == "dequant-per-call"
    assert kernels.scale_dtype_for("native-int4") == torch.bfloat16
    assert kernels.scale_dtype_for("native-int3") == torch.float16  # as dequant-per-call
