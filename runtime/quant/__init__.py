"""Quantized weights: packed storage formats and round-to-nearest quantization (``packing``,
no layers), the compute path per platform and the kernels' weight layouts (``kernels``), and
the quantized linear layers over them (``linear``). Imports torch and ``runtime.errors`` only,
never another room of the runtime. Their public names are re-exported here.
"""

from runtime.quant.kernels import (
    TINYGEMM_GROUP_SIZES,
    Impl,
    KernelPath,
    choose_kernel_path,
    dense_weight_dtype,
)
from runtime.quant.linear import QUANTIZERS, DenseLinear, QuantLinear, quantize_linear
from runtime.quant.packing import (
    DEQUANT_CHUNK_ELEMENTS,
    PACKED_BITS,
    QUANT_CHUNK_ELEMENTS,
    QuantizedTensor,
    dequantize,
    pack_codes,
    packed_nbytes,
    quantize_rtn,
    unpack_codes,
)

__all__ = [
    "DEQUANT_CHUNK_ELEMENTS",
    "PACKED_BITS",
    "QUANTIZERS",
    "QUANT_CHUNK_ELEMENTS",
    "TINYGEMM_GROUP_SIZES",
    "DenseLinear",
    "Impl",
    "KernelPath",
    "QuantLinear",
    "QuantizedTensor",
    "choose_kernel_path",
    "dense_weight_dtype",
    "dequantize",
    "pack_codes",
    "packed_nbytes",
    "quantize_linear",
    "quantize_rtn",
    "unpack_codes",
]
