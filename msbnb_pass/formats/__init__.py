"""The quantization formats in plain numpy: the oracle that every kernel and cell is tested against.

Bit-exact with bitsandbytes 0.50 on CPU for NF4/FP4 packed bytes and absmax, the dynamic map and
LLM.int8()'s row-wise quantization. Importing this package needs only numpy.
"""

from .blockwise import (
    compress_absmax,
    dequantize_4bit,
    dequantize_4bit_rows,
    dequantize_blockwise,
    nearest_code,
    pack_4bit,
    quantize_4bit,
    quantize_blockwise,
    unpack_4bit,
)
from .codebooks import QUANT_TYPES_4BIT, create_dynamic_map, get_4bit_code
from .int8 import (
    dequantize_int8,
    int8_mixed_matmul,
    int8_vectorwise_dequant,
    int8_vectorwise_quant,
    outlier_columns,
    quantize_int8,
)
from .quant_state import NESTED_BLOCKSIZE, QuantState

__all__ = [
    "NESTED_BLOCKSIZE",
    "QUANT_TYPES_4BIT",
    "QuantState",
    "compress_absmax",
    "create_dynamic_map",
    "dequantize_4bit",
    "dequantize_4bit_rows",
    "dequantize_blockwise",
    "dequantize_int8",
    "get_4bit_code",
    "int8_mixed_matmul",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "nearest_code",
    "outlier_columns",
    "pack_4bit",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_int8",
    "unpack_4bit",
]
