"""Tests of runtime/quant/native.py and native_kernels.c: pqctl's CPU kernels against fp32
references on our packed storage, their build, cache and fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.quant import native
from runtime.quant.packing import dequantize, quantize_rtn

KERNELS = native.kernels()
pytestmark = pytest.mark.skipif(
    KERNELS is None, reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 16, 17)
"""Activation rows: every register blocking (1-8), and more than one pass over the weight."""


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * 0.05


def _inputs(rows: int, cols: int) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows))


def _dot_form(rows: int, weight_dtype: torch.dtype) -> bool:
    """Whether ``rows`` activation rows meet a weight of that dtype in bf16 dot products."""
    assert KERNELS is not None
    return KERNELS.bf16_dot and rows >= native.DOT_FROM_ROWS.get(weight_dtype, rows + 1)


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), [(64, 256), (13, 100), (37, 2064), (5, 7)])
def test_int8_product_equals_the_fp32_product_of_the_dequantized_weight(
    m: int, n: int, k: int
) -> None:
    assert KERNELS is not None
    q = quantize_rtn(_weight(n, k), 8, k, torch.bfloat16)
    x = _inputs(m, k)
    y = KERNELS.int8_matmul(x, q.codes.view(torch.int8), q.scales)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # the same fp32 products (codes times scales are exact), summed in another order
    assert _relative(y, _int8_rows(x) @ dequantize(q).t()) < 1e-5


def _int8_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows int8 codes meet: rounded to bf16 in the dot-product form, to 15 bits a block
    in the int16 form, else fp32 as they are."""
    assert KERNELS is not None
    if _dot_form(x.shape[0], torch.int8):
        return x.bfloat16().float()
    return native.int16_rows(x) if KERNELS.int8_wide else x


needs_int16_form = pytest.mark.skipif(
    KERNELS is None or not KERNELS.int8_wide, reason="the int16 form needs avx512_vnni"
)


@needs_int16_form
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), [(64, 256), (13, 100), (37, 2064), (5, 7)])
def test_the_int16_form_takes_any_number_of_rows(m: int, n: int, k: int) -> None:
    """As on a CPU with avx512_vnni but no bf16 dot products, which takes it at every size."""
    assert KERNELS is not None
    q = quantize_rtn(_weight(n, k), 8, k, torch.bfloat16)
    x = _inputs(m, k)
    y = KERNELS.int8_wide_matmul(x, q.codes.view(torch.int8), q.scales)
    assert y is not None
    assert _relative(y, native.int16_rows(x) @ dequantize(q).t()) < 1e-5


