"""``from_pretrained`` / ``save_pretrained`` / ``dequantize_model``: checkpoints on disk in and out.

This module composes the layers below it: ``io`` reads a checkpoint into a transformers config dict and a
lazily-read :class:`~msbnb_pass.io.TensorStore`; ``models`` builds the network, asking a
:class:`~msbnb_pass.models.WeightSource` for each weight; the source defined here answers with the stored
float arrays, or, for a layer stored quantized (bitsandbytes 4-bit / LLM.int8 keys, or GGUF 4-bit), with
a quantized cell built directly from the stored bytes. A quantized layer therefore never exists in float,
and nothing is re-quantized. ``quantization_config=BitsAndBytesConfig(...)`` on a float checkpoint loads
it in float and runs the pass (``msbnb_pass.quantize``) on it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mindspore import nn

from .io import CheckpointError, TensorStore, open_safetensors, read_config, write_checkpoint
from .io.gguf_io import open_gguf, tokenizer_from_gguf
from .io.safetensors_io import FLOAT_DTYPES
from .models import BERT_BUFFERS, WeightSource, build_model, config_from_dict, name_parameters
from .models._layers import Embedding
from .nn import Embedding4bit, Embedding8bit, Linear4bit, Linear8bit, Linear8bitLt
from .nn.embedding import QuantEmbedding

logger = logging.getLogger(__name__)

_QUANT_CELLS = (Linear4bit, Linear8bitLt, Linear8bit)
_CPU_COMPUTE = ("float32", "float16")  # what a checkpoint's bnb_4bit_compute_dtype selects by itself
# what compute_dtype= may ask for: also the inexact opt-ins (bfloat16 products, int8 activations / W4A8)
_OVERRIDE_COMPUTE = ("float32", "float16", "bfloat16", "int8")


@dataclass
class LoadInfo:
    """What ``from_pretrained`` read: kept on the network as ``net.checkpoint_info`` so that
    ``save_pretrained`` writes unchanged tensors back in their stored dtype and JSON bytes."""

    source: str
    format: str  # "transformers" or "gguf"
    config: dict[str, Any]
    quantization_config: dict[str, Any] | None
    dtypes: dict[str, str] = field(default_factory=dict)
    quant_state_bytes: dict[str, bytes] = field(default_factory=dict)
    quantized_layers: list[str] = field(default_factory=list)
    unused_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)
    tokenizer: Any = None  # a GGUF's tokenizer, built from the same read (else tokenizer_from_pretrained)
    chat_template: str | None = None  # tokenizer.chat_template (GGUF) or tokenizer_config.json's chat_template


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _checkpoint_compute_dtype(qc: dict[str, Any] | None, override: str | None) -> str:
    if override is not None:
        if override not in _OVERRIDE_COMPUTE:
            raise ValueError(f"compute_dtype must be one of {_OVERRIDE_COMPUTE}, got {override!r}")
        return override
    wanted = str((qc or {}).get("bnb_4bit_compute_dtype") or "float32").replace("torch.", "")
    if wanted not in _CPU_COMPUTE:
        logger.info("bnb_4bit_compute_dtype=%s cannot run on MindSpore's CPU backend; computing in float32", wanted)
        return "float32"
    return wanted


class _StoreSource(WeightSource):
    """Weights from a TensorStore; quantized layers become quantized cells straight from the stored bytes."""

    def __init__(self, store: TensorStore, compute_dtype: str, threshold: float, backend: str | None, progress=None):
        super().__init__()
        self.store = store
        self.compute_dtype = compute_dtype
        self.threshold = threshold
        self.backend = backend
        self.used: set[str] = set()
        self.quantized: list[str] = []
        self.progress = progress

    def _mark(self, keys) -> None:
        keys = [k for k in keys if k not in self.used]
        self.used.update(keys)
        if self.progress is not None:
            self.progress.update(len(keys))

    def _tensors_under(self, prefix: str) -> tuple[list[str], dict[str, Any]]:
        """The stored keys under ``prefix`` and their tensors keyed relative to it (a cell's state dict)."""
        keys = self.store.with_prefix(prefix)
        return keys, {k[len(prefix) :]: self.store[k] for k in keys}

    def _build(self, kind: str, name: str, build):
        """``build()`` a quantized cell from stored tensors; any failure names the file and the layer/table."""
        try:
            return build()
        except (ValueError, KeyError, TypeError) as exc:  # CheckpointError included
            raise CheckpointError(f"{self.store.source}: {kind} '{name}': {exc}") from exc

    def array(self, name: str, shape: tuple[int, ...], init: str) -> np.ndarray:
        st = self.store
        if name not in st:
            raise CheckpointError(f"{st.source}: tensor '{name}' is missing (the model needs shape {list(shape)})")
        if st.dtype(name) not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{st.source}: tensor '{name}' is stored as {st.dtype(name)}, a float tensor was expected "
                f"(accepted: {FLOAT_DTYPES})"
            )
        value = st[name]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(
                f"{st.source}: tensor '{name}' has shape {list(value.shape)}, the config needs {list(shape)}"
            )
        self._mark([name])
        return np.ascontiguousarray(value, dtype=np.float32)

    def table(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        value = self.array(name, shape, "normal")
        if self.store.dtype(name) == "F16":
            return value.astype(np.float16)  # exact: the stored values are float16
        return value

    def embedding(self, name: str, num: int, dim: int, half_ok: bool = True) -> nn.Cell:
        """A table stored quantized (bitsandbytes' Embedding4bit keys, or int8 rows with ``SCB``) becomes an
        ``Embedding4bit`` / ``Embedding8bit`` from the stored bytes; a float table stays float."""
        st = self.store
        prefix = f"{name}."
        four = bool(st.with_prefix(f"{prefix}weight.quant_state."))
        eight = f"{prefix}SCB" in st
        if not (four or eight):
            return super().embedding(name, num, dim, half_ok)
        if not half_ok:  # the table is also the tied head's matmul operand
            raise CheckpointError(
                f"{st.source}: the tied embedding '{name}' is stored quantized; a tied head needs a float table"
            )
        keys, sub = self._tensors_under(prefix)
        table = self._build(
            "table",
            name,
            lambda: (Embedding4bit if four else Embedding8bit).from_bnb_state_dict(sub, "", layer_name=name),
        )
        if (table.num_embeddings, table.embedding_dim) != (num, dim):
            raise CheckpointError(
                f"{st.source}: '{prefix}weight' holds a [{table.num_embeddings}, {table.embedding_dim}] table, the "
                f"config needs [{num}, {dim}]"
            )
        self._mark(keys)
        return table

    def dense(self, name: str, in_features: int, out_features: int, has_bias: bool) -> nn.Cell:
        st = self.store
        prefix = f"{name}."
        quant_keys = st.with_prefix(f"{prefix}weight.quant_state.")
        int8 = f"{prefix}SCB" in st
        if not quant_keys and not int8:
            return super().dense(name, in_features, out_features, has_bias)
        keys, sub = self._tensors_under(prefix)
        if has_bias and "bias" not in sub:
            raise CheckpointError(f"{st.source}: tensor '{prefix}bias' is missing (the config gives this layer a bias)")
        if not has_bias and "bias" in sub:
            raise CheckpointError(f"{st.source}: tensor '{prefix}bias' is unexpected (the config has no bias here)")
        if not quant_keys:
            fmt = sub.get("weight_format")
            if fmt is not None and int(np.asarray(fmt).reshape(-1)[0]) != 0:
                raise CheckpointError(
                    f"{st.source}: tensor '{prefix}weight_format' is {int(np.asarray(fmt).reshape(-1)[0])}; only "
                    f"0 (row-major int8, what bitsandbytes >= 0.43 saves) is supported"
                )
            if st.dtype(f"{prefix}weight") != "I8":
                raise CheckpointError(
                    f"{st.source}: tensor '{prefix}weight' is {st.dtype(prefix + 'weight')}; an LLM.int8 weight is I8"
                )
        if quant_keys:
            layer = self._build(
                "layer",
                name,
                lambda: Linear4bit.from_bnb_state_dict(
                    sub, "", compute_dtype=self.compute_dtype, backend=self.backend, layer_name=name
                ),
            )
        else:
            layer = self._build(
                "layer",
                name,
                lambda: Linear8bitLt.from_bnb_state_dict(
                    sub, "", threshold=self.threshold, backend=self.backend, layer_name=name
                ),
            )
        if (layer.out_features, layer.in_features) != (out_features, in_features):
            raise CheckpointError(
                f"{st.source}: tensor '{prefix}weight' holds a [{layer.out_features}, {layer.in_features}] weight, "
                f"the config needs [{out_features}, {in_features}]"
            )
        self._mark(keys)
        self.quantized.append(name)
        return layer


def _chat_template(directory: Path) -> str | None:
    file = directory / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        template = json.loads(file.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError, AttributeError) as exc:
        logger.info("%s: no chat template (%s)", file, exc)
        return None
    return template if isinstance(template, str) else None


def _open(path: Path) -> tuple[dict[str, Any], TensorStore, str, Any, str | None]:
    if _is_gguf(path):
        contents = open_gguf(path)
        return contents.config, contents.store, "gguf", contents.tokenizer, contents.chat_template
    if path.is_file() and path.suffix == ".safetensors":
        config = read_config(path.parent)
    elif path.is_dir():
        config = read_config(path)
    else:
        raise CheckpointError(
            f"{path}: not a transformers directory (config.json + model.safetensors), a .safetensors file or a "
            f"GGUF file"
        )
    store, _ = open_safetensors(path)
    return config, store, "transformers", None, _chat_template(path if path.is_dir() else path.parent)


def from_pretrained(
    path: str | os.PathLike,
    quantization_config: Any = None,
    *,
    strict: bool = True,
    compute_dtype: str | None = None,
    max_seq_len: int = 8192,
    backend: str | None = None,
    progress: bool = False,
    **pass_kwargs: Any,
) -> nn.Cell:
    """Load a LLaMA or BERT checkpoint as a MindSpore network.

    Args:
        path: a transformers ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` or a
            sharded index; float fp32/fp16/bf16, or quantized by bitsandbytes: 4-bit nf4/fp4 with or without
            double quantization, 8-bit LLM.int8), or a GGUF file of a LLaMA model (Q4_0/Q4_1/Q8_0/F16/F32).
        quantization_config: a ``BitsAndBytesConfig`` (or QuantConfig) to quantize a float checkpoint on load
            through the pass; refused for a checkpoint that is already quantized.
        strict: refuse tensors the model does not use (missing tensors are always refused).
        compute_dtype: 4-bit matmul dtype: "float32" (exact products of the stored weights), "float16", or the
            inexact opt-ins "bfloat16" (bfloat16 products, float32 sums) and "int8" (activations quantized to
            int8 per block, W4A8; symmetric formats only). Default: the checkpoint's ``bnb_4bit_compute_dtype``
            when it is float32 or float16, else float32 (a checkpoint saying "bfloat16" computes exactly
            unless asked).
        max_seq_len: positions covered by the decoder's RoPE tables.
        backend: kernel backend of the quantized cells ("cpu" or "reference"; default: the kernels' choice).
        progress: show a progress bar over the tensors read.
        pass_kwargs: passed to ``msbnb_pass.quantize`` with ``quantization_config``.

    Returns the network, with ``net.checkpoint_info`` (a :class:`LoadInfo`; for a GGUF its ``tokenizer``) and
    ``net.config``.
    Raises :class:`~msbnb_pass.io.CheckpointError` naming the file and tensor for anything unusable.
    """
    path = Path(path)
    config_dict, store, fmt, tokenizer, chat_template = _open(path)
    try:
        model_config = config_from_dict(config_dict)
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: config: {exc}") from exc
    qc = config_dict.get("quantization_config")
    threshold = float((qc or {}).get("llm_int8_threshold", 6.0))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(store), desc=f"loading {path.name}", unit="tensor")
    source = _StoreSource(store, _checkpoint_compute_dtype(qc, compute_dtype), threshold, backend, bar)
    kwargs = {"max_seq_len": max_seq_len} if model_config.model_type == "llama" else {}
    try:
        net = build_model(model_config, source, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    ignored = [k for k in store if k in BERT_BUFFERS and model_config.model_type == "bert"]
    if getattr(model_config, "tie_word_embeddings", False) and "lm_head.weight" in store:
        ignored.append("lm_head.weight")  # a tied head saved anyway: it is the embedding
    unused = sorted(set(store) - source.used - set(ignored))
    if unused and strict:
        raise CheckpointError(
            f"{path}: {len(unused)} tensor(s) the model does not use, e.g. '{unused[0]}' (strict=False ignores them)"
        )
    if unused:
        logger.warning("%s: %d unused tensor(s), e.g. %s", path, len(unused), unused[0])
    info = LoadInfo(
        source=str(path),
        format=fmt,
        config=config_dict,
        quantization_config=qc,
        dtypes={k: store.dtype(k) for k in store},
        quantized_layers=list(source.quantized),
        unused_keys=unused,
        ignored_keys=ignored,
        tokenizer=tokenizer,
        chat_template=chat_template,
    )
    for k in store:
        if ".quant_state." in k:
            raw = store.raw_bytes(k)
            if raw is not None:
                info.quant_state_bytes[k] = raw
    if quantization_config is not None:
        if source.quantized:
            raise ValueError(
                f"{path} is already quantized ({len(source.quantized)} quantized layers, e.g. "
                f"'{source.quantized[0]}'); quantization_config applies to float checkpoints only"
            )
        from .passes import quantize

        net = quantize(net, quantization_config, **pass_kwargs).net
        name_parameters(net)
    net.checkpoint_info = info
    logger.info("loaded %s (%s): %d tensors, %d quantized layers", path, fmt, len(source.used), len(source.quantized))
    return net


def tokenizer_from_pretrained(path: str | os.PathLike) -> Any:
    """The ``tokenizers.Tokenizer`` of a checkpoint: built from a GGUF's metadata, or a transformers
    directory's ``tokenizer.json``."""
    path = Path(path)
    if _is_gguf(path):
        return tokenizer_from_gguf(path)
    directory = path if path.is_dir() else path.parent
    file = directory / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(file))


