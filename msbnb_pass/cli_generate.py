"""``msbnb generate PATH --prompt "..." [--chat] [--max-new-tokens N]``: stream a checkpoint's answer.

Registered on the ``msbnb`` parser by :func:`add_generate_command`. Loads the checkpoint with
``from_pretrained`` (GGUF natively, or a transformers directory, optionally quantized on load), renders the
chat template when asked, streams the decoded text as tokens arrive and prints prefill and decode speed.
"""

from __future__ import annotations

import argparse
import sys
import time

from .errors import CLIError

QUANTIZE = ("none", "nf4", "fp4", "int8", "llm_int8")


def add_generate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a LLaMA checkpoint (GGUF or transformers dir), streamed")
    p.add_argument("path", help="a .gguf file or a transformers save_pretrained directory")
    p.add_argument("--prompt", required=True, help="the prompt text (the user message with --chat)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", default=None, help="system message with --chat (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling probability mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument(
        "--quantize", choices=QUANTIZE, default="none", help="quantize a float checkpoint on load (default none)"
    )
    p.add_argument(
        "--compute-dtype", choices=("float32", "bfloat16", "int8"), default=None, help="4-bit/8-bit compute mode"
    )
    p.add_argument(
        "--int8-head",
        action="store_true",
        help="compute the logits with an int8 copy of the float head (faster, not exact; default: exact)",
    )
    p.add_argument(
        "--plain-decode",
        action="store_true",
        help="decode with plain MindSpore ops instead of the library's decode kernels (for comparison)",
    )
    p.add_argument(
        "--native",
        action="store_true",
        help="run the decode kernels through ctypes instead of MindSpore's graph executor (4-bit models: the same "
        "tokens, faster; generate(decode_kernels='native'))",
    )
    p.add_argument("--no-warmup", action="store_true", help="do not compile the graphs before timing")
    p.set_defaults(func=_cmd_generate)


def _quantization_config(name: str, compute_dtype: str | None):
    from .config import BitsAndBytesConfig, QuantConfig

    if name == "none":
        if compute_dtype is not None:
            raise CLIError("--compute-dtype applies to layers quantized on load: give --quantize too")
        return None
    cd = compute_dtype or "float32"
    if name in ("nf4", "fp4"):
        return QuantConfig(bits=4, quant_type=name, group_size=64, compress_statistics=True, compute_dtype=cd)
    if name == "llm_int8":
        if compute_dtype is not None:
            raise CLIError("--compute-dtype does not apply to llm_int8 (its activations are int8 already)")
        return BitsAndBytesConfig(load_in_8bit=True)
    return QuantConfig(bits=8, compute_dtype=cd)


def _cmd_generate(args: argparse.Namespace) -> int:
    import mindspore as ms
    import numpy as np

    from .models.generation import apply_chat_template
    from .pretrained import from_pretrained, tokenizer_from_pretrained

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.native and args.plain_decode:
        raise CLIError("--native and --plain-decode exclude each other (native runs the decode kernels)")
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    t0 = time.perf_counter()
    net = from_pretrained(args.path, _quantization_config(args.quantize, args.compute_dtype))
    info = net.checkpoint_info
    tok = info.tokenizer if info.tokenizer is not None else tokenizer_from_pretrained(args.path)
    text = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        text = apply_chat_template(info.chat_template, messages)
    ids = np.array([tok.encode(text).ids], np.int32)
    print(f"loaded {args.path} in {time.perf_counter() - t0:.1f} s; prompt: {ids.shape[1]} tokens", file=sys.stderr)
    kw = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    kw["quantized_head"] = "int8" if args.int8_head else None
    kw["decode_kernels"] = False if args.plain_decode else ("native" if args.native else None)
    if not args.no_warmup:  # compile the prefill and decode graphs of these shapes (reused below)
        t = time.perf_counter()
        net.generate(ids, max_new_tokens=args.max_new_tokens, streamer=_stop_after(2), seed=args.seed, **kw)
        print(f"compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    stamps: list[float] = []
    new: list[int] = []
    shown = ""

    def stream(tokens) -> None:
        nonlocal shown
        stamps.append(time.perf_counter())
        new.append(int(tokens[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # an incomplete UTF-8 sequence waits for its next byte
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text

    start = time.perf_counter()
    net.generate(ids, max_new_tokens=args.max_new_tokens, streamer=stream, seed=args.seed, **kw)
    print()
    ttft = stamps[0] - start
    print(
        f"prefill: {ids.shape[1]} tokens in {ttft * 1e3:.0f} ms ({ids.shape[1] / ttft:.1f} tokens/s, time to first "
        f"token {ttft * 1e3:.0f} ms)",
        file=sys.stderr,
    )
    if len(stamps) > 1:
        dt = stamps[-1] - stamps[0]
        print(
            f"decode: {len(stamps) - 1} tokens in {dt:.2f} s ({(len(stamps) - 1) / dt:.1f} tokens/s)", file=sys.stderr
        )
    return 0


def _stop_after(n: int):
    count = [0]

    def streamer(tokens) -> bool:
        count[0] += 1
        return count[0] >= n

    return streamer
