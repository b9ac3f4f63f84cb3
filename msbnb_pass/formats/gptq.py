"""Calibrated rounding (GPTQ) that stores exactly the formats round-to-nearest stores.

Round-to-nearest picks each weight's code on its own. GPTQ (Frantar et al. 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers") picks the codes one input column at a
time and pushes each column's rounding error onto the columns not yet quantized, weighted by the inverse
Hessian ``H = 2 X^T X / n`` of the layer's real input activations ``X``. It minimises the *output* error
``||X W^T - X Q^T||`` instead of the weight error. Only the choice of codes changes: the packed nibbles,
absmax (plain or double-quantized), int8 ``CB``/``SCB`` are the same arrays, shapes and dtypes the
round-to-nearest quantizers produce, so the files load wherever those load (transformers + bitsandbytes
for NF4/FP4 and LLM.int8()).

How each format's scales are chosen (a column's codes are only chosen once its scale is fixed):

* blockwise 4-bit (NF4/FP4/INT4, ``blocksize`` elements of the row-major flattened weight per absmax),
  ``static_groups=True`` (what the pass uses): every block's absmax (or [min, max]) is taken from the
  original weight before the loop, so the columns may be visited in any order and are visited by
  decreasing Hessian diagonal (act order); NF4/FP4 then store round-to-nearest's absmax exactly.
  ``static_groups=False``: when ``in_features`` is a multiple of the blocksize, a block is ``blocksize``
  consecutive columns of one row; its absmax (or, asymmetric int4, its [min, max]) is taken from the
  block's *current* weights —
  already carrying the error pushed from the columns before it — at the moment its first column is
  quantized. Otherwise (blocks straddle rows) a block is fixed the first time any of its elements is
  quantized, from the current values of all its elements.
  INT4's levels are uniform, so its block scale is also searched: the block's absmax times each of
  ``SHRINKS``, keeping the one with the least rounding error weighted by the Hessian diagonal (clipping
  the largest values buys a finer step for the rest). NF4/FP4 keep the absmax.
* double quantization: bitsandbytes stores ``dyn[c] * nested_absmax + offset`` in place of each absmax.
  The offset and the nested absmax of each 256-block are taken from the round-to-nearest absmax of the
  original weight; each block's absmax is then rounded onto that grid *before* the block's codes are
  chosen, so the codes are chosen against the absmax as it is stored (choosing them against the float
  absmax and rounding it afterwards would lose much of the gain).
* int8 row-wise (LLM.int8()'s ``SCB``, symmetric/asymmetric per-channel or per-tensor int8): the scales
  of the original weight, as round-to-nearest has them; the columns may then be visited in any order, and
  are visited by decreasing Hessian diagonal ("act order").

Numerics: the Hessian and its inverse in float64, the column loop in float32 (lazy batch updates: the
error of a batch of columns reaches the later columns in one matrix product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _checks
from .blockwise import nearest_code, pack_4bit, quantize_4bit
from .codebooks import QUANT_TYPES_4BIT, code_sort_order, create_dynamic_map, get_4bit_code
from .int8 import dequantize_int8, int8_vectorwise_dequant, int8_vectorwise_quant, quantize_int8
from .quant_state import NESTED_BLOCKSIZE, QuantState

__all__ = [
    "Blockwise4bitQuantizer",
    "GPTQResult",
    "Int8Quantizer",
    "Prepared",
    "gptq_quantize",
    "inverse_cholesky",
    "output_error",
    "prepare",
]

DEFAULT_DAMP = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
DEFAULT_BATCH = 128  # columns per lazy batch update
# int4 (uniform levels): each block's scale is the best of its absmax times these (clipping the largest
# values trades their error for a finer step on the rest); NF4/FP4 keep the absmax
SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
_INV_127 = np.float32(7.874015718698502e-3)  # 1/127 as bitsandbytes writes it


class _Quantizer:
    """What the GPTQ loop needs from a format: groups of columns whose scales are fixed together (at the
    group's first column, from the group's current weights), the quantization of one column, and the
    stored arrays at the end."""

    column_free = False  # True: scales do not depend on the visiting order (act order allowed)

    def groups(self) -> list[tuple[int, int]]:
        """Column ranges whose scales are fixed when the range's first column comes up (in order)."""
        return []

    def fix(self, g0: int, current: np.ndarray) -> None:  # pragma: no cover - per format
        """Fix the scales of group ``[g0, g0 + current.shape[1])`` from its current weights."""

    def quantize(self, col: int, w: np.ndarray) -> np.ndarray:  # pragma: no cover - per format
        """Choose the codes of column ``col`` (values ``w`` [out]); return their dequantized values."""
        raise NotImplementedError

    def nearest(self) -> np.ndarray:  # pragma: no cover - per format
        """The round-to-nearest dequantized weight of the same format (the baseline)."""
        raise NotImplementedError

    def result(self) -> dict[str, Any]:  # pragma: no cover - per format
        raise NotImplementedError

    def dequantized(self) -> np.ndarray:  # pragma: no cover - per format
        """The chosen codes decoded through the format's reference dequantizer."""
        raise NotImplementedError


