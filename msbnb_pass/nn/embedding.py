"""Quantized lookup tables: Embedding4bit (NF4 / FP4 / INT4 blockwise) and Embedding8bit (row-wise int8).

bitsandbytes' formats: ``Embedding4bit`` quantizes the ``[num_embeddings, embedding_dim]`` table flat
(row-major) in blocks of ``blocksize`` exactly as Linear4bit quantizes its weight, without double
quantization by default; ``Embedding8bit`` keeps one int8 row and one absmax (``SCB``) per embedding.
A lookup decodes only the looked-up rows: each element's 4-bit code and its block's scale are gathered by
the element's flat index, so a block straddling two rows (``embedding_dim % blocksize != 0``) is decoded
correctly, and nothing of the rest of the table is touched. The result is bit-identical to
``formats.dequantize_4bit_rows`` / ``formats.int8_vectorwise_dequant`` of those rows.
"""

from __future__ import annotations

from typing import Any

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from .. import formats
from ..errors import CheckpointError, QuantizationError
from ..formats import _checks
from ..formats.codebooks import QUANT_TYPES_4BIT
from ..formats.int8 import _INV_127
from ..formats.quant_state import QuantState, to_numpy
from ..kernels import quantize as fast
from ._base import QuantParams, _positive_int, check_finite_stats, read_int8_rows
from ._packed4bit import Packed4bitWeight, read_packed_4bit

ID_DTYPES = (ms.int32, ms.int64)
MODELS_EMBEDDING = "msbnb_pass.models._layers.Embedding"  # named, not imported: models imports this package
_INT32_LIMIT = 2**31 - 1


def embedding_parts(cell: nn.Cell) -> tuple[np.ndarray, str, str]:
    """(table [num, dim] float32, weight attribute, parameter-name prefix) of a float lookup table:
    ``msbnb_pass.models._layers.Embedding`` or ``mint.nn.Embedding`` (``weight``), ``mindspore.nn.Embedding``
    (``embedding_table``)."""
    from mindspore import mint

    name = f"{type(cell).__module__}.{type(cell).__qualname__}"
    if isinstance(cell, mint.nn.Embedding) or name == MODELS_EMBEDDING:
        attr = "weight"
    elif isinstance(cell, nn.Embedding):
        attr = "embedding_table"
    else:
        raise TypeError(
            "from_embedding expects a msbnb_pass.models Embedding, mindspore.nn.Embedding or mindspore.mint.nn."
            f"Embedding, got {type(cell).__module__}.{type(cell).__name__}"
        )
    param = getattr(cell, attr)
    table = to_numpy(param)
    if table.ndim != 2:
        raise ValueError(f"from_embedding: the table {param.name} must be 2-D [num, dim], got {table.shape}")
    name = param.name
    prefix = name[: -len(attr)] if name.endswith(attr) else ""
    return table.astype(np.float32), attr, prefix