# ---- saving ------------------------------------------------------------------------------------------------------
def _quantized_cells(net: nn.Cell) -> dict[str, nn.Cell]:
    return {path: cell for path, cell in net.cells_and_names() if isinstance(cell, _QUANT_CELLS)}


def state_dict(net: nn.Cell) -> dict[str, np.ndarray]:
    """The network's transformers + bitsandbytes state dict: quantized cells as bitsandbytes' keys
    (``bnb_state_dict``), every other parameter under its path, as numpy arrays."""
    return _state_dict(net)[0]


def _state_dict(net: nn.Cell) -> tuple[dict[str, np.ndarray], set[str]]:
    tensors: dict[str, np.ndarray] = {}
    covered: set[str] = set()
    quant_keys: set[str] = set()
    tables = {path: cell for path, cell in net.cells_and_names() if isinstance(cell, QuantEmbedding)}
    for path, cell in {**_quantized_cells(net), **tables}.items():
        sd = cell.bnb_state_dict(f"{path}.")
        tensors.update(sd)
        quant_keys.update(k for k in sd if not k.endswith(".bias"))
        covered.update(f"{path}.{n}" for n, _ in cell.parameters_and_names())
    for name, param in net.parameters_and_names():
        if name not in covered:
            tensors[name] = param.asnumpy()
    return tensors, quant_keys


