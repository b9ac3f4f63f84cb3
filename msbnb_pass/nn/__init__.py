"""Quantized cells: Linear8bit (weight-only INT8), Linear8bitLt (LLM.int8()), Linear4bit (NF4/FP4/INT4) and the
lookup tables Embedding4bit (EmbeddingNF4 / EmbeddingFP4) and Embedding8bit."""

from ._base import QuantLinear
from .embedding import Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4, QuantEmbedding
from .linear4bit import Linear4bit
from .linear8bit import Linear8bit
from .linear8bitlt import Linear8bitLt

__all__ = [
    "Embedding4bit",
    "Embedding8bit",
    "EmbeddingFP4",
    "EmbeddingNF4",
    "Linear4bit",
    "Linear8bit",
    "Linear8bitLt",
    "QuantEmbedding",
    "QuantLinear",
]
