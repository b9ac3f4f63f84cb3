"""safetensors files: a validating, memory-mapped reader and an atomic writer.

The reader checks the header itself (every tensor's byte range inside the file, consistent with its
dtype and shape, ranges neither overlapping nor leaving gaps) so that a truncated or tampered file is
refused with the tensor named, then lets the ``safetensors`` package's own ``safe_open`` vet the file.
Nothing is loaded before a tensor is asked for. ``raw(name)`` is a read-only ``numpy.memmap`` of that
tensor's bytes alone (unmapped when the caller drops it); ``get(name)``, what the loaders use, reads the
bytes straight into the array it returns (float16/bfloat16 widened chunk by chunk), so a loader that turns
each tensor into a parameter never holds file pages and parameters at once: a mapping of the whole file
kept alive would add every touched page to the resident set.
``BF16`` (which numpy cannot represent) is read as raw 16-bit words and widened exactly to float32.

The writer writes the same layout (an 8-byte little-endian header length, the JSON header padded with
spaces to a multiple of 8, the raw little-endian bytes) to a temporary file beside the target, fsyncs it
and ``os.replace``-s it over the target, so a crash never leaves a truncated file in place of a good one.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import OutputError, write_atomic
from .errors import CheckpointError

logger = logging.getLogger(__name__)

# safetensors dtype name -> numpy dtype of the stored bytes (BF16 is read as uint16 words)
_DTYPES = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_NUMPY_TO_ST = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "U8",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint16): "U16",
    np.dtype(np.int16): "I16",
    np.dtype(np.float16): "F16",
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.float32): "F32",
    np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64",
    np.dtype(np.float64): "F64",
}
_MAX_HEADER = 100_000_000
_CHUNK = 1 << 22  # elements converted per read when widening float16/bfloat16


def bf16_to_float32(words: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (exact for bf16 values)."""
    u = np.asarray(values, dtype=np.float32, order="C").view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def numpy_to_dtype_name(arr: np.ndarray) -> str:
    try:
        return _NUMPY_TO_ST[np.dtype(arr.dtype)]
    except KeyError:
        raise CheckpointError(
            f"numpy dtype {arr.dtype} has no safetensors equivalent (accepted: {sorted(map(str, _NUMPY_TO_ST))})"
        ) from None


class SafetensorsFile:
    """One ``.safetensors`` file, validated on open and memory-mapped.

    ``keys()``, ``dtype(name)`` (safetensors' name: 'F32', 'BF16', ...), ``shape(name)``, ``metadata``,
    ``raw(name)`` (the stored values, BF16 as uint16 words; a read-only view of the mapping) and
    ``get(name)`` (float tensors as float32, others as stored; a copy).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._header, self._data_start = _read_header(self.path)
        self.metadata: dict[str, str] = self._header.pop("__metadata__", None) or {}
        _validate_entries(self.path, self._header, os.path.getsize(self.path) - self._data_start)
        _vet_with_safetensors(self.path)

    def _bytes(self, begin: int, end: int) -> np.ndarray:
        if end == begin:
            return np.zeros(0, np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start + begin, shape=(end - begin,))

    def keys(self) -> list[str]:
        return list(self._header)

    def __contains__(self, name: object) -> bool:
        return name in self._header

    def dtype(self, name: str) -> str:
        return self._entry(name)["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def nbytes(self, name: str) -> int:
        begin, end = self._entry(name)["data_offsets"]
        return end - begin

    def _entry(self, name: str) -> dict[str, Any]:
        try:
            return self._header[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor '{name}'") from None

    def raw(self, name: str) -> np.ndarray:
        e = self._entry(name)
        begin, end = e["data_offsets"]
        return self._bytes(begin, end).view(_DTYPES[e["dtype"]]).reshape(e["shape"])

    def raw_bytes(self, name: str) -> bytes:
        begin, end = self._entry(name)["data_offsets"]
        return bytes(self._bytes(begin, end))

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new array: float dtypes widened to float32, others as stored.

        Read with ``readinto`` in chunks straight into the result (no mapping of the file stays behind, and
        a float16/bfloat16 tensor never exists twice), so loading tensor by tensor holds only the results."""
        e = self._entry(name)
        dtype = e["dtype"]
        begin, _ = e["data_offsets"]
        stored = _DTYPES[dtype]
        n = int(np.prod(e["shape"], dtype=np.int64))
        widen = dtype in FLOAT_DTYPES and dtype != "F32"
        out = np.empty(n, np.float32 if widen else stored)
        if n:
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                if not widen:
                    if f.readinto(memoryview(out).cast("B")) != out.nbytes:
                        raise CheckpointError(f"{self.path}: tensor '{name}' is cut short (file truncated while open)")
                else:
                    chunk = np.empty(min(n, _CHUNK), stored)
                    for start in range(0, n, _CHUNK):
                        part = chunk[: min(_CHUNK, n - start)]
                        if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                            raise CheckpointError(
                                f"{self.path}: tensor '{name}' is cut short (file truncated while open)"
                            )
                        out[start : start + part.size] = bf16_to_float32(part) if dtype == "BF16" else part
        return out.reshape(e["shape"])


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, not even the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: the header claims {n} bytes but the file has {size - 8} after the length (truncated or "
                    f"not a safetensors file)"
                )
            text = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    return header, 8 + n


