"""transformers ``save_pretrained`` directories: ``config.json`` + ``model.safetensors`` (or
``model.safetensors.index.json`` + shards), float or quantized by bitsandbytes, read and written.

A :class:`TensorStore` is what every reader returns: a read-only mapping from state-dict key to numpy
array (float tensors widened to float32, quantized data as stored), loaded tensor by tensor on access, with
the stored dtype of each key (so a writer can store it back the same way) and the raw bytes of the
bitsandbytes ``quant_state`` JSON entries (so an unchanged layer is written back byte for byte).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError
from .safetensors_io import SafetensorsFile, atomic_write, write_safetensors

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class TensorStore(Mapping):
    """Key -> numpy array, read on access. ``dtype(key)`` is the stored safetensors dtype name."""

    def __init__(
        self,
        getters: dict[str, Callable[[], np.ndarray]],
        dtypes: dict[str, str],
        source: str,
        raw: Callable[[str], bytes] | None = None,
    ):
        self._getters = getters
        self._raw = raw
        self._dtypes = dtypes
        self.source = source
        self._sorted = sorted(getters)

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            getter = self._getters[key]
        except KeyError:
            raise KeyError(key) from None
        return getter()

    def __iter__(self) -> Iterator[str]:
        return iter(self._sorted)

    def __len__(self) -> int:
        return len(self._getters)

    def __contains__(self, key: object) -> bool:
        return key in self._getters

    def dtype(self, key: str) -> str:
        return self._dtypes[key]

    def raw_bytes(self, key: str) -> bytes | None:
        """The stored bytes of ``key`` when the store reads a file (None for in-memory stores)."""
        return None if self._raw is None else self._raw(key)

    def with_prefix(self, prefix: str) -> list[str]:
        """Every key starting with ``prefix`` (sorted)."""
        i = bisect.bisect_left(self._sorted, prefix)
        out = []
        while i < len(self._sorted) and self._sorted[i].startswith(prefix):
            out.append(self._sorted[i])
            i += 1
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], dtypes: dict[str, str], source: str) -> TensorStore:
        """A store over in-memory arrays (float arrays are handed out as float32)."""

        def getter(arr: np.ndarray) -> Callable[[], np.ndarray]:
            if arr.dtype.kind == "f" and arr.dtype != np.float32:
                return lambda: arr.astype(np.float32)
            return lambda: arr

        return cls({k: getter(v) for k, v in arrays.items()}, dtypes, source)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    file = path / CONFIG_NAME if path.is_dir() else path
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (a transformers save_pretrained directory has one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot read the config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: the config must be a JSON object")
    return config


def open_safetensors(path: str | os.PathLike) -> tuple[TensorStore, list[SafetensorsFile]]:
    """The tensors of a directory (``model.safetensors`` or the sharded index) or of one ``.safetensors`` file."""
    path = Path(path)
    if path.is_file():
        files = {path.name: SafetensorsFile(path)}
        weight_map = {k: path.name for k in files[path.name].keys()}
    elif (path / INDEX_NAME).is_file():
        try:
            index = json.loads((path / INDEX_NAME).read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path / INDEX_NAME}: not a valid shard index ({exc})") from exc
        files = {}
        for shard in sorted(set(weight_map.values())):
            if os.path.basename(shard) != shard:
                raise CheckpointError(f"{path / INDEX_NAME}: shard name {shard!r} must be a plain file name")
            if not (path / shard).is_file():
                raise CheckpointError(f"{path / INDEX_NAME}: shard '{shard}' is missing")
            files[shard] = SafetensorsFile(path / shard)
        for key, shard in weight_map.items():
            if key not in files[shard]:
                raise CheckpointError(f"{path / INDEX_NAME}: tensor '{key}' is mapped to {shard}, which lacks it")
        for shard, f in files.items():
            extra = [k for k in f.keys() if weight_map.get(k) != shard]
            if extra:
                raise CheckpointError(f"{path / shard}: tensor '{extra[0]}' is not in the index's weight_map")
    elif (path / WEIGHTS_NAME).is_file():
        files = {WEIGHTS_NAME: SafetensorsFile(path / WEIGHTS_NAME)}
        weight_map = {k: WEIGHTS_NAME for k in files[WEIGHTS_NAME].keys()}
    else:
        raise CheckpointError(
            f"{path}: no {WEIGHTS_NAME} or {INDEX_NAME} (only safetensors checkpoints are read; pickled "
            f"pytorch_model.bin files are refused on purpose)"
        )
    getters = {k: (lambda f=files[s], k=k: f.get(k)) for k, s in weight_map.items()}
    dtypes = {k: files[s].dtype(k) for k, s in weight_map.items()}
    store = TensorStore(getters, dtypes, str(path), raw=lambda k: files[weight_map[k]].raw_bytes(k))
    return store, list(files.values())


def _shards(tensors: dict[str, np.ndarray], max_shard_size: int | None) -> list[list[str]]:
    names = sorted(tensors)
    if not max_shard_size:
        return [names]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        n = np.asarray(tensors[name]).nbytes
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def write_checkpoint(
    directory: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    dtypes: dict[str, str] | None = None,
    max_shard_size: int | None = None,
) -> list[Path]:
    """Write a transformers directory: ``config.json`` and ``model.safetensors`` (or shards of at most
    ``max_shard_size`` bytes + ``model.safetensors.index.json``). Every file is written atomically."""
    directory = Path(directory)
    if os.path.lexists(directory) and not directory.is_dir():
        raise CheckpointError(f"refusing to write into {directory}: it exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    groups = _shards(tensors, max_shard_size)
    written = []
    metadata = {"format": "pt"}
    if len(groups) == 1:
        target = directory / WEIGHTS_NAME
        write_safetensors(target, {k: tensors[k] for k in groups[0]}, dtypes, metadata)
        written.append(target)
        _remove_stale_index(directory)
    else:
        weight_map = {}
        total = 0
        for i, names in enumerate(groups):
            shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            write_safetensors(directory / shard, {k: tensors[k] for k in names}, dtypes, metadata)
            written.append(directory / shard)
            for k in names:
                weight_map[k] = shard
                total += np.asarray(tensors[k]).nbytes
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        stale = directory / WEIGHTS_NAME
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()  # a reader would otherwise see two layouts
        atomic_write(directory / INDEX_NAME, [json.dumps(index, indent=2, sort_keys=True).encode("utf-8") + b"\n"])
        written.append(directory / INDEX_NAME)
    atomic_write(directory / CONFIG_NAME, [json.dumps(config, indent=2, sort_keys=True).encode("utf-8") + b"\n"])
    written.append(directory / CONFIG_NAME)
    logger.info("saved %d tensors to %s", len(tensors), directory)
    return written


def _remove_stale_index(directory: Path) -> None:
    """A single-file save into a directory that held a sharded checkpoint: remove the old index (which a
    reader would prefer) and the shards it names."""
    index = directory / INDEX_NAME
    if not index.is_file():
        return
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = set()
    index.unlink()
    for shard in shards:
        p = directory / str(shard)
        if os.path.basename(str(shard)) == str(shard) and p.is_file() and not p.is_symlink():
            p.unlink()