@needs_int16_form
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_the_int16_form_rounds_each_block_of_a_row_to_15_bits(m: int) -> None:
    assert KERNELS is not None
    k = 2 * native.WIDE_BLOCK + 40  # two whole blocks and a part, with a tail past 32s
    x = _inputs(m, k)
    x[0, : native.WIDE_BLOCK] *= 0.1  # below 0.5, and then the block's largest is
    x[0, 3] = 1 - 2**-20  # 2^15 steps of 2^-15 rounded: held at 32767
    x[0, 5] = 2.5 * 2**-15  # half a step past a whole number of steps: ties go to even
    x[-1, native.WIDE_BLOCK : 2 * native.WIDE_BLOCK] = 0  # an all-zero block
    x[-1, 2 * native.WIDE_BLOCK] = 3e4  # an outlier coarsens its own block only
    x[-1, 2 * native.WIDE_BLOCK + 1] = 1e-41  # subnormal
    # one code of 1 a row: each output is one input as the kernel holds it, exactly
    codes = torch.eye(k, dtype=torch.int8)
    y = KERNELS.int8_matmul(x, codes, torch.ones(k, dtype=torch.bfloat16))
    held = native.int16_rows(x)
    assert torch.equal(y, held)
    assert held[0, 3] == 32767 * 2**-15 and held[0, 5] == 2 * 2**-15
    first = slice(8, native.WIDE_BLOCK)  # (past the held-back entry of row 0)
    largest = x[-1, : native.WIDE_BLOCK].abs().max()
    step = torch.ldexp(torch.ones(()), torch.frexp(largest)[1] - 15)
    assert (held - x)[-1, first].abs().max() <= step / 2  # the nearest of its block's steps
    zeros = torch.zeros(native.WIDE_BLOCK)
    assert torch.equal(held[-1, native.WIDE_BLOCK : 2 * native.WIDE_BLOCK], zeros)
    assert held[-1, 2 * native.WIDE_BLOCK + 1] == 0 and held[-1, 2 * native.WIDE_BLOCK] == 3e4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_row_with_a_value_not_finite_reaches_the_output(bad: float) -> None:
    assert KERNELS is not None
    q = quantize_rtn(_weight(7, 300), 8, 300, torch.bfloat16)
    x = _inputs(2, 300)
    x[1, 5] = bad
    y = KERNELS.int8_matmul(x, q.codes.view(torch.int8), q.scales)
    assert not y[1].isfinite().any() and y[0].isfinite().all()
    assert _relative(y[:1], x[:1] @ dequantize(q).t()) < 1e-5


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k", "group"), [(64, 256, 32), (13, 384, 128), (48, 512, 64)])
def test_int4_product_equals_the_fp32_product_of_the_dequantized_weight(
    m: int, n: int, k: int, group: int
) -> None:
    assert KERNELS is not None
    q = quantize_rtn(_weight(n, k), 4, group, torch.bfloat16)
    assert q.zeros is not None
    x = _inputs(m, k)
    y = KERNELS.int4_matmul(x, q.codes, q.scales, q.zeros, group)
    assert y.shape == (m, n) and y.dtype == torch.float32
    one_bf16_row = m == 1 and group % 64 == 0 and KERNELS.int4_row_form == "bf16-dot"
    rows_in_bf16 = _dot_form(m, torch.uint8)
    # on the bf16 dot-product forms the rows are rounded to bf16 first, as torch's int4 kernels
    # round them; groups that are not a multiple of 64 then take packing's bf16 dequantization
    x_used = x.bfloat16().float() if one_bf16_row or rows_in_bf16 else x
    w_rounded = rows_in_bf16 and group % 64 != 0
    w_used = dequantize(q, torch.bfloat16).float() if w_rounded else dequantize(q)
    assert _relative(y, x_used @ w_used.t()) < 1e-5


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(
    ("n", "k", "group", "scale_dtype"),
    [
        (13, 256, 32, torch.float16),
        (64, 384, 128, torch.bfloat16),
        (37, 2048, 64, torch.float16),
    ],
)
def test_bit_stream_product_is_the_product_of_bf16_rows_and_the_dequantized_weight(
    m: int, bits: int, n: int, k: int, group: int, scale_dtype: torch.dtype
) -> None:
    assert KERNELS is not None
    if not KERNELS.stream_dot:
        pytest.skip("no 2- and 3-bit kernels on this CPU (avx512_bf16 and avx512_vbmi)")
    q = quantize_rtn(_weight(n, k), bits, group, scale_dtype)
    assert q.zeros is not None
    x = _inputs(m, k)
    y = KERNELS.stream_matmul(x, q.codes, q.scales, q.zeros, group, bits)
    assert y.shape == (m, n) and y.dtype == torch.float32
    # rows rounded to bf16, the weight as packing computes it in fp32; products exact
    assert _relative(y, x.bfloat16().double() @ dequantize(q).double().t()) < 1e-5


@pytest.mark.parametrize("bits", [8, 4])
def test_threads_split_output_rows_without_changing_a_bit(bits: int) -> None:
    assert KERNELS is not None
    q = quantize_rtn(_weight(200, 512), bits, 128, torch.bfloat16)
    x = _inputs(3, 512)

    def product() -> torch.Tensor:
        if bits == 8:
            return KERNELS.int8_matmul(x, q.codes.view(torch.int8), q.scales)
        assert q.zeros is not None
        return KERNELS.int4_matmul(x, q.codes, q.scales, q.zeros, 128)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = product()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(product(), alone)


def test_int4_shapes_the_kernel_takes() -> None:
    assert native.int4_shape_supported(4096, 128)
    assert native.int4_shape_supported(11008, 128)
    assert not native.int4_shape_supported(4096, 16)  # groups of a multiple of 32
    assert not native.int4_shape_supported(100, 32)  # groups must fill the rows


# --------------------------------------------------------------------------- build and cache


def test_build_is_cached_by_source_compiler_and_cpu(tmp_path: Path) -> None:
    cc = native.compiler()
    assert cc is not None
    first = native.build(tmp_path, cc)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path, cc) == first and first.stat().st_mtime_ns == stamp
    other = native.build(tmp_path, cc, ("-DPQ_UNUSED_FLAG",))  # other flags: another library
    assert other != first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])


