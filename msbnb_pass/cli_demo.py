"""``msbnb demo``: a real sentence encoder quantized by every built-in family, with the accuracy-aware mix.

Registered on the ``msbnb`` parser by :func:`add_demo_command`. Argument parsing and printing only; the
work is :mod:`msbnb_pass.demo`.
"""

from __future__ import annotations

import argparse
import json
import sys

from .demo import DEFAULT_FAMILIES, SAMPLE_SENTENCES, DemoResult

__all__ = ["add_demo_command", "format_result"]


def add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="quantize all-MiniLM-L6-v2 (or a synthetic LLaMA-shaped model) with every family; compare with fp32",
    )
    p.add_argument(
        "--families", nargs="+", default=list(DEFAULT_FAMILIES), metavar="FAMILY", help="built-in rule families"
    )
    p.add_argument("--sentences", type=int, default=1000, help="real sentences embedded (default 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text", choices=("auto", "tweets", "pydoc"), default="auto", help="sentence source")
    p.add_argument(
        "--model",
        metavar="DIR",
        help="another float BERT or LLaMA checkpoint (a transformers save_pretrained directory)",
    )
    p.add_argument("--no-mixed", action="store_true", help="skip the accuracy-aware row")
    p.add_argument("--min-cosine", type=float, default=0.98, help="accuracy-aware: cosine to reach (default 0.98)")
    p.add_argument(
        "--max-bytes-ratio", type=float, default=1.2, help="accuracy-aware: weight bytes cap vs all-NF4 (default 1.2)"
    )
    p.add_argument(
        "--sample-sentences",
        type=int,
        default=SAMPLE_SENTENCES,
        help=f"sentences (not among the evaluated ones) the pass verifies and measures on (default {SAMPLE_SENTENCES})",
    )
    p.add_argument("--layers", action="store_true", help="print every layer's error (default: the 8 worst)")
    p.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    from .outputs import check_output_file, write_text_atomic

    if args.json:
        check_output_file(args.json, "--json")  # before minutes of work, not after
    result = run_demo(
        args.families,
        sentences=args.sentences,
        batch_size=args.batch_size,
        model_dir=args.model,
        text=args.text,
        mixed=not args.no_mixed,
        min_cosine=args.min_cosine,
        max_bytes_ratio=args.max_bytes_ratio,
        sample_sentences=args.sample_sentences,
        progress=lambda line: print(f"  .. {line}", file=sys.stderr, flush=True),
    )
    print(format_result(result, all_layers=args.layers))
    if args.json:
        write_text_atomic(args.json, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def format_result(result: DemoResult, all_layers: bool = False) -> str:
    """The demo's tables as text."""
    out = []
    for note in result.notes:
        out.append(f"NOTE: {note}")
    out.append(
        f"model: {result.model}; {result.sentences} {result.text_source} ({result.mean_tokens:.1f} tokens each on "
        f"average) in {result.batches} batches of {result.batch_size}; the pass verified on "
        f"{result.sample_sentences} other sentences"
    )
    for row in result.rows:
        out.append("")
        out.append(f"== {row.name}: rewrite summary (apply took {row.apply_seconds:.1f} s)")
        out.extend(f"   {line}" for line in row.summary.splitlines())

    # per-layer errors, one column per row
    paths = sorted({p for r in result.rows for p in r.layers})
    if paths:
        cols = [r for r in result.rows if r.layers]
        worst = {p: max(r.layers.get(p, {}).get("relative_error", 0.0) for r in cols) for p in paths}
        shown = paths if all_layers else sorted(paths, key=lambda p: -worst[p])[:8]
        width = max(len(p) for p in shown)
        out.append("")
        title = "per-layer relative error on the sample activations"
        out.append(f"{title} ({'all layers' if all_layers else '8 worst layers; --layers for all'}):")
        head = f"{'layer':{width}s} " + " ".join(f"{_short(r.name):>12s}" for r in cols)
        out.append(head)
        for p in shown if all_layers else shown:
            cells = []
            for r in cols:
                m = r.layers.get(p)
                cells.append(f"{m['relative_error']:12.4f}" if m else f"{'-':>12s}")
            out.append(f"{p:{width}s} " + " ".join(cells))

    base = next((r for r in result.rows if r.family == "nf4" and r.mixed is None), None)
    out.append("")
    out.append(
        f"embedding cosine to fp32 over {result.sentences} sentences; memory and time per batch of {result.batch_size}:"
    )
    head = (
        f"{'format':30s} {'mean cos':>9s} {'p1 cos':>8s} {'min cos':>8s} {'params MiB':>10s} {'linear MiB':>10s} "
        f"{'vs NF4':>7s} {'ms/batch':>9s} {'vs fp32':>8s}"
    )
    out.append(head)
    for r in [result.fp32, *result.rows]:
        vs = f"{r.linear_bytes / base.linear_bytes:7.3f}" if base else f"{'-':>7s}"
        speed = r.seconds_per_batch / result.fp32.seconds_per_batch
        out.append(
            f"{r.name:30s} {r.cosine_mean:9.5f} {r.cosine_p1:8.4f} {r.cosine_min:8.4f} {_mib(r.param_bytes):>10s} "
            f"{_mib(r.linear_bytes):>10s} {vs} {r.seconds_per_batch * 1e3:9.1f} {speed:7.2f}x"
        )
    mixed = next((r for r in result.rows if r.mixed), None)
    if mixed is not None:
        m = mixed.mixed
        counts = ", ".join(f"{k} x{v}" for k, v in m["counts"].items())
        out.append("")
        out.append(
            f"accuracy-aware: {counts}; on the sample sentences predicted cosine {m['predicted_cosine']:.5f}, "
            f"measured {m['measured_cosine']:.5f} (all-base {m['base_cosine']:.5f}); weight bytes "
            f"{m['bytes_ratio']:.3f}x all-base"
        )
    out.append(f"total {result.total_seconds:.0f} s")
    return "\n".join(out)


def _short(name: str) -> str:
    return name.split(" ")[0][:12]
