"""GGUF (llama.cpp) files of LLaMA-family models, read with the ``gguf`` package into a transformers-keyed
:class:`TensorStore` and a transformers ``LlamaConfig`` dict.

How each tensor type maps, without re-quantization:

* ``Q4_0`` (blocks of 32: fp16 ``d`` + 16 bytes, ``w = d * (q - 8)``) becomes this project's block-wise
  4-bit format ``int4`` with blocksize 32, code table ``[-8, ..., 7]`` and ``absmax = d``;
* ``Q4_1`` (fp16 ``d``, fp16 ``m`` + 16 bytes, ``w = d * q + m``) becomes asymmetric ``int4`` with code
  table ``[0, ..., 15]``, ``absmax = d`` and ``block_offset = m``. The fused 4-bit kernel decodes
  ``code[q] * absmax + block_offset`` with the code table it is given, so both run on the existing kernel
  and decode to exactly ``gguf``'s values (fp16 scales widen exactly to float32);
* the 4-bit codes are only re-ordered: GGUF keeps element ``j`` of a block in the low nibble of byte ``j``
  and element ``j + 16`` in its high nibble; bitsandbytes' layout keeps consecutive elements in a byte,
  the first in the high nibble;
* ``Q8_0`` (fp16 ``d`` + 32 int8, ``w = d * q``) has no cell with per-32-element int8 scales, so it is
  dequantized to float32. In LLaMA GGUFs it is the token embedding: a gather, not a matmul (and, when the
  head is tied to it, the head, which the pass keeps in float by default anyway);
* ``F32``, ``F16``, ``BF16`` are read as float32. Other types (the k-quants ...) are dequantized by
  ``gguf`` itself to float32, with a warning naming them.

llama.cpp permutes the rows of ``attn_q`` and ``attn_k`` so that RoPE rotates adjacent pairs; the rows are
permuted back here (whole rows, so whole 32-blocks: still no re-quantization) to transformers'
rotate-half layout, which the decoder in ``msbnb_pass.models`` uses.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..formats.blockwise import pack_4bit
from ..formats.quant_state import QuantState
from .errors import CheckpointError
from .transformers_io import TensorStore

logger = logging.getLogger(__name__)

Q4_BLOCK = 32
DIRECT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _gguf():
    try:
        import gguf
    except ImportError as exc:  # a declared dependency; say what to install if it is missing
        raise ImportError("reading GGUF files needs the 'gguf' package: pip install gguf") from exc
    return gguf


def hf_name(gguf_name: str) -> str | None:
    """The transformers key of a GGUF tensor name (None for names this reader does not know)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order undoing llama.cpp's q/k permutation: ``hf_rows = gguf_rows[order]``."""
    if n_rows % n_head or (n_rows // n_head) % 2:
        raise CheckpointError(f"cannot undo the q/k row permutation: {n_rows} rows over {n_head} heads")
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """llama.cpp's permutation (for writing test files): ``gguf_rows = hf_rows[order]``."""
    return np.argsort(unpermute_rows(n_rows, n_head))


class _Reader:
    def __init__(self, path: Path):
        gguf = _gguf()
        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path), "r")
        except Exception as exc:  # gguf raises ValueError/struct.error/... on damaged files
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
        self.gguf = gguf

    def field(self, key: str, default: Any = None) -> Any:
        f = self.reader.fields.get(key)
        if f is None:
            return default
        return f.contents()

    def require(self, key: str) -> Any:
        value = self.field(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata '{key}' is missing")
        return value


def _llama_config(r: _Reader, tensor_names: set[str]) -> dict[str, Any]:
    arch = r.require("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{r.path}: general.architecture is {arch!r}; only 'llama' GGUFs are supported")
    n_head = int(r.require(f"{arch}.attention.head_count"))
    hidden = int(r.require(f"{arch}.embedding_length"))
    tokens = r.field("tokenizer.ggml.tokens")
    vocab = r.field(f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        raise CheckpointError(
            f"{r.path}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size"
        )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(r.require(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(r.require(f"{arch}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(r.field(f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": int(r.field(f"{arch}.attention.key_length", hidden // n_head)),
        "rms_norm_eps": float(r.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(r.field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(r.field(f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
    }
    for key, name in (("bos_token_id", "tokenizer.ggml.bos_token_id"), ("eos_token_id", "tokenizer.ggml.eos_token_id")):
        value = r.field(name)
        if value is not None:
            config[key] = int(value)
    return config


def _q4(data: np.ndarray, rows: int, cols: int, with_min: bool, name: str):
    """GGUF Q4_0/Q4_1 bytes -> (codes [rows, cols] uint8, d [rows, cols/32] float32, m or None)."""
    per_block = 20 if with_min else 18
    if cols % Q4_BLOCK:
        raise CheckpointError(f"tensor '{name}': rows of {cols} elements are not whole {Q4_BLOCK}-blocks")
    nb = cols // Q4_BLOCK
    raw = np.asarray(data, dtype=np.uint8)
    if raw.size != rows * nb * per_block:
        raise CheckpointError(f"tensor '{name}': {raw.size} bytes, expected {rows * nb * per_block} for {rows}x{cols}")
    blocks = raw.reshape(rows, nb, per_block)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0].astype(np.float32) if with_min else None
    qs = blocks[..., per_block - 16 :]
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).reshape(rows, cols)
    return codes, d, m


def _q8_0(data: np.ndarray, rows: int, cols: int, name: str) -> np.ndarray:
    if cols % Q4_BLOCK:
        raise CheckpointError(f"tensor '{name}': rows of {cols} elements are not whole {Q4_BLOCK}-blocks")
    raw = np.asarray(data, dtype=np.uint8)
    nb = cols // Q4_BLOCK
    if raw.size != rows * nb * 34:
        raise CheckpointError(f"tensor '{name}': {raw.size} bytes, expected {rows * nb * 34} for {rows}x{cols}")
    blocks = raw.reshape(rows, nb, 34)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32)
    return (q * d[..., None]).reshape(rows, cols)


@dataclass
class GGUFContents:
    """What a GGUF file holds, read once: the transformers config dict, the tensors (transformers keys) and
    the tokenizer built from its metadata (None when it has none, or ``tokenizers`` is not installed)."""

    config: dict[str, Any]
    store: TensorStore
    tokenizer: Any = None
    chat_template: str | None = None  # tokenizer.chat_template (Jinja), for instruct models


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], TensorStore]:
    """A LLaMA GGUF file as (transformers config dict, TensorStore with transformers keys).

    4-bit tensors come as this project's int4 state-dict entries (``<name>.weight`` packed,
    ``.absmax``, ``.quant_map``, ``.block_offset``, ``.quant_state.msbnb__int4``), others as float32."""
    contents = open_gguf(path, tokenizer=False)
    return contents.config, contents.store


def open_gguf(path: str | os.PathLike, tokenizer: bool = True) -> GGUFContents:
    """:func:`read_gguf` plus the tokenizer, from one parse of the file (gguf's reader parses all metadata,
    tens of thousands of vocabulary strings, when it opens a file)."""
    path = Path(path)
    r = _Reader(path)
    config, store = _read_tensors(r)
    tok = None
    if tokenizer and r.field("tokenizer.ggml.tokens") is not None:
        try:
            tok = _tokenizer(r)
        except (ImportError, CheckpointError) as exc:
            logger.info("%s: no tokenizer (%s)", path, exc)
    template = r.field("tokenizer.chat_template")
    return GGUFContents(config, store, tok, str(template) if template else None)


def _read_tensors(r: _Reader) -> tuple[dict[str, Any], TensorStore]:
    path = r.path
    names = {t.name for t in r.reader.tensors}
    config = _llama_config(r, names)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for t in r.reader.tensors:
        key = hf_name(t.name)
        if key is None:
            if t.name.startswith("rope_freqs") or t.name.endswith("rope_freqs.weight"):
                raise CheckpointError(f"{path}: tensor '{t.name}' (rope frequency factors) is not supported")
            raise CheckpointError(f"{path}: tensor '{t.name}' has no LLaMA equivalent this reader knows")
        qtype = t.tensor_type.name
        shape = tuple(int(d) for d in reversed([int(x) for x in t.shape]))  # numpy order: (out, in)
        order = None
        if t.name.endswith("attn_q.weight"):
            order = unpermute_rows(shape[0], n_head)
        elif t.name.endswith("attn_k.weight"):
            order = unpermute_rows(shape[0], n_kv)
        if qtype in ("Q4_0", "Q4_1"):
            if len(shape) != 2:
                raise CheckpointError(f"{path}: tensor '{t.name}': {qtype} is only read for 2-D weights, got {shape}")
            codes, d, m = _q4(t.data, shape[0], shape[1], qtype == "Q4_1", t.name)
            if order is not None:
                codes, d = codes[order], d[order]
                m = None if m is None else m[order]
            code = np.arange(16, dtype=np.float32) - (np.float32(8.0) if qtype == "Q4_0" else np.float32(0.0))
            state = QuantState(
                quant_type="int4",
                blocksize=Q4_BLOCK,
                dtype="float32",
                shape=shape,
                absmax=d.reshape(-1),
                code=code,
                block_offset=None if m is None else m.reshape(-1),
            )
            arrays[key] = pack_4bit(codes)
            arrays.update(state.to_state_dict(key))
            continue
        if qtype == "Q8_0":
            values = _q8_0(t.data, shape[0], shape[1] if len(shape) == 2 else 1, t.name).reshape(shape)
            logger.info("%s: Q8_0 dequantized to float32 (no cell has per-32 int8 scales)", t.name)
            stored = "F32"
        elif qtype in ("F32", "F16", "BF16"):
            raw = np.asarray(t.data)
            values = (
                (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
                if qtype == "BF16"
                else raw.astype(np.float32)
            ).reshape(shape)
            stored = qtype
        else:
            logger.warning("%s: %s has no direct 4/8-bit mapping; dequantized to float32 by gguf", t.name, qtype)
            values = np.asarray(r.gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
            stored = "F32"
        if order is not None:
            values = values[order]
        arrays[key] = np.ascontiguousarray(values, dtype=np.float32)
        dtypes[key] = stored
    for k, v in arrays.items():
        if k not in dtypes:
            dtypes[k] = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}.get(np.dtype(v.dtype), "U8")
    return config, TensorStore.from_arrays(arrays, dtypes, str(path))


def tokenizer_from_gguf(path: str | os.PathLike) -> Any:
    """A ``tokenizers.Tokenizer`` (byte-level BPE) built from the GGUF's ``tokenizer.ggml.*`` metadata."""
    return _tokenizer(_Reader(Path(path)))


def _tokenizer(r: _Reader) -> Any:
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError as exc:
        raise ImportError("building a tokenizer needs the 'tokenizers' package: pip install tokenizers") from exc
    path = r.path
    model = r.require("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = r.field("tokenizer.ggml.pre", "default")
    tokens = [str(t) for t in r.require("tokenizer.ggml.tokens")]
    merges = [str(m) for m in r.require("tokenizer.ggml.merges")]
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise CheckpointError(f"{path}: merge {m!r} is not two space-separated tokens")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif pre in ("gpt2", "default"):
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported (accepted: 'smollm', 'gpt2', 'default')"
        )
    tok.decoder = decoders.ByteLevel()
    types = r.field("tokenizer.ggml.token_type")
    if types is not None:
        control = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if int(t) == 3]
        if control:
            tok.add_special_tokens(control)
    return tok