class QuantEmbedding(QuantParams, nn.Cell):
    """Base of Embedding4bit and Embedding8bit: ``construct(ids)`` -> float32 rows ``ids.shape + (dim,)``.

    ``ids`` are int32 or int64 of any shape; an id outside ``[0, num_embeddings)`` raises MindSpore's
    Gather range error (the first gather is on a per-row table indexed by the ids themselves)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, layer_name: str | None = None):
        super().__init__()
        owner = layer_name or type(self).__name__
        self.num_embeddings = _positive_int("num_embeddings", num_embeddings, owner)
        self.embedding_dim = _positive_int("embedding_dim", embedding_dim, owner)
        self.layer_name = owner

    def _check_ids(self, ids):
        if ids.dtype not in ID_DTYPES:
            raise TypeError(f"{self.layer_name}: ids must be int32 or int64, got {ids.dtype}")

    @classmethod
    def from_float(cls, weight, layer_name: str | None = None, **kwargs: Any):
        """Quantize a float table ``[num_embeddings, embedding_dim]`` (``kwargs``: the constructor's options)."""
        w = np.asarray(to_numpy(weight))
        if w.ndim != 2:
            raise ValueError(f"{layer_name or cls.__name__}: weight must be 2-D [num, dim], got shape {w.shape}")
        return cls(w.shape[0], w.shape[1], weight=w, layer_name=layer_name, **kwargs)

    @classmethod
    def from_embedding(cls, cell: nn.Cell, layer_name: str | None = None, **kwargs: Any):
        """Quantize a float embedding cell (its table); parameters are named after the replaced cell's."""
        table, attr, prefix = embedding_parts(cell)
        layer = cls.from_float(table, layer_name or prefix.rstrip(".") or None, **kwargs)
        layer.name_parameters(prefix)
        return layer

    def weight_nbytes(self) -> int:
        return self.parameter_nbytes()

    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_nbytes() / (self.num_embeddings * self.embedding_dim)

    def dequantized_weight(self) -> np.ndarray:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def dequantized_rows(self, rows) -> np.ndarray:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def dequantize(self) -> nn.Cell:
        """A float ``mindspore.nn.Embedding`` holding the dequantized table."""
        return nn.Embedding(self.num_embeddings, self.embedding_dim, embedding_table=Tensor(self.dequantized_weight()))


class Embedding4bit(Packed4bitWeight, QuantEmbedding):
    """A lookup table stored as packed 4-bit codes with blockwise absmax (bitsandbytes' Embedding4bit).

    Args:
        num_embeddings, embedding_dim: the table's shape ``[num, dim]``.
        quant_type: "nf4" (default, as this project's Linear4bit), "fp4" or "int4".
        blocksize: elements per absmax block over the flat table, a power of two in [32, 4096] (blocks may
            straddle rows when ``embedding_dim % blocksize != 0``).
        compress_statistics: double-quantize the absmax (False by default, as bitsandbytes).
        symmetric: int4 only; False stores each block's midpoint.
        weight: the float table to quantize (default: normal(0, 1), as ``torch.nn.Embedding``).

    Parameters carry Linear4bit's names (``weight``, ``weight_absmax``, ``weight_quant_map``, ...), and
    ``bnb_state_dict()`` writes bitsandbytes' keys, the same as for a Linear4bit weight.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = False,
        *,
        symmetric: bool = True,
        weight: Any = None,
        quant_state: QuantState | None = None,
        packed: Any = None,
        layer_name: str | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, layer_name)
        owner = self.layer_name
        self.blocksize = _checks.check_blocksize(blocksize, f"{owner}: blocksize")
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"{owner}: quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        if not symmetric and quant_type != "int4":
            raise ValueError(f"{owner}: symmetric=False is only defined for quant_type='int4', got {quant_type!r}")
        self.quant_type = quant_type
        self._weight_shape = (self.num_embeddings, self.embedding_dim)
        if quant_state is None:
            if weight is None:
                weight = np.random.default_rng().standard_normal(self._weight_shape, dtype=np.float32)
            w = _checks.float_array(weight, f"{owner}: weight", ndim=2)
            if w.shape != self._weight_shape:
                raise ValueError(f"{owner}: weight must have shape {self._weight_shape}, got {w.shape}")
            try:
                packed, quant_state = fast.quantize_4bit(
                    w, self.blocksize, quant_type, bool(compress_statistics), symmetric=bool(symmetric)
                )
            except QuantizationError as exc:
                raise QuantizationError(f"{owner}: weight: {str(exc).removeprefix('A: ')}") from None
        self._load_quantized(np.asarray(packed).reshape(-1), quant_state)
        numel = self.num_embeddings * self.embedding_dim
        index = ms.int32 if numel + self.embedding_dim <= _INT32_LIMIT else ms.int64
        np_index = np.int32 if index == ms.int32 else np.int64
        # the flat index of each row's first element: gathering it by id range-checks the ids
        self._row_start = Tensor(np.arange(self.num_embeddings, dtype=np_index) * np_index(self.embedding_dim))
        self._cols = Tensor(np.arange(self.embedding_dim, dtype=np_index).reshape(1, -1))
        self._nested = self.quant_state.nested
        self._nested_blocksize = self.quant_state.state2.blocksize if self._nested else 256
        self._asymmetric = not self.quant_state.symmetric

    def construct(self, ids):
        self._check_ids(ids)
        dim = self.embedding_dim
        start = ops.gather(self._row_start, ids.reshape((-1,)), 0)
        flat = start.reshape((-1, 1)) + ops.broadcast_to(self._cols, (start.shape[0], dim))
        byte = ops.cast(ops.gather(self.weight.reshape((-1,)), ops.bitwise_right_shift(flat, 1), 0), flat.dtype)
        odd = ops.bitwise_and(flat, 1) > 0
        code = ops.where(odd, ops.bitwise_and(byte, 15), ops.bitwise_right_shift(byte, 4))
        values = ops.gather(self.weight_quant_map, code, 0)
        block = ops.floor_div(flat, self.blocksize)
        if self._nested:
            state = ops.cast(ops.gather(self.weight_absmax, block, 0), ms.int32)
            nested = ops.gather(self.weight_nested_absmax, ops.floor_div(block, self._nested_blocksize), 0)
            scale = ops.gather(self.weight_nested_quant_map, state, 0) * nested + self.weight_nested_offset
        else:
            scale = ops.gather(self.weight_absmax, block, 0)
        out = values * scale
        if self._asymmetric:
            out = out + ops.gather(self.weight_block_offset, block, 0)
        return out.reshape(ids.shape + (dim,))

    @classmethod
    def from_embedding(
        cls,
        cell: nn.Cell,
        quant_type: str = "nf4",
        blocksize: int = 64,
        compress_statistics: bool = False,
        symmetric: bool = True,
        layer_name: str | None = None,
    ) -> Embedding4bit:
        """Quantize a float embedding cell (``models.Embedding``, ``nn.Embedding``, ``mint.nn.Embedding``)."""
        return super().from_embedding(
            cell,
            layer_name,
            quant_type=quant_type,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            symmetric=symmetric,
        )

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "", **kwargs: Any) -> Embedding4bit:
        """Build from bitsandbytes' keys (``<prefix>weight``, ``<prefix>weight.absmax``, ...)."""
        qs, packed = read_packed_4bit(state_dict, prefix, cls.__name__, "[num_embeddings, embedding_dim]")
        if cls is not Embedding4bit and qs.quant_type != cls._fixed_type:
            raise CheckpointError(
                f"'{prefix}weight' is quantized as {qs.quant_type}, {cls.__name__} holds {cls._fixed_type}"
            )
        num, dim = qs.shape
        args = {} if cls is not Embedding4bit else {"quant_type": qs.quant_type}
        return cls(
            num,
            dim,
            blocksize=qs.blocksize,
            compress_statistics=qs.nested,
            symmetric=qs.symmetric,
            quant_state=qs,
            packed=packed,
            **args,
            **kwargs,
        )

    def bnb_state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """bitsandbytes' state dict of this table (the keys of a Linear4bit weight)."""
        return self._weight_state_dict(prefix)

    def dequantized_weight(self) -> np.ndarray:
        return formats.dequantize_4bit(self.weight.asnumpy(), self.current_quant_state())

    def dequantized_rows(self, rows) -> np.ndarray:
        return formats.dequantize_4bit_rows(self.weight.asnumpy(), self.current_quant_state(), rows)

    def extend_repr(self) -> str:
        dq = ", double_quant" if self.quant_state.nested else ""
        asym = ", asymmetric" if not self.quant_state.symmetric else ""
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}{dq}{asym}, "
            f"bits_per_weight={self.bits_per_weight():.3f}"
        )


