"""Compression of weights and KV cache: FlexGen's group-wise 4-bit quantisation.

See :mod:`flexgraph.compress.quant` for the scheme and the layouts.
"""

from flexgraph.compress.quant import (
    CACHE_GROUP_DIM,
    GROUP_SIZE,
    WEIGHT_GROUP_DIM,
    QLayout,
    QTensor,
    compressed_nbytes,
    dequantize,
    dequantize_into,
    dequantize_rows,
    fake_quantize,
    packed_shape,
    qlayout,
    qtensor_empty,
    qtensor_empty_bytes,
    qtensor_from_bytes,
    quantize,
    quantize_into,
    scale_shape,
    should_compress,
    to_bytes_layout,
)

__all__ = [
    "CACHE_GROUP_DIM", "GROUP_SIZE", "WEIGHT_GROUP_DIM", "QLayout", "QTensor", "compressed_nbytes", "dequantize",
    "dequantize_into", "dequantize_rows", "fake_quantize", "packed_shape", "qlayout", "qtensor_empty",
    "qtensor_empty_bytes", "qtensor_from_bytes", "quantize", "quantize_into", "scale_shape", "should_compress",
    "to_bytes_layout",
]
