"""QuantState: everything needed to decode a blockwise-quantized tensor, and its state-dict form.

The state-dict form uses bitsandbytes' key names so that transformers' pre-quantized 4-bit checkpoints
can be read and written: for a weight saved under ``<prefix>``

    <prefix>.absmax               float32 [blocks], or uint8 codes when double-quantized
    <prefix>.quant_map            float32 [16]: the 4-bit code table
    <prefix>.nested_absmax        float32: absmax of the 256-blocks of the absmax (double quant only)
    <prefix>.nested_quant_map     float32 [256]: the dynamic map (double quant only)
    <prefix>.quant_state.bitsandbytes__nf4   uint8 bytes of a JSON dict (quant_type, blocksize, dtype,
                                  shape, nested_blocksize, nested_dtype, nested_offset)

``int4`` is this project's own format, which bitsandbytes cannot read: its JSON key is
``quant_state.msbnb__int4`` and an asymmetric int4 tensor adds ``<prefix>.block_offset``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from ..errors import CheckpointError, CheckpointKeyError
from ._checks import VALID_BLOCKSIZES

NESTED_BLOCKSIZE = 256
_BNB_TYPES = ("nf4", "fp4")
_OWN_TYPES = ("int4",)


def to_numpy(value) -> np.ndarray:
    """A numpy array from numpy, MindSpore (``asnumpy``) or torch (``numpy``) tensors, or lists."""
    if hasattr(value, "asnumpy"):
        return value.asnumpy()
    if hasattr(value, "detach") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _join(prefix: str, key: str) -> str:
    prefix = prefix.rstrip(".")
    return f"{prefix}.{key}" if prefix else key


@dataclass(eq=False)
class QuantState:
    """Decoding state of a blockwise-quantized tensor (bitsandbytes' QuantState, as numpy arrays).

    ``absmax`` is float32 per block, or uint8 dynamic-map codes when ``state2`` (the nested state of
    double quantization) is set; then the real absmax is ``state2.code[absmax] * state2.absmax + offset``.
    ``block_offset`` is the per-block midpoint of asymmetric int4 (None otherwise).
    """

    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, ...]
    absmax: np.ndarray
    code: np.ndarray
    state2: QuantState | None = None
    offset: np.float32 | None = None
    block_offset: np.ndarray | None = field(default=None)

    @property
    def nested(self) -> bool:
        """True when the absmax is double-quantized."""
        return self.state2 is not None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def symmetric(self) -> bool:
        return self.block_offset is None

    @property
    def stats_nbytes(self) -> int:
        """Bytes of the statistics that must be stored per tensor (absmax, nested state, offsets)."""
        total = self.absmax.nbytes + (0 if self.block_offset is None else self.block_offset.nbytes)
        if self.state2 is not None:
            total += self.state2.absmax.nbytes + 4  # nested absmax + the float32 offset
        return int(total)

    def dequantized_absmax(self) -> np.ndarray:
        """The float32 absmax per block, decoding double quantization if present."""
        if self.state2 is None:
            return np.asarray(self.absmax, dtype=np.float32)
        s2 = self.state2
        codes = np.asarray(self.absmax).reshape(-1)
        scales = np.repeat(np.asarray(s2.absmax, np.float32), s2.blocksize)[: codes.size]
        return s2.code[codes] * scales + np.float32(self.offset)

    def equals(self, other: QuantState, atol: float = 0.0) -> bool:
        """Field-by-field comparison (arrays within ``atol``)."""

        def close(a, b) -> bool:
            if a is None or b is None:
                return a is b
            a, b = np.asarray(a), np.asarray(b)
            return a.shape == b.shape and bool(np.allclose(a, b, atol=atol, rtol=0))

        return (
            isinstance(other, QuantState)
            and (self.quant_type, self.blocksize, self.dtype, tuple(self.shape))
            == (other.quant_type, other.blocksize, other.dtype, tuple(other.shape))
            and close(self.absmax, other.absmax)
            and close(self.code, other.code)
            and close(self.offset, other.offset)
            and close(self.block_offset, other.block_offset)
            and (
                (self.state2 is None and other.state2 is None)
                or (self.state2 is not None and other.state2 is not None and self.state2.equals(other.state2, atol))
            )
        )

    # ---- state dict -------------------------------------------------------------------------------------
    def _json_key(self) -> str:
        ns = "bitsandbytes" if self.quant_type in _BNB_TYPES else "msbnb"
        return f"quant_state.{ns}__{self.quant_type}"

    def to_state_dict(self, prefix: str = "weight") -> dict[str, np.ndarray]:
        """The state dict entries of this state under ``prefix`` (e.g. ``"model.q_proj.weight"``)."""
        out = {
            _join(prefix, "absmax"): np.asarray(self.absmax),
            _join(prefix, "quant_map"): np.asarray(self.code, dtype=np.float32),
        }
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": int(self.blocksize),
            "dtype": self.dtype,
            "shape": [int(d) for d in self.shape],
        }
        if self.state2 is not None:
            out[_join(prefix, "nested_absmax")] = np.asarray(self.state2.absmax, dtype=np.float32)
            out[_join(prefix, "nested_quant_map")] = np.array(self.state2.code, dtype=np.float32)
            meta.update(
                nested_blocksize=int(self.state2.blocksize),
                nested_dtype=self.state2.dtype,
                nested_offset=float(np.float32(self.offset)),
            )
        if self.block_offset is not None:
            out[_join(prefix, "block_offset")] = np.asarray(self.block_offset, dtype=np.float32)
        if self.quant_type in _OWN_TYPES:
            meta["symmetric"] = self.symmetric
        out[_join(prefix, self._json_key())] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8).copy()
        return out

    @classmethod
    def from_state_dict(cls, prefix: str, state_dict: dict) -> QuantState:
        """Rebuild a QuantState from state-dict entries under ``prefix`` (bitsandbytes' key names).

        Every tensor is checked as strictly as the kernels need it (dtype, size, finite statistics); a
        ``CheckpointError`` names the tensor that is wrong, what it holds and what is needed."""
        head = _join(prefix, "quant_state.")
        qs_keys = [k for k in state_dict if k.startswith(head)]
        if len(qs_keys) != 1:
            raise CheckpointError(
                f"expected exactly one '{head}bitsandbytes__<nf4|fp4>' (or msbnb__int4) entry in the state dict, "
                f"found {qs_keys or 'none'}"
            )
        qs_key = qs_keys[0]
        ns_type = qs_key[len(head) :]
        valid = [f"bitsandbytes__{t}" for t in _BNB_TYPES] + [f"msbnb__{t}" for t in _OWN_TYPES]
        if ns_type not in valid:
            raise CheckpointError(f"unknown quant state '{qs_key}': the suffix must be one of {valid}")
        try:
            meta = json.loads(bytes(to_numpy(state_dict[qs_key]).astype(np.uint8)).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as exc:
            raise CheckpointError(f"'{qs_key}' does not hold UTF-8 JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"'{qs_key}' must hold a JSON object, got {type(meta).__name__}")

        def get(key: str) -> np.ndarray:
            full = _join(prefix, key)
            if full not in state_dict:
                raise CheckpointKeyError(f"state dict lacks '{full}' needed by {qs_key}")
            return np.asarray(to_numpy(state_dict[full]))

        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise CheckpointError(f"'{qs_key}' lacks the field '{key}' (has {sorted(meta)})")
        quant_type = meta["quant_type"]
        if quant_type != ns_type.partition("__")[2]:
            raise CheckpointError(f"'{qs_key}': quant_type {quant_type!r} does not match the key's {ns_type!r}")
        blocksize = meta["blocksize"]
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
            raise CheckpointError(f"'{qs_key}': blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize!r}")
        shape = meta["shape"]
        if (
            not isinstance(shape, list)
            or not shape
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
        ):
            raise CheckpointError(f"'{qs_key}': shape must be a list of positive integers, got {shape!r}")
        if not isinstance(meta["dtype"], str):
            raise CheckpointError(f"'{qs_key}': dtype must be a string, got {meta['dtype']!r}")
        numel = int(np.prod(shape, dtype=np.int64))
        n_blocks = -(-numel // blocksize)
        where = f"(shape {shape}, blocksize {blocksize}: {n_blocks} blocks)"
        state2, offset = None, None
        absmax = get("absmax")
        if "nested_blocksize" in meta:
            nbs = meta["nested_blocksize"]
            if isinstance(nbs, bool) or not isinstance(nbs, int) or nbs < 1:
                raise CheckpointError(f"'{qs_key}': nested_blocksize must be a positive integer, got {nbs!r}")
            off = meta.get("nested_offset")
            if isinstance(off, bool) or not isinstance(off, (int, float)) or not np.isfinite(off):
                raise CheckpointError(f"'{qs_key}': nested_offset must be a finite number, got {off!r}")
            _expect(_join(prefix, "absmax"), absmax, np.uint8, n_blocks, f"8-bit codes, one per block {where}")
            nested_absmax = get("nested_absmax")
            _expect(
                _join(prefix, "nested_absmax"),
                nested_absmax,
                "float",
                -(-n_blocks // nbs),
                f"one per {nbs} blocks",
                nonnegative=True,
            )
            nested_map = get("nested_quant_map")
            _expect(_join(prefix, "nested_quant_map"), nested_map, "float", 256, "the 8-bit dynamic map")
            state2 = cls(
                quant_type="dynamic",
                blocksize=nbs,
                dtype=meta.get("nested_dtype", "float32"),
                shape=(int(absmax.size),),
                absmax=nested_absmax.astype(np.float32).reshape(-1),
                code=nested_map.astype(np.float32).reshape(-1),
            )
            offset = np.float32(off)
        else:
            # nf4/fp4 store an absmax; msbnb's int4 stores a block scale, which may be negative (GGUF's Q4_0/Q4_1
            # scale d keeps the sign of the block's largest-magnitude value)
            _expect(
                _join(prefix, "absmax"),
                absmax,
                "float",
                n_blocks,
                f"one per block {where}",
                nonnegative=quant_type in ("nf4", "fp4"),
            )
        code = get("quant_map")
        _expect(_join(prefix, "quant_map"), code, "float", 16, "the 4-bit code table")
        block_offset_key = _join(prefix, "block_offset")
        block_offset = None
        if block_offset_key in state_dict:
            block_offset = np.asarray(to_numpy(state_dict[block_offset_key]))
            _expect(block_offset_key, block_offset, "float", n_blocks, f"one per block {where}")
            block_offset = block_offset.astype(np.float32).reshape(-1)
        return cls(
            quant_type=quant_type,
            blocksize=blocksize,
            dtype=meta["dtype"],
            shape=tuple(int(d) for d in shape),
            absmax=absmax.reshape(-1) if state2 is not None else absmax.astype(np.float32).reshape(-1),
            code=code.astype(np.float32).reshape(-1),
            state2=state2,
            offset=offset,
            block_offset=block_offset,
        )


def _expect(key: str, arr: np.ndarray, dtype, size: int, what: str, nonnegative: bool = False) -> None:
    """Refuse a state-dict tensor of the wrong dtype or size, or with non-finite (or negative) values."""
    if dtype == "float":
        ok = arr.dtype.kind == "f"
        wanted = "a float"
    else:
        ok = arr.dtype == dtype
        wanted = f"a {np.dtype(dtype).name}"
    if not ok or arr.size != size:
        raise CheckpointError(
            f"'{key}' must be {wanted} tensor with {size} entries ({what}), got {arr.dtype} of shape {list(arr.shape)}"
        )
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr.reshape(-1))
        if nonnegative:
            bad |= arr.reshape(-1) < 0
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            need = "finite and >= 0" if nonnegative else "finite"
            raise CheckpointError(
                f"'{key}' holds {int(bad.sum())} invalid value(s), first at index {i}: {arr.reshape(-1)[i]!r}; "
                f"it must be {need}"
            )
