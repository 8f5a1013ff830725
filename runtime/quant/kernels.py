"""Compute paths of quantized linear layers per platform: which kernel a layer of a given shape,
precision and device runs, the probes behind that choice, and the weight layouts the kernels read.

Compute path per precision (``kernel_path``), chosen by :func:`choose_kernel_path`:

==== ======================= ============================== ===================================
bits CPU                     CUDA (untested here)           fallback
==== ======================= ============================== ===================================
16   ``dense``               ``dense``                      -
8    ``native-int8``         ``int8pack_mm`` if it runs     ``int8pack_mm`` (CPU), else
                                                            ``dequant-per-call``
4    ``native-int4``         ``int4pack_mm_cuda`` (sm ≥ 80) ``int4pack_mm_cpu`` (CPU), else
                                                            ``dequant-per-call``
3, 2 ``native-int3``,        ``dequant-per-call``           ``dequant-per-call``
     ``native-int2``
==== ======================= ============================== ===================================

The ``native-*`` paths are pqctl's own AVX-512 kernels (:mod:`runtime.quant.native`), reading our
packed codes as they are; where they are not built (no C compiler, another CPU, or
``PQCTL_NATIVE_KERNELS=0``), the CPU takes torch's kernels. ``native-int4`` needs ``group_size`` a
multiple of 32 dividing ``in_features``; ``native-int3`` and ``native-int2`` the same, and a CPU
with avx512_bf16 and avx512_vbmi (``NativeKernels.stream_dot``): they read packing's bit stream as
stored. torch's int4 kernels need ``group_size`` in {32, 64, 128, 256} dividing ``in_features`` and
``out_features`` divisible by 16 (CPU) or 8 (CUDA); torch's CPU int8 kernel needs ``in_features``
divisible by 16 (torch 2.13 returns garbage or segfaults otherwise); all of torch's take bf16
activations. Their int4 packed tensor (a kernel-specific layout, ``out*in/2`` bytes) replaces ours
as the resident copy. Scales are bf16 for the 8- and 4-bit kernels and fp16 for the 2- and 3-bit
ones and dequant-per-call, which unpacks the codes into a dense copy in the matmul dtype on every
call (rows in chunks, so the scratch beyond that copy is a few MiB:
``planner.cost_model.dequant_scratch_bytes``) and runs ``F.linear``.

16-bit on CPU, measured (2 threads, AVX-512 with avx512_bf16, torch 2.13, one 4096×4096 linear,
fp32 activations, ms, median of 3-9 calls on an otherwise idle CPU):

============ ===== ===== ===== ===== ===== ===== ============================================
rows         1     4     8     128   256   512   note
============ ===== ===== ===== ===== ===== ===== ============================================
fp32 weights 3.9   7.1   6.0   26.8  52.0  98.6  4 bytes/weight
bf16 weights 1.5   1.4   1.7   10.8  20.4  45.0  2 bytes/weight, x cast to bf16 and back
bf16 upcast  23.8  25.3  24.2  45.8  69.6  118   2 bytes/weight, fp32 copy made per call
============ ===== ===== ===== ===== ===== ===== ============================================

Decision: 16 bits never rounds the checkpoint's weights. Where the CPU has native bf16 dot products
(avx512_bf16 or AMX), a checkpoint stored in bf16 keeps its bf16 weights with activations cast to
bf16 for the matmul: 2.2-5× faster than fp32 at every row count and half the memory, for a bf16
rounding of the activations (~3e-3 relative output error, as in torch's int8/int4 kernels). Up to 4
rows (decode) skip that rounding where the native kernels are built: they multiply fp32 activations
by the bf16 weights in fp32 (``linear.NATIVE_DENSE_ROWS``); 5-8 rows take the native bf16
dot-product form, rounded as the GEMM rounds them, where the CPU has no AMX. An fp32 or fp16
checkpoint's 16-bit layers keep fp32 weights on a CPU (fp16 is not native there; bf16 would round
them), so their greedy output equals transformers' fp32 run of the same checkpoint token for token.
Elsewhere bf16 GEMM is emulated (278 ms at 128 rows in the reference notes) and 16 bits keeps fp32
weights. The planner counts 16-bit weights with ``planner.cost_model.weight16_bytes`` (the same
rule, with ``planner.local_host.cpu_has_native_bf16`` reading the same flags from
``/proc/cpuinfo``). ``impl="reference"`` keeps 16-bit weights in the compute dtype (exact).
Dequant-per-call layers dequantize into bf16 on such a CPU: into bf16 a 4096×4096 layer takes ~15-22
ms (2-4 bit; fp32: ~25-38 ms), ~0.55-0.75 G weights/s.

One Llama-7B-shaped layer's seven linears with bf16 weights (``bench/quant_kernels.py``, same
CPU, a Xeon with AMX, before the bf16 dot-product form and the 3- and 2-bit kernels; ratio to 16
bits; 16 bits took 16.7 ms at 1 row and 150 ms at 512 rows; ``t``: torch's kernels in the same
run):

======= ================ ===== ===== ===== ===== ===== ======================
bits    path             x1    x4    x8    x128  x512  resident vs fp16
======= ================ ===== ===== ===== ===== ===== ======================
8       native-int8      0.57  0.54  0.77  1.14  1.77  0.500
8t      int8pack_mm      0.68  0.59  1.05  1.14  1.75  0.500
4       native-int4      0.39  0.56  0.98  1.07  1.75  0.266
4t      int4pack_mm_cpu  0.51  0.50  0.91  4.47  8.68  0.266
3       dequant          28.4  21.0  18.3  7.16  3.96  0.203
2       dequant          21.3  14.0  13.0  5.24  3.04  0.141
======= ================ ===== ===== ===== ===== ===== ======================

On a 2-core AVX2 CPU without native bf16 (16 bits = fp32 weights), the same bench measured
8-bit at 0.36 / 0.20 / 0.30 (x1 / x4 / x8) and, through the int8 kernel, 5.7 / 7.5 at x128 /
x512; with prefill from 64 rows on fp32 GEMM over dequantized blocks, 0.99 / 1.10 (q, gate and
down only). 4-bit there: 0.43 / 0.22 / 0.29 / 1.44 / 2.09.

On a 2-core Zen 4 EPYC (avx512_bf16 and avx512_vbmi, no AMX), with the bf16 dot-product form and
the 3- and 2-bit kernels (x1 / x4 / x8 / x128 / x512): native-int8 0.54 / 0.50 / 0.61 / 1.07 /
1.06, native-int4 0.36 / 0.46 / 0.70 / 1.09 / 1.09, native-int3 0.37 / 0.50 / 0.94 / 1.15 / 1.08,
native-int2 0.29 / 0.48 / 0.91 / 1.14 / 1.09; torch's int4 kernel 0.36 / 0.52 / 0.95 / 2.31 / 2.49.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import torch
from torch import Tensor

from runtime.quant import native
from runtime.quant.packing import QuantizedTensor, dequantize_rows_into, unpack_words

KernelPath = Literal[
    "dense",
    "native-int8",
    "native-int4",
    "native-int3",
    "native-int2",
    "int8pack_mm",
    "int4pack_mm_cpu",
    "int4pack_mm_cuda",
    "dequant-per-call",
]
Impl = Literal["auto", "torch", "reference"]
"""``auto``: the fastest path here; ``torch``: the same without pqctl's native kernels (torch's
own); ``reference``: dequantize per call into the compute dtype (same values, for tests)."""
TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)
"""Group sizes the int4 kernels accept."""
INT4_CPU_TILE_ROWS = 64
"""Output rows the CPU int4 layout packs together: tiles of 64 rows (and the last, shorter one)
convert independently, so a weight is converted a block of tiles at a time."""
INT4_CPU_BLOCK_ELEMENTS = 1 << 20
"""Codes unpacked to int32 per step of the conversion to the CPU int4 layout (at least one
tile): bounds that int32 copy to ~4 MiB."""


# --------------------------------------------------------------------------- choosing a path


def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or AMX); else bf16 is emulated.

    ``planner.local_host.cpu_has_native_bf16`` applies the same rule to ``/proc/cpuinfo``.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def dense_weight_dtype(
    compute_dtype: torch.dtype, device: torch.device, stored: torch.dtype | None = None
) -> torch.dtype:
    """Dtype of 16-bit weights (stored in ``stored`` in the checkpoint) and, with ``stored``
    None, of per-call dequantized copies on ``device``.

    bf16 on a CPU with native bf16 dot products when the model computes in fp32 (the measured
    decision in the module docstring), for a dequantized copy or a weight the checkpoint itself
    stores in bf16; the compute dtype everywhere else. So 16 bits never rounds a checkpoint's
    weights on a CPU: an fp32 or fp16 checkpoint's 16-bit layers compute in fp32, exactly as
    transformers computes that checkpoint there.
    """
    if (
        device.type == "cpu"
        and compute_dtype == torch.float32
        and stored in (None, torch.bfloat16)
        and _cpu_has_native_bf16()
    ):
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
    in_features: int, out_features: int, group_size: int, device: torch.device, impl: Impl
) -> KernelPath:
    if (
        impl == "auto"
        and device.type == "cpu"
        and native.int4_shape_supported(in_features, group_size)
        and native.kernels() is not None
    ):
        return "native-int4"
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

    ``impl="reference"`` always dequantizes per call (16 bits stays dense). On a CPU, 8 and 4 bits
    take pqctl's native kernels where they are built (:mod:`runtime.quant.native`) and ``impl`` is
    ``auto``, else torch's.
    The CPU int8 kernel of torch needs ``in_features % 16 == 0``: torch 2.13 returns garbage or
    crashes otherwise.
    """
    if bits == 16:
        return "dense"
    if impl == "reference":
        return "dequant-per-call"
    if bits == 8 and impl == "auto" and device.type == "cpu" and native.kernels() is not None:
        return "native-int8"
    if bits == 8 and in_features % 16 == 0 and _int8_kernel_runs(device):
        return "int8pack_mm"
    if bits == 4:
        return _int4_kernel_path(in_features, out_features, group_size, device, impl)
    kernels = native.kernels() if impl == "auto" and device.type == "cpu" else None
    if (
        kernels is not None
        and kernels.stream_dot
        and native.int4_shape_supported(in_features, group_size)
    ):
        return "native-int3" if bits == 3 else "native-int2"
    return "dequant-per-call"


