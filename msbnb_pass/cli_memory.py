"""``msbnb estimate``: training memory of full fine-tuning, LoRA and QLoRA for a model description."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .memory import GB, QLoRAStats

__all__ = ["add_memory_commands"]

ROWS = (
    ("full fine-tuning, AdamW", "full", "adamw"),
    ("LoRA (16-bit base), AdamW", "lora", "adamw"),
    ("QLoRA (NF4+DQ base), AdamW", "qlora", "adamw"),
    ("QLoRA (NF4+DQ base), AdamW8bit", "qlora", "adamw8bit"),
)


def add_memory_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="training memory (weights, gradients, optimizer states, activations) of full / LoRA / QLoRA",
    )
    p.add_argument("--hidden-size", type=int, default=4096)
    p.add_argument("--num-layers", type=int, default=32)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--intermediate-size", type=int, default=None, help="default: 8/3 hidden, rounded up to 256")
    p.add_argument("--num-heads", type=int, default=None, help="attention heads (default hidden / 128)")
    p.add_argument("--num-kv-heads", type=int, default=None, help="key/value heads (default: the heads)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dtype-bytes", type=int, choices=(2, 4), default=2, help="2: fp16/bf16 (default), 4: fp32")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args: argparse.Namespace) -> int:
    stats = QLoRAStats(
        args.hidden_size,
        args.num_layers,
        args.seq_length,
        args.vocab_size,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        batch_size=args.batch_size,
        lora_r=args.lora_r,
        dtype_bytes=args.dtype_bytes,
    )
    rows: list[dict[str, Any]] = []
    for label, method, opt in ROWS:
        for recompute in (False, True):
            d = stats.breakdown(method, opt, recompute)
            d.update(method=method, optimizer=opt, recompute=recompute, label=label)
            d["total"] = d["weights"] + d["gradients"] + d["optimizer_states"] + d["activations"]
            rows.append(d)
    if args.json:
        print(json.dumps({"stats": repr(stats), "parameters": stats.parameter_count(), "rows": rows}, indent=2))
        return 0
    print(
        f"{stats!r}: {stats.parameter_count():,d} parameters, LoRA r={stats.lora_r}: {stats.lora_parameter_count():,d}"
    )
    print(f"{'':34s} {'weights':>9s} {'grads':>9s} {'optim':>9s} {'activ.':>9s} {'total GB':>9s}  recompute")
    for d in rows:
        cells = [d[k] / GB for k in ("weights", "gradients", "optimizer_states", "activations", "total")]
        print(f"{d['label']:34s} " + " ".join(f"{c:9.2f}" for c in cells) + f"  {'yes' if d['recompute'] else 'no'}")
    return 0