class _Fixed4bit(Embedding4bit):
    _fixed_type = ""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        blocksize: int = 64,
        compress_statistics: bool = False,
        **kwargs: Any,
    ):
        if "quant_type" in kwargs:
            raise TypeError(f"{type(self).__name__} is {self._fixed_type}; use Embedding4bit to choose quant_type")
        super().__init__(num_embeddings, embedding_dim, self._fixed_type, blocksize, compress_statistics, **kwargs)

    @classmethod
    def from_embedding(
        cls,
        cell: nn.Cell,
        blocksize: int = 64,
        compress_statistics: bool = False,
        layer_name: str | None = None,
    ):
        return super(Embedding4bit, cls).from_embedding(
            cell, layer_name, blocksize=blocksize, compress_statistics=compress_statistics
        )


class EmbeddingNF4(_Fixed4bit):
    """Embedding4bit with ``quant_type="nf4"``."""

    _fixed_type = "nf4"


class EmbeddingFP4(_Fixed4bit):
    """Embedding4bit with ``quant_type="fp4"``."""

    _fixed_type = "fp4"


class Embedding8bit(QuantEmbedding):
    """A lookup table as int8 rows and one absmax per row (``SCB``): row ``r`` is ``weight[r] * SCB[r] / 127``
    (bitsandbytes' Embedding8bit format; ``bnb_state_dict()`` writes Linear8bitLt's ``weight`` + ``SCB``).

    Args:
        num_embeddings, embedding_dim: the table's shape.
        weight: the float table to quantize (default: normal(0, 1)); or ``CB`` (int8) and ``SCB`` (float32).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        weight: Any = None,
        CB: Any = None,
        SCB: Any = None,
        layer_name: str | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, layer_name)
        owner = self.layer_name
        shape = (self.num_embeddings, self.embedding_dim)
        if CB is not None:
            cb, scb = np.asarray(to_numpy(CB)), np.asarray(to_numpy(SCB), np.float32).reshape(-1)
            if cb.dtype != np.int8 or cb.shape != shape or scb.shape != (self.num_embeddings,):
                raise ValueError(
                    f"{owner}: CB must be int8 {shape} and SCB float32 ({self.num_embeddings},), got "
                    f"{cb.dtype} {cb.shape} and {scb.shape}"
                )
        else:
            if weight is None:
                weight = np.random.default_rng().standard_normal(shape, dtype=np.float32)
            w = _checks.float_array(weight, f"{owner}: weight", ndim=2).astype(np.float32)
            if w.shape != shape:
                raise ValueError(f"{owner}: weight must have shape {shape}, got {w.shape}")
            cb, scb = fast.int8_vectorwise_quant(w)
        check_finite_stats(owner, SCB=scb)
        self.weight = self._param(cb, "weight")
        self.SCB = self._param(scb, "SCB")
        self._inv127 = Tensor(np.array([_INV_127], np.float32))

    def construct(self, ids):
        self._check_ids(ids)
        flat = ids.reshape((-1,))
        scale = ops.gather(self.SCB, flat, 0).reshape((-1, 1))
        rows = ops.cast(ops.gather(self.weight, flat, 0), ms.float32)
        out = rows * ops.broadcast_to(scale, rows.shape) * self._inv127
        return out.reshape(ids.shape + (self.embedding_dim,))

    @classmethod
    def from_embedding(cls, cell: nn.Cell, layer_name: str | None = None) -> Embedding8bit:
        """Quantize a float embedding cell row-wise to int8."""
        return super().from_embedding(cell, layer_name)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "", **kwargs: Any) -> Embedding8bit:
        """Build from ``<prefix>weight`` (int8 ``[num, dim]``) and ``<prefix>SCB`` (float ``[num]``)."""
        cb, scb = read_int8_rows(state_dict, prefix, "Embedding8bit", "[num_embeddings, embedding_dim]")
        return cls(cb.shape[0], cb.shape[1], CB=cb, SCB=scb.astype(np.float32), **kwargs)

    def bnb_state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}weight": self.weight.asnumpy().copy(), f"{prefix}SCB": self.SCB.asnumpy().copy()}

    def dequantized_weight(self) -> np.ndarray:
        return formats.int8_vectorwise_dequant(self.weight.asnumpy(), self.SCB.asnumpy())

    def dequantized_rows(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_embeddings):
            raise ValueError(
                f"{self.layer_name}: rows must be in [0, {self.num_embeddings}), got {rows.min()}..{rows.max()}"
            )
        return formats.int8_vectorwise_dequant(self.weight.asnumpy()[rows], self.SCB.asnumpy()[rows])

    def extend_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, int8 row-wise"