DENSE_ROWS: Mapping[KernelPath, int] = MappingProxyType(
    {"int8pack_mm": 64, "native-int8": 32, "native-int4": 16, "native-int3": 32, "native-int2": 32}
)
"""From this many activation rows (prefill), a layer on one of these paths (on a CPU) dequantizes
its codes a block at a time into its dense weight dtype (bf16 with native bf16, else fp32) and
runs that GEMM instead of its kernel. torch's int8 kernel is 2.7-7.5× slower than 16-bit GEMM
at 128-512 rows (module docstring); the native kernels read the weight once per 8 rows, and
against dequantizing (natively) plus GEMM on a 5632 × 2048 layer they took, in ms:

====== ==== ==== ==== ==== ==== ==== =====
rows   8    16   24   32   48   64   128
====== ==== ==== ==== ==== ==== ==== =====
int8   1.23 2.37 3.23 3.96 5.76 7.42 14.4
dense  3.31 3.46 3.59 3.53 4.37 4.83 5.66
int4   0.98 2.65 2.86 3.80 5.69 7.64 15.2
dense  2.08 2.07 2.16 2.31 3.05 3.38 4.25
====== ==== ==== ==== ==== ==== ==== =====

The 3- and 2-bit kernels against natively dequantizing to bf16 plus GEMM, same layer, on a Zen 4
EPYC (ms, rows 8 / 16 / 24 / 32 / 64 / 128): 3-bit 1.14 / 2.27 / 3.33 / 4.98 / 8.86 / 19.9 against
3.42 / 3.40 / 5.98 / 3.87 / 5.10 / 8.79; 2-bit alike. (Dequantizing with torch instead took
40-60 ms at any number of rows.)
"""
DENSE_BLOCK_ELEMENTS = 1 << 21
"""Weights dequantized per block on that path: at most 8 MiB of fp32 scratch per layer."""


