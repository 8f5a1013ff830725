"""pqctl's own CPU kernels for 8-, 4-, 3- and 2-bit layers and 16-bit decode rows: built from
``native_kernels.c`` at first use, called through ctypes on the layers' own storage.

A decode step multiplies a few activation rows by every weight once, so it runs at the speed
its weights stream from memory. torch's weight-only kernels read int8 codes at 13-14 GB/s and
int4 at ~12 GB/s on a 2-core AVX-512 CPU whose memory gives 31 GB/s to a plain sum; these
kernels read the same codes at 20-26 GB/s (int8) and 15-19 GB/s (int4, packed bytes) for one
row, and at twice torch's int8 speed for 8 rows (``bench/quant_kernels.py``: 8 and 4 against
torch's 8t and 4t).

Building needs a C compiler (``$CC``, else ``gcc``, else ``cc``) and an AVX-512 CPU (torch's
``get_cpu_capability()`` reports AVX512). The library lands in ``$PQCTL_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/pqctl/kernels``, else ``~/.cache/pqctl/kernels``, named by a hash of the source,
the flags, the compiler and the CPU, so a change of any of them builds afresh (2-3 s)
and concurrent stage processes never read a half-written file. Where a build is impossible, or
with ``PQCTL_NATIVE_KERNELS=0``, :func:`kernels` is None and the layers take torch's kernels
(``runtime.quant.kernels.choose_kernel_path``); :func:`unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
from torch import Tensor

from runtime.quant.packing import QuantizedTensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_kernels.c")
DISABLE_ENV = "PQCTL_NATIVE_KERNELS"
"""Set to ``0`` to keep torch's kernels."""
CACHE_ENV = "PQCTL_KERNEL_CACHE"
"""Directory for the built library (default: the user's cache, see the module doc)."""
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120.0
DOT_FROM_ROWS: Mapping[torch.dtype, int] = MappingProxyType(
    {torch.int8: 5, torch.uint8: 2, torch.bfloat16: 5}
)
"""Activation rows from which products with weights of that dtype (int8 codes, packed 4-bit codes,
bf16) take the bf16 dot-product form (:meth:`NativeKernels.dot_matmul`) where it is built: rows
rounded to bf16, as torch's bf16 GEMM and its int8 and int4 kernels round them, for twice the
multiply-adds an instruction of fp32 FMAs. Below, a step is bound by memory, not arithmetic, and
the activations keep more precision: fp32, or int8 codes' 15-bit rows (the int16 form of
:meth:`NativeKernels.int8_matmul`, which keeps up with the memory where fp32 products did not:
one row read a 5632 × 2048 weight at 1.28-1.39× their bytes a second, two rows 1.28×; 4 rows
1.03-1.26× the dot form's, and 6-8 rows 0.71-0.94× against 2048 × 5632, whose eight int16 rows
are re-read from L2 for every 2 weight rows). Streaming a 5632 × 2048
weight from memory on a 2-core Zen 4 EPYC, the dot form took (ms, 4 / 8 rows, best of two): int8
0.57 / 0.67 against fp32 products' 0.67 / 1.25; 4-bit (groups of 128) 0.46 / 0.73 against 0.77 /
1.18, and 0.37 against 0.39 at 2 rows; bf16 0.96 / 1.18 against 0.99 / 1.49 (torch's bf16 GEMM:
1.43 / 1.47)."""


class NativeBuildError(Exception):
    """The kernels could not be built or loaded here; the message says why. ``expected`` when
    that is by choice or by design (switched off, not an AVX-512 CPU), not a failure."""

    def __init__(self, msg: str, *, expected: bool = False) -> None:
        super().__init__(msg)
        self.expected = expected


