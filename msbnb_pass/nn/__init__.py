"""Quantized cells: Linear8bit (weight-only INT8), Linear8bitLt (LLM.int8()), Linear4bit (NF4/FP4/INT4)."""

from ._base import QuantLinear
from .linear4bit import Linear4bit
from .linear8bit import Linear8bit
from .linear8bitlt import Linear8bitLt

__all__ = ["Linear4bit", "Linear8bit", "Linear8bitLt", "QuantLinear"]