def dense_block_matmul(x: Tensor, q: QuantizedTensor, dtype: torch.dtype) -> Tensor:
    """``x`` [M, in] times the weight of ``q`` transposed, by GEMM in ``dtype``: [M, out].

    Output rows of the weight are dequantized ``DENSE_BLOCK_ELEMENTS`` at a time into one reused
    block (by the native kernels where they take it), whose product lands directly in its rows
    of the transposed result.
    """
    out_features, in_features = q.shape
    device = q.codes.device
    fast = native.kernels() if dtype == torch.bfloat16 and native.dequantize_supported(q) else None
    rows = max(1, min(out_features, DENSE_BLOCK_ELEMENTS // in_features))
    block = torch.empty(rows, in_features, dtype=dtype, device=device)
    result_t = torch.empty(out_features, x.shape[0], dtype=dtype, device=device)
    xt = x.to(dtype).t()
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        w = block[: stop - start]
        if fast is not None:
            fast.dequantize_bf16(q, start, stop, w)
        else:
            dequantize_rows_into(q, start, stop, w)
        torch.matmul(w, xt, out=result_t[start:stop])
    return result_t.t()


def scale_dtype_for(path: KernelPath) -> torch.dtype:
    """bf16 where a kernel reads only bf16 scales (8 and 4 bits, torch's kernels and ours), fp16
    (3 more mantissa bits) otherwise: 2- and 3-bit scales stay fp16 on every path (bf16 ones moved
    bard-tiny's 2-bit perplexity by 0.1 %)."""
    bf16_only = ("native-int8", "native-int4", "int8pack_mm", "int4pack_mm_cpu", "int4pack_mm_cuda")
    return torch.bfloat16 if path in bf16_only else torch.float16


# --------------------------------------------------------------------------- kernel layouts


def _tinygemm_scales_and_zeros(q: QuantizedTensor) -> Tensor:
    """[groups, out, 2] bf16: tinygemm's interleaved (scale, zero) per group and output row."""
    assert q.zeros is not None
    return torch.stack([q.scales.t(), q.zeros.t()], dim=-1).to(torch.bfloat16).contiguous()


def _int4_cpu_weight(q: QuantizedTensor, device: torch.device) -> Tensor:
    """uint8 [out, in / 2]: the CPU int4 kernel's layout, converted from int32 codes a block of
    whole tiles at a time so the int32 copy stays a few MiB."""
    rows, cols = q.shape
    packed = q.codes.to(device)
    out = torch.empty(rows, cols // 2, dtype=torch.uint8, device=device)
    tiles = max(1, INT4_CPU_BLOCK_ELEMENTS // (cols * INT4_CPU_TILE_ROWS))
    step = tiles * INT4_CPU_TILE_ROWS
    for start in range(0, rows, step):  # blocks of tiles, not elements
        stop = min(start + step, rows)
        codes = unpack_words(packed[start:stop], 4, cols)[:, :cols]  # [block, in] int32
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


def kernel_buffers(
    q: QuantizedTensor, path: KernelPath, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(qweight, scales, zeros) the layer keeps for ``path``."""
    if path in ("int8pack_mm", "native-int8"):
        return q.codes.view(torch.int8).to(device), q.scales.to(device), None
    if path in ("int4pack_mm_cpu", "int4pack_mm_cuda"):
        scales = _tinygemm_scales_and_zeros(q).to(device)
        return _int4_kernel_weight(q, path, device), scales, None
    zeros = None if q.zeros is None else q.zeros.to(device)
    return q.codes.to(device), q.scales.to(device), zeros