def cache_dir() -> Path:
    """Where built libraries go: ``$PQCTL_KERNEL_CACHE``, else the user's cache directory."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pqctl" / "kernels"


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``gcc``, else ``cc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (Linux), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    first: dict[str, str] = {}
    for key, _, value in (line.partition(":") for line in lines):
        first.setdefault(key.strip(), value.strip())
    return f"{first.get('model name', '')}|{first.get('flags', '')}"


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NativeBuildError(f"cannot run the C compiler {cc!r}: {exc}") from exc
    return done.stdout


def build(directory: Path, cc: str, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile the kernels into ``directory`` (if that build is not there yet); its path.

    Raises:
        NativeBuildError: the compiler failed (its message is included) or timed out.
    """
    flags = (*FLAGS, *extra_flags)
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), _compiler_version(cc).encode()):
        key.update(part)
    key.update(_cpu_identity().encode())
    target = directory / f"pqctl_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{target.name}.{os.getpid()}.partial"
    command = [cc, *flags, "-o", str(partial), str(SOURCE)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        partial.unlink(missing_ok=True)
        raise NativeBuildError(f"{' '.join(command)} did not finish: {exc}") from exc
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        detail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise NativeBuildError(f"{' '.join(command)} failed: {' / '.join(detail)}")
    os.replace(partial, target)  # atomic: a concurrent reader sees no file or the whole one
    return target


class NativeKernels:
    """The loaded library: products of fp32 activations with packed 8-, 4-, 3- and 2-bit weights and
    with 16-bit ones (from :data:`DOT_FROM_ROWS` rows in bf16 dot products where the CPU has them),
    and the dequantization of packed weights to bf16."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        lib.pq_int8_matmul.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, c_int]
        lib.pq_int8_matmul.restype = None
        lib.pq_int4_matmul.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, c_int]
        lib.pq_int4_matmul.restype = c_int
        lib.pq_int4_row_form.restype = ctypes.c_char_p
        lib.pq_dense_matmul.argtypes = [ptr, i64, i64, ptr, c_int, ptr, i64, c_int]
        lib.pq_dense_matmul.restype = None
        lib.pq_int8_dequantize_bf16.argtypes = [ptr, ptr, i64, i64, i64, ptr, c_int]
        lib.pq_int8_dequantize_bf16.restype = None
        lib.pq_int4_dequantize_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ptr, c_int]
        lib.pq_int4_dequantize_bf16.restype = None
        lib.pq_has_bf16_dot.restype = c_int
        lib.pq_has_int8_wide.restype = c_int
        lib.pq_int8_wide_matmul.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, c_int]
        lib.pq_int8_wide_matmul.restype = c_int
        self._lib = lib
        self.int4_row_form = lib.pq_int4_row_form().decode()
        """``bf16-dot`` (one row rounded to bf16, vdpbf16ps) or ``fp32``."""
        self.bf16_dot = bool(lib.pq_has_bf16_dot())
        """Whether :meth:`dot_matmul` is built (a CPU with avx512_bf16)."""
        self.int8_wide = bool(lib.pq_has_int8_wide())
        """Whether :meth:`int8_matmul` holds the rows as int16 (a CPU with avx512_vnni)."""
        lib.pq_has_stream_dot.restype = c_int
        self.stream_dot = bool(lib.pq_has_stream_dot())
        """Whether :meth:`stream_matmul` is built (a CPU with avx512_bf16 and avx512_vbmi)."""
        if self.stream_dot:
            lib.pq_stream_matmul.argtypes = [
                ptr, i64, i64, ptr, ptr, ptr, c_int, i64, c_int, ptr, i64, c_int,
            ]  # fmt: skip
            lib.pq_stream_matmul.restype = c_int
            lib.pq_stream_dequantize_bf16.argtypes = [
                ptr, ptr, ptr, c_int, i64, c_int, i64, i64, i64, ptr, c_int,
            ]  # fmt: skip
            lib.pq_stream_dequantize_bf16.restype = None
        if self.bf16_dot:
            lib.pq_dot_matmul.argtypes = [c_int, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, i64, c_int]
            lib.pq_dot_matmul.restype = c_int
        lib.pq_rope_into_cache.argtypes = [
            ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64,
            i64, c_int,
        ]  # fmt: skip
        lib.pq_rope_into_cache.restype = None
        lib.pq_dot_peak.argtypes = [i64, c_int]
        lib.pq_dot_peak.restype = ctypes.c_float

    def dot_peak_per_s(self, threads: int | None = None, rounds: int = 1 << 20) -> float:
        """Multiply-adds a second that ``threads`` threads (default torch's) sustain in bf16
        dot products on registers alone, the best of three timings: the ceiling of
        :meth:`dot_matmul` where no memory is read. Needs :attr:`bf16_dot`."""
        assert self.bf16_dot
        threads = threads or torch.get_num_threads()
        self._lib.pq_dot_peak(rounds // 16, threads)  # wake the threads
        best = math.inf
        for _ in range(3):
            start = time.perf_counter()
            self._lib.pq_dot_peak(rounds, threads)
            best = min(best, time.perf_counter() - start)
        return rounds * 24 * 32 * threads / best  # 24 instructions a round, 32 products each

    def int8_matmul(self, x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
        """``x`` [M, K] times (int8 ``codes`` [N, K] × bf16 ``scales`` [N]) transposed: fp32
        [M, N]. Below :data:`DOT_FROM_ROWS` rows, or where the dot form is not built, and where
        :attr:`int8_wide` is, the rows are held as int16 with a power-of-two scale per
        :data:`WIDE_BLOCK` inputs (:func:`int16_rows` gives the values they stand for) and met by
        the codes in exact integer products, summed exactly within a block (vpdpwssd): half the
        instructions of fp32 FMAs for one row, 15 bits of each input where the dot form keeps 8.
        Rows with a value that is not finite take the fp32 form, so that it reaches the output."""
        if self._dot_rows(x, codes):
            return self.dot_matmul(x, codes, scales)
        if self.int8_wide and (y := self.int8_wide_matmul(x, codes, scales)) is not None:
            return y
        x, y = _operands(x, codes.shape[0])
        rows, inputs = x.shape
        outputs = y.shape[1]
        _int8_shapes(x, codes, scales)
        self._lib.pq_int8_matmul(
            x.data_ptr(), rows, inputs, codes.data_ptr(), scales.data_ptr(), y.data_ptr(),
            outputs, torch.get_num_threads(),
        )  # fmt: skip
        return y

    def int8_wide_matmul(self, x: Tensor, codes: Tensor, scales: Tensor) -> Tensor | None:
        """:meth:`int8_matmul` in the int16 form, however many rows (any number where the bf16
        dot form is not built); None where ``x`` holds a value that is not finite. Needs
        :attr:`int8_wide`."""
        assert self.int8_wide
        x, y = _operands(x, codes.shape[0])
        _int8_shapes(x, codes, scales)
        status = self._lib.pq_int8_wide_matmul(
            x.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), scales.data_ptr(),
            y.data_ptr(), y.shape[1], torch.get_num_threads(),
        )  # fmt: skip
        if status == 1:
            return None
        _check(status, x)
        return y

    def dense_matmul(self, x: Tensor, weight: Tensor) -> Tensor:
        """``x`` [M, K] times a 16-bit layer's ``weight`` [N, K] (bf16 or fp32) transposed, with
        fp32 products and sums (a bf16 GEMM would round ``x`` to bf16 first): fp32 [M, N]."""
        if self._dot_rows(x, weight):
            return self.dot_matmul(x, weight)
        x, y = _operands(x, weight.shape[0])
        rows, inputs = x.shape
        outputs = y.shape[1]
        assert weight.dtype in (torch.bfloat16, torch.float32)
        assert weight.shape == (outputs, inputs) and weight.is_contiguous()
        self._lib.pq_dense_matmul(
            x.data_ptr(), rows, inputs, weight.data_ptr(), int(weight.dtype == torch.float32),
            y.data_ptr(), outputs, torch.get_num_threads(),
        )  # fmt: skip
        return y

    def int4_matmul(
        self, x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int
    ) -> Tensor:
        """``x`` [M, K] times the 4-bit weight (packed ``codes`` [N, K/2], bf16 ``scales`` and
        ``zeros`` [N, K/group_size]) transposed: fp32 [M, N]. Needs ``group_size`` a multiple of
        32 dividing K (:func:`int4_shape_supported`)."""
        if self._dot_rows(x, codes):
            return self.dot_matmul(x, codes, scales, zeros, group_size)
        x, y = _operands(x, codes.shape[0])
        rows, inputs = x.shape
        outputs = y.shape[1]
        assert int4_shape_supported(inputs, group_size)
        assert codes.dtype == torch.uint8 and codes.shape == (outputs, inputs // 2)
        groups = (outputs, inputs // group_size)
        for t in (scales, zeros):
            assert t.dtype == torch.bfloat16 and t.shape == groups and t.is_contiguous()
        assert codes.is_contiguous()
        status = self._lib.pq_int4_matmul(
            x.data_ptr(), rows, inputs, codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
            group_size, y.data_ptr(), outputs, torch.get_num_threads(),
        )  # fmt: skip
        _check(status, x)
        return y

    def _dot_rows(self, x: Tensor, weight: Tensor) -> bool:
        """Whether ``x`` [M, K] meets ``weight`` in bf16 dot products (:data:`DOT_FROM_ROWS`)."""
        return self.bf16_dot and x.shape[0] >= DOT_FROM_ROWS.get(weight.dtype, x.shape[0] + 1)

    def dot_matmul(
        self,
        x: Tensor,
        weight: Tensor,
        scales: Tensor | None = None,
        zeros: Tensor | None = None,
        group_size: int = 0,
    ) -> Tensor:
        """``x`` [M, K] rounded to bf16 times a weight transposed, in bf16 dot products (exact
        products, fp32 sums): a bf16 ``weight`` [N, K]; int8 codes [N, K] with bf16 row
        ``scales``; or packed 4-bit codes [N, K/2] with bf16 ``scales`` and ``zeros`` per group of
        ``group_size`` (groups of a multiple of 64 multiply the codes as they are and scale the
        sums, the weight unrounded; others the weight dequantized to bf16 as
        :func:`runtime.quant.packing.dequantize` gives it). fp32 [M, N]. Needs
        :attr:`bf16_dot`."""
        assert self.bf16_dot
        x, y = _operands(x, weight.shape[0])
        rows, inputs = x.shape
        outputs = y.shape[1]
        tensors = [t for t in (weight, scales, zeros) if t is not None]
        assert all(t.is_contiguous() for t in tensors)
        if weight.dtype == torch.bfloat16:
            kind = 2
            assert weight.shape == (outputs, inputs)
        elif weight.dtype == torch.int8:
            kind = 1
            assert weight.shape == (outputs, inputs) and scales is not None
            assert scales.dtype == torch.bfloat16 and scales.shape == (outputs,)
        else:
            kind = 8
            assert weight.dtype == torch.uint8 and weight.shape == (outputs, inputs // 2)
            assert int4_shape_supported(inputs, group_size) and len(tensors) == 3
            for t in tensors[1:]:
                assert t.dtype == torch.bfloat16 and t.shape == (outputs, inputs // group_size)
        status = self._lib.pq_dot_matmul(
            kind, x.data_ptr(), rows, inputs, weight.data_ptr(),
            None if scales is None else scales.data_ptr(),
            None if zeros is None else zeros.data_ptr(), group_size, y.data_ptr(), outputs,
            torch.get_num_threads(),
        )  # fmt: skip
        _check(status, x)
        return y

    def stream_matmul(
        self, x: Tensor, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int
    ) -> Tensor:
        """``x`` [M, K] rounded to bf16 times the ``bits``-bit weight (2, 3 or 4: packed ``codes``
        [N, K * bits / 8] as :mod:`runtime.quant.packing` stores them, ``scales`` and ``zeros`` [N,
        K / group_size], both fp16 or both bf16) transposed, read as stored: each code enters a bf16
        dot product as the exact value 2^bits + q, and each group's sum is scaled and offset (the
        weight unrounded). fp32 [M, N]. Needs :attr:`stream_dot` and :func:`int4_shape_supported`'s
        groups."""
        assert self.stream_dot and bits in (2, 3, 4)
        x, y = _operands(x, codes.shape[0])
        rows, inputs = x.shape
        outputs = y.shape[1]
        assert int4_shape_supported(inputs, group_size)
        assert codes.dtype == torch.uint8 and codes.shape == (outputs, inputs * bits // 8)
        assert scales.dtype in _SCALE_DTYPES and zeros.dtype == scales.dtype
        for t in (scales, zeros):
            assert t.shape == (outputs, inputs // group_size)
        assert all(t.is_contiguous() for t in (codes, scales, zeros))
        status = self._lib.pq_stream_matmul(
            x.data_ptr(), rows, inputs, codes.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
            int(scales.dtype == torch.float16), group_size, bits, y.data_ptr(), outputs,
            torch.get_num_threads(),
        )  # fmt: skip
        _check(status, x)
        return y

    def rope_into_cache(
        self, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], keys: Tensor,
        values: Tensor, past: int,
    ) -> Tensor:  # fmt: skip
        """A step's rotary embedding and cache write in one call, fp32 throughout: ``q``
        [bsz, seq, heads × hd], ``k`` and ``v`` [bsz, seq, kv_heads × hd] (views of one fused
        projection will do), ``rope`` (cos, sin) [bsz, seq, hd]. The keys, rotated, and the values
        go into ``keys`` and ``values`` [bsz, kv_heads, max_len, hd] (the micro-batch's slots of
        one layer's cache) at positions ``past``..; the rotated queries [bsz, heads, seq, hd]
        come back. Each element is ``x * cos + rotate_half(x) * sin`` with every product and the
        sum rounded in fp32, as torch's elementwise operations compute it: the same bits."""
        cos, sin = (t.contiguous() for t in rope)
        bsz, seq, width = q.shape
        slots, kv_heads, max_len, hd = keys.shape
        heads = width // hd
        (q, q_row), (k, k_row), (v, v_row) = (_rows(t) for t in (q, k, v))
        assert slots == bsz and past + seq <= max_len and heads * hd == width
        assert k.shape == v.shape == (bsz, seq, kv_heads * hd) and values.shape == keys.shape
        assert cos.shape == sin.shape == (bsz, seq, hd) and hd % 2 == 0
        for t in (q, k, v, cos, sin, keys, values):
            assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert keys.is_contiguous() and values.is_contiguous()
        out = torch.empty(bsz, seq, heads, hd)
        self._lib.pq_rope_into_cache(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), bsz, seq, q_row, k_row, v_row, heads,
            kv_heads, hd, cos.data_ptr(), sin.data_ptr(), out.data_ptr(),
            keys.data_ptr(), values.data_ptr(), max_len, past, torch.get_num_threads(),
        )  # fmt: skip
        return out.transpose(1, 2)

    def dequantize_bf16(self, q: QuantizedTensor, start: int, stop: int, out: Tensor) -> None:
        """Rows [start, stop) of the 8-, 4-, 3- or 2-bit weight ``q`` into ``out``
        [stop - start, in] bf16: computed in fp32 like :func:`runtime.quant.packing.dequantize`
        and rounded once (:func:`dequantize_supported` says which weights it takes)."""
        assert dequantize_supported(q) and 0 <= start <= stop <= q.shape[0]
        inputs = q.shape[1]
        assert out.dtype == torch.bfloat16 and out.shape == (stop - start, inputs)
        assert out.is_contiguous()
        threads = torch.get_num_threads()
        if q.bits == 8:
            self._lib.pq_int8_dequantize_bf16(
                q.codes.data_ptr(), q.scales.data_ptr(), inputs, start, stop, out.data_ptr(),
                threads,
            )  # fmt: skip
            return
        assert q.zeros is not None
        if q.bits in (2, 3):
            self._lib.pq_stream_dequantize_bf16(
                q.codes.data_ptr(), q.scales.data_ptr(), q.zeros.data_ptr(),
                int(q.scales.dtype == torch.float16), q.group_size, q.bits, inputs, start, stop,
                out.data_ptr(), threads,
            )  # fmt: skip
            return
        self._lib.pq_int4_dequantize_bf16(
            q.codes.data_ptr(), q.scales.data_ptr(), q.zeros.data_ptr(), q.group_size, inputs,
            start, stop, out.data_ptr(), threads,
        )  # fmt: skip


def _check(status: int, x: Tensor) -> None:
    """Raise for a product's non-zero status: its scratch copy of ``x`` could not be allocated."""
    if status != 0:
        rows, inputs = x.shape
        raise MemoryError(f"no memory for a {rows}×{inputs} activation copy")


def _rows(t: Tensor) -> tuple[Tensor, int]:
    """``t`` [bsz, seq, width] with entries adjacent and rows evenly spaced (a copy where they are
    not), and the spacing: row r = b × seq + s starts ``r`` spacings in."""
    bsz, seq, _ = t.shape
    if t.stride(2) == 1:
        if seq == 1:
            return t, t.stride(0)
        if bsz == 1 or t.stride(0) == seq * t.stride(1):
            return t, t.stride(1)
    t = t.contiguous()
    return t, t.shape[2]


def _int8_shapes(x: Tensor, codes: Tensor, scales: Tensor) -> None:
    outputs, inputs = codes.shape
    assert codes.dtype == torch.int8 and inputs == x.shape[1]
    assert scales.dtype == torch.bfloat16 and scales.shape == (outputs,)
    assert codes.is_contiguous() and scales.is_contiguous()


WIDE_BLOCK = 512
"""Inputs of an activation row that share one power-of-two scale in the int16 form."""


def int16_rows(x: Tensor) -> Tensor:
    """The fp32 values the int16 form of :meth:`NativeKernels.int8_matmul` multiplies for rows
    ``x`` [M, K] (finite): each block of :data:`WIDE_BLOCK` inputs whose largest magnitude is
    f·2^e (f in [0.5, 1)) rounded to multiples of 2^(e - 15), ties to even, at most 32767 of them
    (an all-zero block stays zero)."""
    x = x.to(torch.float32)
    out = torch.empty_like(x)
    for k0 in range(0, x.shape[1], WIDE_BLOCK):
        block = x[:, k0 : k0 + WIDE_BLOCK]
        largest = block.abs().amax(dim=1, keepdim=True)
        e = torch.where(largest > 0, torch.frexp(largest).exponent, 15)
        steps = torch.round(torch.ldexp(block, 15 - e)).clamp(-32768, 32767)
        out[:, k0 : k0 + WIDE_BLOCK] = torch.ldexp(steps, e - 15)
    return out


def _operands(x: Tensor, outputs: int) -> tuple[Tensor, Tensor]:
    """``x`` [M, K] as the kernels read it (fp32, contiguous) and an fp32 [M, outputs] result."""
    x = x.to(torch.float32).contiguous()
    return x, torch.empty(x.shape[0], outputs, dtype=torch.float32)


def dequantize_supported(q: QuantizedTensor) -> bool:
    """Whether :meth:`NativeKernels.dequantize_bf16` takes ``q``: 8 bits, or 4 bits in groups the
    4-bit kernel takes, with bf16 scales; or, where :attr:`NativeKernels.stream_dot` is built, 2
    and 3 bits in those groups with fp16 or bf16 scales; on the CPU."""
    grouped = q.bits == 4 or (q.bits in (2, 3) and _stream_dot_built())
    shaped = q.bits == 8 or (grouped and int4_shape_supported(q.shape[1], q.group_size))
    scales = _SCALE_DTYPES if q.bits in (2, 3) else (torch.bfloat16,)
    tensors = (q.codes, q.scales) if q.zeros is None else (q.codes, q.scales, q.zeros)
    return (
        shaped
        and q.scales.dtype in scales
        and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    )


_SCALE_DTYPES = (torch.float16, torch.bfloat16)
"""Scale and zero dtypes the 2- and 3-bit kernels read."""


def _stream_dot_built() -> bool:
    loaded = kernels()
    return loaded is not None and loaded.stream_dot


def int4_shape_supported(in_features: int, group_size: int) -> bool:
    """Whether the 4-bit kernel takes a layer: groups of a multiple of 32 inputs filling rows."""
    return group_size % 32 == 0 and in_features % group_size == 0


def _load() -> NativeKernels:
    if os.environ.get(DISABLE_ENV, "1").strip() == "0":
        raise NativeBuildError(f"{DISABLE_ENV}=0 turns them off", expected=True)
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        raise NativeBuildError(
            f"they need an AVX-512 CPU; torch reports {capability}", expected=True
        )
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler: install gcc, or set CC")
    try:
        return NativeKernels(build(cache_dir(), cc))
    except OSError as exc:
        raise NativeBuildError(f"cannot build or load them: {exc}") from exc


@functools.cache
def _loaded() -> NativeKernels | NativeBuildError:
    try:
        return _load()
    except NativeBuildError as exc:
        level = logging.INFO if exc.expected else logging.WARNING
        log.log(level, "pqctl's native CPU kernels are off (%s); using torch's kernels", exc)
        return exc


def kernels() -> NativeKernels | None:
    """The native kernels of this process (built or loaded on the first call), or None."""
    loaded = _loaded()
    return loaded if isinstance(loaded, NativeKernels) else None


def unavailable_reason() -> str | None:
    """Why :func:`kernels` is None, or None when they are loaded."""
    loaded = _loaded()
    return str(loaded) if isinstance(loaded, NativeBuildError) else None