def _validate_entries(path: Path, header: dict[str, Any], data_size: int) -> None:
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(f"{path}: tensor '{name}': header entry must hold dtype, shape and data_offsets")
        if e["dtype"] not in _DTYPES:
            raise CheckpointError(
                f"{path}: tensor '{name}': dtype {e['dtype']!r} is not supported (accepted: {sorted(_DTYPES)})"
            )
        shape, offsets = e["shape"], e["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{path}: tensor '{name}': shape must be a list of non-negative ints, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{path}: tensor '{name}': data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        want = int(np.prod(shape, dtype=np.int64)) * _DTYPES[e["dtype"]].itemsize
        if end - begin != want or begin < 0:
            raise CheckpointError(
                f"{path}: tensor '{name}': {e['dtype']} {shape} needs {want} bytes, data_offsets {offsets} give "
                f"{end - begin} (tampered header)"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor '{name}' ends at byte {end} of the data but the file holds only {data_size} "
                f"(truncated file)"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise CheckpointError(f"{path}: tensor '{name}' {kind} (data_offsets start at {begin}, expected {pos})")
        pos = end
    if pos != data_size:
        raise CheckpointError(f"{path}: {data_size - pos} bytes after the last tensor are not described by the header")


def _vet_with_safetensors(path: Path) -> None:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:  # the package is a dependency; without it only our own checks run
        return
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except SafetensorError as exc:
        raise CheckpointError(f"{path}: safetensors refuses the file: {exc}") from exc


def atomic_write(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write ``chunks`` to ``path`` through the package's one atomic writer (temporary file beside it, fsync,
    ``os.replace``). A non-regular target (symlink, directory, device) is refused with a CheckpointError; on
    any error the target is untouched and the temporary file removed."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    try:
        write_atomic(path, write, "checkpoint file")
    except OutputError as exc:
        raise CheckpointError(str(exc)) from None


def _encode(name: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """``arr`` as the stored little-endian values of safetensors dtype ``dtype``."""
    if dtype not in _DTYPES:
        raise CheckpointError(f"tensor '{name}': dtype {dtype!r} is not supported (accepted: {sorted(_DTYPES)})")
    arr = np.asarray(arr)
    if dtype == "BF16":
        if arr.dtype == np.uint16:  # already bf16 words
            return np.asarray(arr, order="C")
        return float32_to_bf16(arr.astype(np.float32, copy=False))
    if dtype in FLOAT_DTYPES and arr.dtype.kind != "f":
        raise CheckpointError(f"tensor '{name}': cannot store {arr.dtype} values as {dtype}")
    if dtype not in FLOAT_DTYPES and arr.dtype != _DTYPES[dtype] and arr.dtype.kind == "f":
        raise CheckpointError(f"tensor '{name}': cannot store float values as {dtype}")
    return np.asarray(arr, dtype=_DTYPES[dtype], order="C")


def write_safetensors(
    path: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    dtypes: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array) atomically. ``dtypes`` names a safetensors dtype per tensor
    (default: the array's own; float32 arrays are converted, e.g. to 'BF16' or 'F16')."""
    dtypes = dtypes or {}
    encoded: dict[str, tuple[str, np.ndarray]] = {}
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        dtype = dtypes.get(name) or numpy_to_dtype_name(arr)
        encoded[name] = (dtype, _encode(name, arr, dtype))
    entries = [(name, dtype, tuple(arr.shape)) for name, (dtype, arr) in encoded.items()]
    write_safetensors_streaming(path, entries, lambda name: encoded[name][1], metadata)


def write_safetensors_streaming(
    path: str | os.PathLike,
    entries: list[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], np.ndarray],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a file larger than memory: ``entries`` lists (name, safetensors dtype, shape) in file order and
    ``produce(name)`` returns each tensor when its turn comes (float values are converted to the dtype).
    Atomic like :func:`write_safetensors`; a produced tensor of the wrong shape aborts the write."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in entries:
        if dtype not in _DTYPES:
            raise CheckpointError(f"tensor '{name}': dtype {dtype!r} is not supported (accepted: {sorted(_DTYPES)})")
        nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)

    def chunks() -> Iterator[bytes | memoryview]:
        yield struct.pack("<Q", len(text))
        yield text
        for name, dtype, shape in entries:
            arr = _encode(name, produce(name), dtype)
            if tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"tensor '{name}': produced shape {arr.shape}, the header says {tuple(shape)}")
            if arr.nbytes:
                yield memoryview(arr.reshape(-1)).cast("B")

    atomic_write(path, chunks())
    logger.debug("wrote %d tensors (%d bytes) to %s", len(entries), pos, path)
