"""Weight-only quantized linear layers with real packed storage, one per plan precision.

A plan precision maps to a module through :data:`QUANTIZERS` (:func:`quantize_linear`):
:class:`DenseLinear` holds a 16-bit layer unquantized, :class:`QuantLinear` a 2, 3, 4 or 8-bit
one over the storage of :mod:`runtime.quant.packing`, running the kernel
:mod:`runtime.quant.kernels` picks for its shape and device (the measurements behind those
choices are there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.errors import QuantizationError
from runtime.quant import native
from runtime.quant.kernels import (
    DENSE_ROWS,
    Impl,
    KernelPath,
    choose_kernel_path,
    dense_block_matmul,
    dense_weight_dtype,
    kernel_buffers,
    scale_dtype_for,
)
from runtime.quant.packing import (
    QuantizedTensor,
    affine_into,
    check_bits,
    dequantize,
    quantize_rtn,
)


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


def _module_bytes(module: nn.Module) -> int:
    tensors = [*module.buffers(), *module.parameters()]
    return sum(t.nbytes for t in tensors)


NATIVE_DENSE_ROWS: Mapping[torch.dtype, int] = MappingProxyType(
    {
        torch.float32: 8,
        torch.bfloat16: 4 if getattr(torch.cpu, "_is_amx_tile_supported", bool)() else 8,
    }
)
"""Activation rows up to which a 16-bit layer with weights in that dtype uses the native kernel:
one pass over the weight (8 rows); bf16 up to 4 where torch's bf16 GEMM runs on AMX tiles (at 8
rows, on a Xeon, it served a batch-8 decode step of the ``--large`` bench in 111 ms against 124
ms through the native fp32-product kernel). From ``native.DOT_FROM_ROWS`` rows, bf16 weights take
the bf16 dot-product form, which rounds the rows to bf16 as torch's GEMM does (on a Zen 4 EPYC
without AMX, 8 rows against a 5632 × 2048 weight read from memory: 21-23 GB/s, torch's GEMM 15-17;
:class:`DenseLinear` has the table)."""


def native_dense_product(x2: Tensor, weight: Tensor) -> Tensor | None:
    """``x2`` [M, in] times a 16-bit ``weight`` [out, in] transposed as fp32 [M, out] through the
    native kernel, where it serves these rows (fp32 activations, up to :data:`NATIVE_DENSE_ROWS`,
    a CPU with the kernels built); else None."""
    if (
        x2.shape[0] > NATIVE_DENSE_ROWS.get(weight.dtype, 0)
        or x2.dtype != torch.float32
        or weight.device.type != "cpu"
    ):
        return None
    kernels = native.kernels()
    return None if kernels is None else kernels.dense_matmul(x2, weight)


class DenseLinear(nn.Module):
    """A 16-bit linear layer: the unquantized weight in :func:`dense_weight_dtype`.

    Activations are cast to the weight's dtype for the matmul and the result back to theirs,
    except for a few rows of fp32 activations (decode, :data:`NATIVE_DENSE_ROWS`) on a CPU with
    pqctl's native kernels: those multiply bf16 or fp32 weights in fp32 (exact products, no bf16
    rounding of the activations), faster than torch there. On a 2-core Zen 4 EPYC, weights read
    from memory, 1 / 4 / 8 rows ran at (GB/s of weights, native vs torch's ``torch.mv`` for one
    bf16 row, else ``F.linear``; two runs, the kernels prefetching the next weight rows into L2):

    ====================== ================ ================ ================
    weight                 1 row            4 rows           8 rows
    ====================== ================ ================ ================
    bf16 5632 × 2048       30-32 vs 7-10    26-29 vs 18-20   21-23 vs 15-17
    bf16 2048 × 5632       26-44 vs 8-18    27-35 vs 17-18   23-25 vs 15-17
    fp32 2816 × 1024       23-31 vs 13-14   28-30 vs 9       24-28 vs 9-10
    fp32 1024 × 2816       26-30 vs 16-17   28-30 vs 10-11   26-28 vs 9-11
    ====================== ================ ================ ================

    (in an earlier release, with one thread, fp32 at 4 and 8 rows: 11-13 vs 5-7 GB/s.)
    """

    weight: Tensor
    bias: Tensor | None
    bits = 16
    kernel_path: KernelPath = "dense"

    def __init__(
        self, weight: Tensor, bias: Tensor | None, group_size: int, native: bool = True
    ) -> None:
        super().__init__()
        self.native = native
        """Whether decode rows may take the native kernel (``impl="auto"``)."""
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
        ``impl="reference"`` (exact numerics for tests). ``impl="torch"`` keeps decode rows off
        the native kernel. ``group_size`` is unused.
        """
        _check_weight(weight, bias)
        if bits != 16:
            raise QuantizationError(f"DenseLinear holds 16-bit layers, not {bits}-bit ones")
        device = torch.device(device)
        exact = impl == "reference"
        dtype = compute_dtype if exact else dense_weight_dtype(compute_dtype, device, weight.dtype)
        with torch.no_grad():
            w = weight.detach().to(device=device, dtype=dtype).contiguous()
            b = None if bias is None else bias.detach().to(device=device, dtype=compute_dtype)
        return cls(w, b, group_size, native=impl == "auto")

    def forward(self, x: Tensor) -> Tensor:
        """``x`` [..., in] -> [..., out] in x's dtype."""
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        product = native_dense_product(x2, self.weight) if self.native else None
        if product is None:
            if x.dtype == self.weight.dtype:
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return F.linear(x, self.weight, bias)
            if x2.shape[0] == 1:  # one row (a decode step of one sequence): a matrix-vector product
                product = torch.mv(self.weight, x2[0].to(self.weight.dtype)).unsqueeze(0)
            else:
                product = F.linear(x2.to(self.weight.dtype), self.weight)
        y = _with_bias(product, x.dtype, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def resident_bytes(self) -> int:
        """Bytes of every tensor the module keeps (weight and bias)."""
        return _module_bytes(self)

    def dequantized_weight(self) -> Tensor:
        """fp32 [out, in]: the weight the layer multiplies by."""
        return self.weight.float()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.weight.dtype}, dense"