def _quantization_config(net: nn.Cell, cells: dict[str, nn.Cell]) -> dict[str, Any] | None:
    if not cells:
        return None
    info: LoadInfo | None = getattr(net, "checkpoint_info", None)
    if info is not None and info.quantization_config and sorted(cells) == sorted(info.quantized_layers):
        return info.quantization_config
    from .config import BitsAndBytesConfig

    float_dense = [p for p, c in net.cells_and_names() if isinstance(c, nn.Dense) and p != "lm_head"]
    kinds = {
        (type(c).__name__, getattr(c, "quant_type", None), getattr(c, "compress_statistics", None))
        for c in cells.values()
    }
    if len(kinds) == 1:
        kind, qt, nested = next(iter(kinds))
        cell = next(iter(cells.values()))
        if kind == "Linear4bit" and qt in ("nf4", "fp4"):
            compute = cell.compute_dtype_name
            return BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=qt,
                bnb_4bit_use_double_quant=bool(nested),
                # int8 activations (W4A8) are ours; the stored weights are the same, bitsandbytes computes float
                bnb_4bit_compute_dtype="float32" if compute == "int8" else compute,
                llm_int8_skip_modules=float_dense or None,
            ).to_dict()
        if kind == "Linear8bitLt":
            return BitsAndBytesConfig(
                load_in_8bit=True, llm_int8_threshold=cell.threshold, llm_int8_skip_modules=float_dense or None
            ).to_dict()
    # int4 (GGUF's Q4_0/Q4_1), weight-only int8 or a mix: bitsandbytes cannot load these; say so in the config
    return {
        "quant_method": "msbnb",
        "formats": sorted({f"{k}:{qt}" if qt else k for k, qt, _ in kinds}),
        "note": "written by msbnb_pass; not loadable by transformers + bitsandbytes (int4 / mixed formats)",
    }