# ---- blockwise 4-bit -----------------------------------------------------------------------------------------------
class Blockwise4bitQuantizer(_Quantizer):
    """NF4 / FP4 / INT4 in bitsandbytes' blockwise layout (``quantize_4bit``'s arrays)."""

    def __init__(
        self,
        weight: np.ndarray,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = False,
        symmetric: bool = True,
        static_groups: bool = False,
    ):
        if quant_type not in QUANT_TYPES_4BIT:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES_4BIT}, got {quant_type!r}")
        if not symmetric and quant_type != "int4":
            raise ValueError(f"symmetric=False is only defined for quant_type='int4', got {quant_type!r}")
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.out_features, self.in_features = self.weight.shape
        self.quant_type = quant_type
        self.blocksize = _checks.check_blocksize(blocksize)
        self.double_quant = bool(double_quant)
        self.symmetric = bool(symmetric)
        self.code = get_4bit_code(quant_type, symmetric)
        self.order = code_sort_order(quant_type, self.code)
        sorted_code = self.code[self.order]
        self._bounds = (sorted_code[:-1] + sorted_code[1:]) / np.float32(2.0)  # midpoints, as nearest_code has them
        self._order_u8 = np.asarray(self.order, dtype=np.uint8)
        self.n = self.out_features * self.in_features
        self.n_blocks = -(-self.n // self.blocksize)
        self.aligned = self.in_features % self.blocksize == 0
        self.codes = np.zeros((self.out_features, self.in_features), np.uint8)
        self.scale = np.zeros(self.n_blocks, np.float32)  # the absmax each block's codes were chosen against
        self.offset = None if self.symmetric else np.zeros(self.n_blocks, np.float32)
        self.fixed = np.zeros(self.n_blocks, bool)
        self.absmax_codes = np.zeros(self.n_blocks, np.uint8) if self.double_quant else None
        self._rtn = quantize_4bit(self.weight, self.blocksize, quant_type, self.double_quant, symmetric=symmetric)
        if self.double_quant:
            st = self._rtn[1]
            self.state2 = st.state2
            self.dq_offset = np.float32(st.offset)
            self.dyn = create_dynamic_map(signed=True)
            self.nested = np.repeat(st.state2.absmax.astype(np.float32), NESTED_BLOCKSIZE)[: self.n_blocks]
        self._current: np.ndarray | None = None  # straddling blocks: the whole (updated in place) weight
        self._group: tuple = ()  # aligned blocks: the scales of the group being quantized
        # the Hessian diagonal (set by gptq_quantize): int4 then picks each block's scale among clipped ones
        self.importance: np.ndarray | None = None
        self._col_blocks = None
        # static groups: every block's scale is fixed up front from the original weight, so the columns may
        # be visited in any order (act order)
        self.static_groups = bool(static_groups)
        self.column_free = self.static_groups
        self._static: dict[int, tuple] | None = None

    def _fix_static(self) -> None:
        """Fix every block from the original weight (int4: scale search weighted by the Hessian diagonal)."""
        self._static = {}
        if not self.aligned:  # blocks straddle rows: all at once, each element weighted by its column's diagonal
            blocks = np.arange(self.n_blocks)
            idx = blocks[:, None] * self.blocksize + np.arange(self.blocksize)[None, :]
            valid = idx < self.n
            idx = np.minimum(idx, self.n - 1)
            weights = None
            if self.importance is not None:
                weights = np.where(valid, self.importance[idx % self.in_features], np.float32(0.0))
            self._fix_blocks(blocks, self.weight.reshape(-1)[idx], None if valid.all() else valid, weights)
            # per column the rows' blocks are (row * in_features + col) // blocksize: gather from these
            self._row_base = np.arange(self.out_features, dtype=np.int64) * self.in_features
            self._inv_all = self._scales_of(blocks)[1]
            return
        nb = self.in_features // self.blocksize
        rows = np.arange(self.out_features) * nb
        for g in range(nb):
            c0, c1 = g * self.blocksize, (g + 1) * self.blocksize
            weights = None if self.importance is None else self.importance[c0:c1]
            self._fix_blocks(rows + g, self.weight[:, c0:c1], None, weights)
            self._static[g] = self._scales_of(rows + g)

    def batch_scales(self, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Static groups: the (scale, 1/scale, offset) each output row quantizes original columns ``cols``
        with, as ``[len(cols), out_features]`` float32 arrays (offset None when symmetric)."""
        if self._static is None:
            self._fix_static()
        if self.aligned:
            per = [self._static[int(c) // self.blocksize] for c in cols]
            scale = np.stack([p[0] for p in per])
            inv = np.stack([p[1] for p in per])
            off = None if self.offset is None else np.stack([p[2] for p in per])
        else:
            blocks = (self._row_base[None, :] + np.asarray(cols, np.int64)[:, None]) // self.blocksize
            scale, inv = self.scale[blocks], self._inv_all[blocks]
            off = None if self.offset is None else self.offset[blocks]
        c = np.ascontiguousarray
        return c(scale, np.float32), c(inv, np.float32), None if off is None else c(off, np.float32)

    def groups(self) -> list[tuple[int, int]]:
        if self.static_groups:
            return []
        if self.aligned:
            return [(g, g + self.blocksize) for g in range(0, self.in_features, self.blocksize)]
        return [(0, self.in_features)]  # straddling blocks: one batch over all columns, fixed lazily

    def _stored_absmax(self, blocks: np.ndarray, absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The absmax as it will be stored (itself, or rounded onto the double-quantization grid) and its
        8-bit code (double quantization only)."""
        absmax = np.maximum(absmax.astype(np.float32), np.float32(1e-38))
        if not self.double_quant:
            return absmax, None
        nested = self.nested[blocks]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(nested > 0, (absmax - self.dq_offset) / nested, 0.0).astype(np.float32)
        c = nearest_code(np.clip(x, -1.0, 1.0), self.dyn)
        return self.dyn[c] * nested + self.dq_offset, c

    def _uniform_error(self, values: np.ndarray, centre, scale: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Per row, the importance-weighted squared rounding error of int4's uniform levels at ``scale``."""
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
        scaled = np.clip((values - centre) * inv[:, None], -1.0, 1.0)
        if self.symmetric:  # levels k/7, k in [-7, 7]
            q = np.rint(scaled * np.float32(7.0)) / np.float32(7.0)
        else:  # levels (2i - 15)/15, i in [0, 15]
            q = np.rint((scaled + np.float32(1.0)) * np.float32(7.5)) * np.float32(2.0 / 15.0) - np.float32(1.0)
        err = values - (q * scale[:, None] + centre)
        if weights.ndim == 2:  # per block (blocks straddling rows): each element its column's weight
            return (err * err * weights).sum(axis=1)
        return (err * err) @ weights

    def _search_scale(self, blocks, values, centre, half, weights) -> tuple[np.ndarray, np.ndarray | None]:
        """int4: the stored scale among ``half * shrink`` (shrink in SHRINKS) with the least weighted error."""
        best, best_code = self._stored_absmax(blocks, half)
        if weights is None or self.quant_type != "int4":
            return best, best_code
        best_err = self._uniform_error(values, centre, best, weights)
        for shrink in SHRINKS[1:]:
            cand, code = self._stored_absmax(blocks, half * np.float32(shrink))
            err = self._uniform_error(values, centre, cand, weights)
            better = err < best_err
            best = np.where(better, cand, best)
            best_err = np.where(better, err, best_err)
            if code is not None:
                best_code = np.where(better, code, best_code)
        return best, best_code

    def _fix_blocks(
        self, blocks: np.ndarray, values: np.ndarray, valid: np.ndarray | None = None, weights: np.ndarray | None = None
    ) -> None:
        """Fix ``blocks`` from their current values ``[len(blocks), blocksize]`` (``valid`` masks a partial one).
        With ``weights`` (the Hessian diagonal of the block's columns), int4 searches a clipping scale."""
        if self.symmetric:
            mag = np.abs(values) if valid is None else np.where(valid, np.abs(values), 0.0)
            centre = np.float32(0.0)
            half = mag.max(axis=1)
        else:
            lo = values.min(axis=1) if valid is None else np.where(valid, values, np.inf).min(axis=1)
            hi = values.max(axis=1) if valid is None else np.where(valid, values, -np.inf).max(axis=1)
            half = (hi - lo).astype(np.float32) * np.float32(0.5)
            self.offset[blocks] = (hi + lo).astype(np.float32) * np.float32(0.5)
            centre = self.offset[blocks][:, None]
        scale, code = self._search_scale(blocks, values, centre, half, weights)
        self.scale[blocks] = scale
        if code is not None:
            self.absmax_codes[blocks] = code
        self.fixed[blocks] = True

    def fix(self, g0: int, current: np.ndarray) -> None:
        if self.aligned:
            nb = self.in_features // self.blocksize
            blocks = np.arange(self.out_features) * nb + g0 // self.blocksize
            weights = None if self.importance is None else self.importance[g0 : g0 + self.blocksize]
            self._fix_blocks(blocks, current, None, weights)
            self._group = self._scales_of(blocks)
        else:
            self._current = current  # the full weight, updated in place by the loop

    def _fix_straddling(self, col: int) -> np.ndarray:
        rows = np.arange(self.out_features, dtype=np.int64)
        blocks = (rows * self.in_features + col) // self.blocksize
        new = np.unique(blocks[~self.fixed[blocks]])
        if new.size:
            flat = self._current.reshape(-1)
            idx = new[:, None] * self.blocksize + np.arange(self.blocksize)[None, :]
            valid = idx < self.n
            values = flat[np.minimum(idx, self.n - 1)]
            self._fix_blocks(new, values, None if valid.all() else valid)
        return blocks

    def _scales_of(self, blocks: np.ndarray) -> tuple:
        """(scale, 1/scale or 0, offset or None) of ``blocks``: what a column of them is quantized with."""
        scale = self.scale[blocks]
        with np.errstate(divide="ignore", over="ignore"):
            inv = np.where(scale != 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
        inv[~np.isfinite(inv)] = 0.0
        return scale, inv, None if self.offset is None else self.offset[blocks]

    def quantize(self, col: int, w: np.ndarray) -> np.ndarray:
        if self.static_groups:
            if self._static is None:
                self._fix_static()
            if self.aligned:
                scale, inv, off = self._static[col // self.blocksize]
            else:
                blocks = (self._row_base + col) // self.blocksize
                scale, inv = self.scale[blocks], self._inv_all[blocks]
                off = None if self.offset is None else self.offset[blocks]
        else:
            scale, inv, off = self._group if self.aligned else self._scales_of(self._fix_straddling(col))
        scaled = (w if off is None else w - off) * inv
        np.clip(scaled, -1.0, 1.0, out=scaled)
        # nearest code: a value exactly on a midpoint goes to the lower code (as in nearest_code)
        idx = self._order_u8[np.searchsorted(self._bounds, scaled, side="left")]
        self.codes[:, col] = idx
        q = self.code[idx] * scale
        return q if off is None else q + off

    def nearest(self) -> np.ndarray:
        from .blockwise import dequantize_4bit

        return dequantize_4bit(*self._rtn)

    def state(self) -> QuantState:
        if self.double_quant:
            absmax, state2, offset = self.absmax_codes.copy(), self.state2, self.dq_offset
        else:
            absmax, state2, offset = self.scale.copy(), None, None
        return QuantState(
            quant_type=self.quant_type,
            blocksize=self.blocksize,
            dtype="float32",
            shape=(self.out_features, self.in_features),
            absmax=absmax,
            code=self.code.copy(),
            state2=state2,
            offset=offset,
            block_offset=None if self.offset is None else self.offset.copy(),
        )

    def result(self) -> dict[str, Any]:
        return {"packed": pack_4bit(self.codes.reshape(-1)), "quant_state": self.state()}

    def dequantized(self) -> np.ndarray:
        from .blockwise import dequantize_4bit

        r = self.result()
        return dequantize_4bit(r["packed"], r["quant_state"])


# ---- int8 with row (or tensor) scales ------------------------------------------------------------------------------
class Int8Quantizer(_Quantizer):
    """int8 with the scales of the original weight: ``"llm_int8"`` (bitsandbytes' CB/SCB, row absmax) or
    ``"int8"`` (``quantize_int8``: symmetric/asymmetric, per-channel or per-tensor)."""

    column_free = True

    def __init__(self, weight: np.ndarray, kind: str = "llm_int8", symmetric: bool = True, per_channel: bool = True):
        if kind not in ("llm_int8", "int8"):
            raise ValueError(f"kind must be 'llm_int8' or 'int8', got {kind!r}")
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.kind = kind
        out, k = self.weight.shape
        self.q = np.zeros((out, k), np.int8)
        if kind == "llm_int8":
            self._rtn_q, self.SCB = int8_vectorwise_quant(self.weight)
            self.factor = np.where(self.SCB > 0, np.float32(127.0) / np.maximum(self.SCB, 1e-38), 0.0).astype(
                np.float32
            )
            self.step = (self.SCB * _INV_127).astype(np.float32)
            self.zero = np.zeros(out, np.float32)
            self.lo, self.hi = -127, 127
        else:
            self._rtn_q, self.scale, self.zero_point = quantize_int8(self.weight, symmetric, per_channel)
            step = np.broadcast_to(self.scale, (out,)).astype(np.float32)
            self.step = step
            self.factor = (np.float32(1.0) / step).astype(np.float32)
            self.zero = (
                np.zeros(out, np.float32)
                if self.zero_point is None
                else np.broadcast_to(self.zero_point, (out,)).astype(np.float32)
            )
            self.lo, self.hi = (-127, 127) if symmetric else (-128, 127)

    def quantize(self, col: int, w: np.ndarray) -> np.ndarray:
        q = np.clip(np.rint(w * self.factor) + self.zero, self.lo, self.hi)
        self.q[:, col] = q.astype(np.int8)
        return (q - self.zero) * self.step

    def nearest(self) -> np.ndarray:
        return self._decode(self._rtn_q)

    def _decode(self, q: np.ndarray) -> np.ndarray:
        if self.kind == "llm_int8":
            return int8_vectorwise_dequant(q, self.SCB)
        return dequantize_int8(q, self.scale, self.zero_point)

    def result(self) -> dict[str, Any]:
        if self.kind == "llm_int8":
            return {"CB": self.q.copy(), "SCB": self.SCB.copy()}
        return {"q": self.q.copy(), "scale": self.scale.copy(), "offset": self.zero_point}

    def dequantized(self) -> np.ndarray:
        return self._decode(self.q)


# ---- the algorithm -------------------------------------------------------------------------------------------------
@dataclass
class GPTQResult:
    """The stored arrays (``arrays``: what the cell constructor takes) and the output errors."""

    arrays: dict[str, Any]
    dequantized: np.ndarray  # the chosen codes decoded by the format's reference dequantizer
    error_nearest: float  # relative output error of round-to-nearest on the calibration activations
    error: float  # the same for the calibrated codes


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """Relative output error ``||X (W - A)^T|| / ||X W^T||`` computed from ``H = X^T X`` (any scale)."""
    return _output_errors(np.asarray(weight, np.float64), [np.asarray(approx, np.float64)], hessian)[0]


def _output_errors(weight: np.ndarray, approxes: list[np.ndarray], hessian: np.ndarray) -> list[float]:
    """:func:`output_error` of several approximations with one matrix product (in the weight's precision)."""
    dtype = np.float64 if weight.dtype == np.float64 else np.float32
    w = np.asarray(weight, dtype)
    rows = np.concatenate([w] + [w - np.asarray(a, dtype) for a in approxes])
    prod = rows @ np.asarray(hessian, dtype)
    prod *= rows
    sq = prod.sum(axis=1, dtype=np.float64)
    o = w.shape[0]
    den = float(sq[:o].sum())
    out = []
    for i in range(len(approxes)):
        num = max(float(sq[(i + 1) * o : (i + 2) * o].sum()), 0.0)
        out.append(float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num)))
    return out


def inverse_cholesky(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (``U^T U`` = that inverse;
    float64), with dead inputs (zero diagonal) patched to 1. GPTQ needs only this factor; layers that read
    the same input (q/k/v) share it.

    One Cholesky of the reversed matrix gives it without forming the inverse: if ``P H P = M M^T`` (``P``
    reverses the order), then ``U = P M^-1 P`` is upper triangular and ``U^T U = H^-1``.
    """
    if not (isinstance(damp, float) and 0 < damp < 1):
        raise ValueError(f"damp must be a float in (0, 1), got {damp!r}")
    h = np.array(h, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be a square matrix, got shape {h.shape}")
    if not np.isfinite(h).all():
        raise ValueError("hessian holds NaN or Inf (the calibration activations are not finite)")
    diag = np.diag(h).copy()
    dead = diag <= 0
    if dead.all():
        h = np.eye(h.shape[0])
    else:
        h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += damp * mean
    rev = np.ascontiguousarray(h[::-1, ::-1])
    for _ in range(6):  # more damping only where the matrix is numerically indefinite
        try:
            m = np.linalg.cholesky(rev)
            break
        except np.linalg.LinAlgError:
            rev[np.diag_indices_from(rev)] += damp * mean
    else:
        raise np.linalg.LinAlgError("the Hessian stays indefinite after damping")
    return np.ascontiguousarray(_lower_inverse(m)[::-1, ::-1])


def _lower_inverse(m: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix (LAPACK ``dtrtri``: K^3/3 multiply-adds; a general inverse
    costs ~4x that)."""
    from scipy.linalg import lapack

    inv, info = lapack.dtrtri(m, lower=1)
    if info != 0:  # pragma: no cover - the Cholesky factor of a positive definite matrix has no zero pivot
        raise np.linalg.LinAlgError(f"triangular inverse failed (LAPACK dtrtri info {info})")
    return np.tril(inv)


def _batches(groups: list[tuple[int, int]], k: int, batch: int) -> list[tuple[int, int]]:
    """Lazy-update batches of about ``batch`` columns, each holding whole groups."""
    if not groups:
        return [(i, min(i + batch, k)) for i in range(0, k, batch)]
    out, start, end = [], groups[0][0], groups[0][0]
    for g0, g1 in groups:
        if end - start >= batch:
            out.append((start, end))
            start = g0
        end = g1
    out.append((start, end))
    return out


@dataclass
class Prepared:
    """What GPTQ derives from a Hessian alone, shareable by the layers that read the same input."""

    hessian: np.ndarray  # float32 [K, K] (the output errors)
    perm: np.ndarray  # the column visiting order
    factor: np.ndarray  # float32 upper Cholesky factor of the damped inverse Hessian, in ``perm`` order


def prepare(hessian: np.ndarray, act_order: bool = False, damp: float = DEFAULT_DAMP) -> Prepared:
    """The visiting order (by decreasing Hessian diagonal with ``act_order``) and the inverse factor."""
    h = np.asarray(hessian)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"hessian must be a square matrix, got shape {h.shape}")
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    factor = inverse_cholesky(h[np.ix_(perm, perm)] if act_order else h, damp).astype(np.float32)
    return Prepared(np.asarray(h, np.float32), perm, factor)


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray,
    quantizer: _Quantizer,
    *,
    damp: float = DEFAULT_DAMP,
    batch: int = DEFAULT_BATCH,
    act_order: bool | None = None,
    prepared: Prepared | None = None,
    batch_kernel=None,
) -> GPTQResult:
    """Choose ``quantizer``'s codes for ``weight`` [out, in] with GPTQ against ``hessian`` [in, in]
    (``X^T X`` of the layer's inputs, any positive scale). ``act_order`` (default: where the format
    allows it) visits the columns by decreasing Hessian diagonal. ``prepared``: ``prepare(hessian,
    act_order, damp)`` when the caller already has it (layers sharing an input). ``batch_kernel``: a
    compiled twin of the per-column loop for static-group 4-bit quantizers (``kernels._lib.gptq_batch``,
    the same float32 operations in the same order, so the same codes); None runs the loop in numpy."""
    w0 = _checks.float_array(weight, "weight", ndim=2)
    h = np.asarray(hessian)
    k = w0.shape[1]
    if h.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}] for a weight of shape {tuple(w0.shape)}, got {h.shape}")
    if act_order is None:
        act_order = quantizer.column_free
    if act_order and not quantizer.column_free:
        raise ValueError(
            "act_order needs scales that do not depend on the column order (int8); blockwise 4-bit "
            "formats tie their blocks to the column order"
        )
    if prepared is None:
        prepared = prepare(h, act_order, damp)
    perm, U = prepared.perm, prepared.factor
    if U.shape != (k, k):
        raise ValueError(f"prepared is for {U.shape[0]} inputs, the weight has {k}")
    # the weight transposed, [in, out]: each input column is a contiguous row, so the per-column work
    # (quantize one column, push its error onto the rest of the batch) runs on contiguous memory
    WT = np.array(w0[:, perm].T, dtype=np.float32, order="C")
    if isinstance(quantizer, Blockwise4bitQuantizer) and quantizer.aligned:
        quantizer.importance = np.diag(prepared.hessian).astype(np.float32)
    groups = quantizer.groups()
    diag = U.diagonal().copy()
    order = perm.tolist()
    if not (isinstance(quantizer, Blockwise4bitQuantizer) and quantizer.static_groups):
        batch_kernel = None
    for i1, i2 in _batches(groups, k, batch):
        W1 = WT[i1:i2]  # a view: updated in place
        err1 = np.empty_like(W1)
        if batch_kernel is not None:
            cols = perm[i1:i2]
            scale, inv, off = quantizer.batch_scales(cols)
            codes = np.empty(W1.shape, np.uint8)
            ublock = np.ascontiguousarray(U[i1:i2, i1:i2])
            q = quantizer
            batch_kernel(W1, ublock, scale, inv, off, q.code, q._bounds, q._order_u8, codes, err1)
            q.codes[:, cols] = codes.T
            if i2 < k:
                WT[i2:] -= U[i1:i2, i2:].T @ err1
            continue
        starts = {g0: g1 for g0, g1 in groups if i1 <= g0 < i2}
        for i in range(i2 - i1):
            col = i1 + i
            if col in starts:
                quantizer.fix(col, W1[i : i + starts[col] - col].T)
            w = W1[i]
            q = quantizer.quantize(order[col], w)
            e = err1[i]
            np.subtract(w, q, out=e)
            e /= diag[col]
            if i + 1 < i2 - i1:
                W1[i + 1 :] -= U[col, col + 1 : i2, None] * e
        if i2 < k:
            WT[i2:] -= U[i1:i2, i2:].T @ err1
    deq = quantizer.dequantized()
    err_nearest, err = _output_errors(np.asarray(w0, np.float32), [quantizer.nearest(), deq], prepared.hessian)
    return GPTQResult(quantizer.result(), deq, err_nearest, err)