class QuantLinear(nn.Module):
    """A weight-only quantized linear layer over real packed storage (2, 3, 4 or 8 bits).

    Buffers by ``kernel_path``: ``qweight`` holds our packed codes (dequant-per-call, native-int4),
    int8 codes (native-int8, int8pack_mm) or torch's int4 kernels' packed tensor; ``scales`` holds
    the per-group or per-row scales, or tinygemm's [groups, out, 2] scales-and-zeros; ``zeros``
    only for dequant-per-call and native-int4.
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
            impl: "auto" picks the fastest path; "torch" the fastest of torch's own kernels;
                "reference" dequantizes per call into ``compute_dtype`` (same quantized values,
                for tests).

        Raises:
            QuantizationError: unsupported bits or group size, or a malformed weight.
        """
        _check_weight(weight, bias)
        check_bits(bits)
        if group_size < 1:
            raise QuantizationError(f"group size must be at least 1, got {group_size}")
        device = torch.device(device)
        out_features, in_features = weight.shape
        fastest: Impl = "torch" if impl == "torch" else "auto"
        auto = choose_kernel_path(bits, in_features, out_features, group_size, device, fastest)
        path = "dequant-per-call" if impl == "reference" else auto
        matmul = compute_dtype if impl == "reference" else dense_weight_dtype(compute_dtype, device)
        with torch.no_grad():
            q = quantize_rtn(weight, bits, group_size, scale_dtype_for(auto))
            qweight, scales, zeros = kernel_buffers(q, path, device)
            b = None if bias is None else bias.detach().to(device=device, dtype=compute_dtype)
        shape = (out_features, in_features)
        return cls(shape, bits, q.group_size, path, matmul, (qweight, scales, zeros, b))

    def _quantized(self) -> QuantizedTensor:
        """Our storage format over the buffers (every path but the int4pack ones)."""
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
        dense_from = DENSE_ROWS.get(path)
        if dense_from is not None and x.shape[0] >= dense_from and x.device.type == "cpu":
            return dense_block_matmul(x, self._quantized(), self.matmul_dtype)
        if path == "native-int8":
            return _native().int8_matmul(x, self.qweight, self.scales)
        if path == "native-int4":
            assert self.zeros is not None
            return _native().int4_matmul(x, self.qweight, self.scales, self.zeros, self.group_size)
        if path in ("native-int3", "native-int2"):
            assert self.zeros is not None
            return _native().stream_matmul(
                x, self.qweight, self.scales, self.zeros, self.group_size, self.bits
            )
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
        if self.kernel_path in _OWN_LAYOUT_KERNELS:  # fp32 sums of our codes: no bf16 rounding
            return dequantize(self._quantized(), torch.float32)
        if self.kernel_path == "dequant-per-call":
            return self.dense_weight().float()
        codes = self._int4_codes_via_kernel()  # [out, in] fp32, 0..15
        scales, zeros = self.scales[..., 0].t(), self.scales[..., 1].t()
        return affine_into(torch.empty_like(codes), codes, scales, zeros, 4, self.group_size)

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


_OWN_LAYOUT_KERNELS: frozenset[KernelPath] = frozenset(
    {"native-int8", "native-int4", "native-int3", "native-int2", "int8pack_mm"}
)
"""Kernel paths that read the codes in :mod:`runtime.quant.packing`'s own format."""


def _native() -> native.NativeKernels:
    kernels = native.kernels()
    assert kernels is not None, "a native-kernel layer exists only where the kernels loaded"
    return kernels


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
        impl: "auto", "torch" (torch's kernels only) or "reference" (always dequantize per
            call; for tests).

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