def save_pretrained(
    net: nn.Cell,
    save_directory: str | os.PathLike,
    *,
    max_shard_size: int | None = None,
    float_dtype: str | None = None,
) -> list[Path]:
    """Write ``net`` as a transformers + bitsandbytes directory: ``config.json`` (with its
    ``quantization_config``) and ``model.safetensors`` (or shards of ``max_shard_size`` bytes + index).

    Safetensors only, every file written atomically (temporary file + ``os.replace``; a non-regular target
    is refused). Float tensors are stored in the dtype they were loaded from (``float_dtype`` = "F32",
    "F16" or "BF16" overrides), quantized tensors as they are, and the ``quant_state`` JSON of a layer that
    did not change is written back byte for byte: a loaded checkpoint saved again holds identical tensors.
    Returns the paths written."""
    config = getattr(net, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError("save_pretrained needs a network built by msbnb_pass.models (it has a .config)")
    if float_dtype is not None and float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {FLOAT_DTYPES}, got {float_dtype!r}")
    info: LoadInfo | None = getattr(net, "checkpoint_info", None)
    cells = _quantized_cells(net)
    tensors, quant_keys = _state_dict(net)
    dtypes: dict[str, str] = {}
    for name, arr in tensors.items():
        if name in quant_keys:
            if info is not None and ".quant_state." in name and name in info.quant_state_bytes:
                raw = info.quant_state_bytes[name]
                try:
                    same = json.loads(raw) == json.loads(bytes(arr.astype(np.uint8)))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    same = False
                if same:  # unchanged: the stored bytes, whatever JSON spelling wrote them
                    tensors[name] = np.frombuffer(raw, dtype=np.uint8).copy()
            continue
        stored = info.dtypes.get(name) if info is not None else None
        if float_dtype is not None:
            dtypes[name] = float_dtype
        elif stored in FLOAT_DTYPES:
            dtypes[name] = stored
    out = config.to_dict()
    qc = _quantization_config(net, cells)
    if qc is not None:
        out["quantization_config"] = qc
    return write_checkpoint(save_directory, out, tensors, dtypes, max_shard_size)


# ---- dequantizing --------------------------------------------------------------------------------------------------
@dataclass
class DequantizeReport:
    """One entry per replaced layer: its path, format and bits per weight.

    ``added_error`` is what dequantizing adds on top of the quantization error the layer already carried:
    0, since the float32 weight is the format's exact decoding (``code[q] * absmax``, ``+ block_offset`` for
    asymmetric int4, as ``msbnb_pass.formats`` defines it). The fused kernels decode in registers, where a
    fused multiply-add may round ``code * absmax + block_offset`` once instead of twice: for asymmetric int4
    the quantized layer's own weights can differ from these by one float32 ulp."""

    layers: list[tuple[str, str, float]] = field(default_factory=list)
    added_error: float = 0.0


class _Table(WeightSource):
    """The one float table a dequantized embedding is built from."""

    def __init__(self, value: np.ndarray):
        super().__init__()
        self.value = value

    def array(self, name: str, shape: tuple[int, ...], init: str) -> np.ndarray:
        return self.value


def dequantize_model(net: nn.Cell) -> nn.Cell:
    """transformers' ``dequantize()``: replace every quantized cell of ``net`` in place by a float
    ``nn.Dense`` holding its decoded weight (a quantized embedding by a float table), and return ``net``. What was replaced, and the error this added
    (none: see :class:`DequantizeReport`), is in ``net.dequantize_report``."""
    report = DequantizeReport()
    by_path = dict(net.cells_and_names())
    tables = {path: cell for path, cell in by_path.items() if isinstance(cell, QuantEmbedding)}
    for path, cell in {**_quantized_cells(net), **tables}.items():
        parent_path, _, attr = path.rpartition(".")
        parent = by_path[parent_path] if parent_path else net
        desc = getattr(cell, "quant_type", None) or type(cell).__name__
        report.layers.append((path, str(desc), float(cell.bits_per_weight())))
        if isinstance(cell, QuantEmbedding):  # back to a float table holding the decoded rows
            dense = Embedding(_Table(cell.dequantized_weight()), path, cell.num_embeddings, cell.embedding_dim)
        else:
            dense = cell.dequantize()
        if isinstance(parent, (nn.CellList, nn.SequentialCell)):
            parent[int(attr)] = dense
        else:
            setattr(parent, attr, dense)
    name_parameters(net)
    from .rewrite import forget_compiled_graphs

    forget_compiled_graphs(net)  # GRAPH_MODE: the next call compiles the float network
    info: LoadInfo | None = getattr(net, "checkpoint_info", None)
    if info is not None:
        info.quantized_layers = []
    net.dequantize_report = report
    logger.info("dequantized %d layers (exact: the float weights are the decoded quantized values)", len(report.layers))
    return net