def test_a_failed_build_names_the_compilers_complaint(tmp_path: Path) -> None:
    cc = native.compiler()
    assert cc is not None
    with pytest.raises(native.NativeBuildError, match="failed"):
        native.build(tmp_path, cc, ("-fno-such-option-pqctl",))
    assert list(tmp_path.iterdir()) == []  # no partial file left


_PROBE = (
    "import torch\n"
    "from runtime.quant import native\n"
    "from runtime.quant.linear import quantize_linear\n"
    "layer = quantize_linear(torch.randn(64, 128), None, 8, 32, compute_dtype=torch.float32,"
    " device='cpu')\n"
    "print(layer.kernel_path, '|', native.unavailable_reason())\n"
)


def _probe(tmp_path: Path, **env: str) -> str:
    environment = {**os.environ, native.CACHE_ENV: str(tmp_path / "cache"), **env}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=True,
    )
    return done.stdout.strip()


def test_without_a_compiler_layers_take_torchs_kernels(tmp_path: Path) -> None:
    out = _probe(tmp_path, CC=str(tmp_path / "no-such-cc"))
    assert out.startswith("int8pack_mm |")
    assert "cannot run the C compiler" in out


def test_the_switch_turns_them_off(tmp_path: Path) -> None:
    out = _probe(tmp_path, **{native.DISABLE_ENV: "0"})
    assert out == f"int8pack_mm | {native.DISABLE_ENV}=0 turns them off"
    assert not (tmp_path / "cache").exists()


def test_a_fresh_process_builds_into_its_cache_and_uses_them(tmp_path: Path) -> None:
    assert _probe(tmp_path) == "native-int8 | None"
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("pqctl_kernels-")


BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    ("bits", "group", "shape", "scale_dtype"),
    [
        (8, 0, (100, 200), BF16),
        (8, 0, (9, 37), BF16),
        (4, 128, (100, 512), BF16),
        (4, 32, (37, 96), BF16),
        (3, 32, (37, 96), FP16),
        (3, 128, (20, 512), BF16),
        (2, 64, (21, 192), FP16),
        (2, 32, (5, 64), BF16),
    ],
)
def test_dequantized_blocks_equal_packings_own_dequantization(
    bits: int, group: int, shape: tuple[int, int], scale_dtype: torch.dtype
) -> None:
    assert KERNELS is not None
    if bits < 4 and not KERNELS.stream_dot:
        pytest.skip("no 2- and 3-bit kernels on this CPU (avx512_bf16 and avx512_vbmi)")
    rows, cols = shape
    q = quantize_rtn(_weight(rows, cols), bits, group or cols, scale_dtype)
    assert native.dequantize_supported(q)
    out = torch.empty(rows - 4, cols, dtype=torch.bfloat16)
    KERNELS.dequantize_bf16(q, 3, rows - 1, out)
    assert torch.equal(out, dequantize(q, torch.bfloat16)[3 : rows - 1])


def test_dequantizing_needs_bf16_scales_and_a_supported_shape() -> None:
    fp16 = quantize_rtn(_weight(8, 64), 8, 64, torch.float16)
    three_bit = quantize_rtn(_weight(8, 64), 3, 32, torch.float16)
    odd_groups = quantize_rtn(_weight(8, 96), 4, 64, torch.bfloat16)
    odd_three_bit = quantize_rtn(_weight(8, 96), 3, 64, torch.float16)
    four_bit_fp16 = quantize_rtn(_weight(8, 64), 4, 32, torch.float16)
    refused = (fp16, odd_groups, odd_three_bit, four_bit_fp16)
    assert not any(native.dequantize_supported(q) for q in refused)
    assert KERNELS is not None
    assert native.dequantize_supported(three_bit) == KERNELS.stream_dot


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), [(64, 256), (13, 100), (37, 2064)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_16_bit_product_is_the_fp32_product_of_the_weight(
    m: int, n: int, k: int, dtype: torch.dtype
) -> None:
    assert KERNELS is not None
    w = _weight(n, k).to(dtype)
    x = _inputs(m, k)
    y = KERNELS.dense_matmul(x, w)
    # fp32 products and sums; from DOT_FROM_ROWS rows against bf16 weights the activations are
    # rounded to bf16 first (as a bf16 GEMM rounds them), the products still exact
    x_used = x.bfloat16() if _dot_form(m, dtype) else x
    assert _relative(y, x_used.double() @ w.double().t()) < 1e-6


def test_16_bit_bf16_layers_multiply_few_decode_rows_in_fp32() -> None:
    from runtime.quant.linear import NATIVE_DENSE_ROWS, quantize_linear

    w = _weight(96, 256).bfloat16()
    layer = quantize_linear(w, None, 16, 64, compute_dtype=torch.float32, device="cpu")
    assert layer.weight.dtype == torch.bfloat16
    assert KERNELS is not None
    rounded_from = native.DOT_FROM_ROWS[torch.bfloat16] if KERNELS.bf16_dot else 10**9
    for rows in range(1, NATIVE_DENSE_ROWS[torch.bfloat16] + 2):
        x = _inputs(rows, 256)
        exact = x.double() @ w.double().t()
        if rows < rounded_from and rows <= NATIVE_DENSE_ROWS[torch.bfloat16]:
            assert _relative(layer(x), exact) < 1e-6  # fp32 products: the inputs as they are
        else:  # bf16 dot products or a bf16 GEMM: the inputs rounded to bf16
            assert _relative(layer(x), x.bfloat16().double() @ w.double().t()) < 1e-2
            assert _relative(layer(x), exact) > 1e-5


def test_the_lm_head_multiplies_decode_rows_as_a_16_bit_layer_does() -> None:
    """The last stage's vocabulary projection (bf16 on a CPU) takes a decode step's fp32 rows
    through the native kernel, as the 16-bit layers do: logits as the rows give them, fp32."""
    from runtime.model.blocks import LMHead
    from runtime.quant.linear import NATIVE_DENSE_ROWS, quantize_linear

    w = _weight(300, 256).bfloat16()
    head = LMHead(None, w)
    layer = quantize_linear(w, None, 16, 64, compute_dtype=torch.float32, device="cpu")
    assert KERNELS is not None
    rounded_from = native.DOT_FROM_ROWS[torch.bfloat16] if KERNELS.bf16_dot else 10**9
    most = min(rounded_from - 1, NATIVE_DENSE_ROWS[torch.bfloat16])  # rows in fp32 products
    for rows in (1, 2, most):
        x = _inputs(rows, 256).reshape(rows, 1, 256)  # [batch, last position, hidden]
        logits = head(x)
        assert logits.shape == (rows, 1, 300) and logits.dtype == torch.float32
        assert torch.equal(logits, layer(x))
        assert _relative(logits, x.double() @ w.double().t()) < 1e-6
    x = _inputs(64, 256).reshape(1, 64, 256)  # a prefill's every position: torch's bf16 GEMM
    assert _relative(head(x), x.bfloat16().double() @ w.double().t()) < 1e-2
    assert _relative(head(x), x.double() @ w.double().t()) > 1e-5


@pytest.mark.skipif(
    KERNELS is None or not KERNELS.bf16_dot, reason="this build has no bf16 dot products"
)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize(("n", "k"), [(64, 256), (13, 100), (37, 2064), (5, 7)])
def test_dot_products_are_exact_products_of_bf16_rows(m: int, n: int, k: int) -> None:
    assert KERNELS is not None
    x = _inputs(m, k)
    x_bf16 = x.bfloat16().double()
    w = _weight(n, k).bfloat16()
    assert _relative(KERNELS.dot_matmul(x, w), x_bf16 @ w.double().t()) < 1e-6
    q8 = quantize_rtn(_weight(n, k), 8, k, torch.bfloat16)
    y8 = KERNELS.dot_matmul(x, q8.codes.view(torch.int8), q8.scales)
    assert _relative(y8, x_bf16 @ dequantize(q8).double().t()) < 1e-6
    for group, weight_dtype in ((32, torch.bfloat16), (64, torch.float32)):
        if native.int4_shape_supported(k, group):  # groups of 64: the codes as they are
            q4 = quantize_rtn(_weight(n, k), 4, group, torch.bfloat16)
            y4 = KERNELS.dot_matmul(x, q4.codes, q4.scales, q4.zeros, group)
            w4 = dequantize(q4, weight_dtype).double()
            # 128 + q summed, then 128 s times the row's sum taken off: fp32 error near 1e-6
            assert _relative(y4, x_bf16 @ w4.t()) < 1e-5


@pytest.mark.skipif(
    KERNELS is None or not KERNELS.bf16_dot, reason="this build has no bf16 dot products"
)
@pytest.mark.parametrize("m", [5, 7, 8, 9, 16])
@pytest.mark.parametrize("k", [2064, 4200])  # one or two chunks of inputs a pass, and a tail
def test_several_rows_sum_each_row_as_it_would_be_summed_alone(m: int, k: int) -> None:
    """Rows in bf16 dot products against bf16 weights and int8 codes, however many a pass takes
    and in however many passes: every output the bits of that row's product on its own."""
    assert KERNELS is not None
    x, w = _inputs(m, k), _weight(37, k).bfloat16()  # 37 weight rows: groups and a remainder
    q8 = quantize_rtn(_weight(37, k), 8, k, torch.bfloat16)
    for weight in ((w,), (q8.codes.view(torch.int8), q8.scales)):
        together = KERNELS.dot_matmul(x, *weight)
        alone = torch.cat([KERNELS.dot_matmul(x[r : r + 1], *weight) for r in range(m)])
        assert torch.equal(together, alone)


def test_16_bit_fp32_layers_multiply_up_to_8_decode_rows_natively(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runtime.quant.linear import NATIVE_DENSE_ROWS, quantize_linear

    w, bias = _weight(96, 256), torch.linspace(-1, 1, 96)
    layer = quantize_linear(w, bias, 16, 64, compute_dtype=torch.float32, device="cpu")
    assert layer.weight.dtype == torch.float32 and NATIVE_DENSE_ROWS[torch.float32] == 8
    calls: list[int] = []
    kernel = native.NativeKernels.dense_matmul

    def counted(self: native.NativeKernels, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return kernel(self, x, weight)

    monkeypatch.setattr(native.NativeKernels, "dense_matmul", counted)
    for rows in (1, 8, 9):
        x = _inputs(rows, 256)
        assert _relative(layer(x), x.double() @ w.double().t() + bias.double()) < 1e-6
    assert calls == [1, 8]  # 9 rows: torch's fp32 GEMM


@pytest.mark.parametrize(
    ("bsz", "seq", "heads", "kv_heads", "hd", "past"),
    [
        (1, 1, 32, 8, 64, 60),  # a decode step of one sequence, grouped-query heads
        (8, 1, 4, 4, 128, 5),  # a decode micro-batch of 8
        (3, 7, 4, 2, 128, 0),  # a prefill
        (2, 5, 6, 6, 20, 3),  # half a head below 16 lanes
        (1, 9, 2, 1, 34, 1),  # 16 lanes and one more
    ],
)
def test_rope_into_cache_gives_the_bits_of_torchs_rotation_and_cache_write(
    bsz: int, seq: int, heads: int, kv_heads: int, hd: int, past: int
) -> None:
    """Queries and keys rotated, keys and values written at positions past.. of the micro-batch's
    slots (rows of one fused q/k/v output, as the layer hands them): every bit as the torch
    operations give it, the sign of a zero included; nothing else in the cache touched."""
    from runtime.model.blocks import rotate  # the layers' torch operations

    assert KERNELS is not None
    gen = torch.Generator().manual_seed(seq * 100 + hd)
    widths = [heads * hd, kv_heads * hd, kv_heads * hd]
    fused = torch.randn(bsz, seq, sum(widths), generator=gen)
    fused[0, 0, :3], fused[0, 0, 3], fused[-1, -1, hd // 2] = 0.0, -0.0, -0.0
    q, k, v = torch.split(fused, widths, dim=-1)
    cos, sin = torch.randn(2, bsz, seq, hd, generator=gen)
    cache = torch.randn(2, bsz + 2, kv_heads, past + seq + 4, hd, generator=gen)
    expected = cache.clone()

    def heads_first(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.view(bsz, seq, n, hd).transpose(1, 2)

    want_q = rotate(heads_first(q, heads), (cos, sin))
    expected[0, 1 : 1 + bsz, :, past : past + seq] = rotate(heads_first(k, kv_heads), (cos, sin))
    expected[1, 1 : 1 + bsz, :, past : past + seq] = heads_first(v, kv_heads)
    got_q = KERNELS.rope_into_cache(
        q, k, v, (cos, sin), cache[0, 1 : 1 + bsz], cache[1, 1 : 1 + bsz], past
    )
    assert got_q.shape == (bsz, heads, seq, hd)
    assert torch.equal(got_q.contiguous().view(torch.int32), want_q.contiguous().view(torch.int32))
    assert torch.equal(cache.view(torch.int32), expected.view(torch.int32))
