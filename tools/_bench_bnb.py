"""bitsandbytes' CPU layers for tools/bench_kernels.py, run in an interpreter that has torch + bitsandbytes.

Not part of msbnb_pass (torch and bitsandbytes are never dependencies). Measures, per (K, N) and M, the
median time per layer of bitsandbytes' Linear4bit (NF4, double quantization, fp32 compute) and
Linear8bitLt (threshold 0 and 6), plus torch's fp32 nn.Linear, cycling through enough distinct layers to
stream the weights from DRAM. Prints one JSON list on its last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench_kernels import result_row  # this script's directory is on sys.path; that module imports no MindSpore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="4096x4096")
    parser.add_argument("--m", default="1,32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--stream-bytes", type=int, default=780 << 20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    rows = []

    def nbytes(layer) -> int:
        total = sum(p.numel() * p.element_size() for p in layer.parameters())
        state = getattr(layer.weight, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                total += state.state2.absmax.numel() * 4
        scb = getattr(layer.weight, "SCB", None)
        if scb is not None:
            total += scb.numel() * 4
        return int(total)

    def build(variant: str, K: int, N: int, W):
        if variant == "torch_fp32":
            layer = torch.nn.Linear(K, N, bias=False)
            layer.weight.data.copy_(W)
            return layer
        if variant == "bnb_nf4_dq":
            layer = bnb.nn.Linear4bit(
                K, N, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4"
            )
            layer.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True)
            return layer.to("cpu")
        threshold = 0.0 if variant == "bnb_llm_int8_t0" else 6.0
        layer = bnb.nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=threshold)
        layer.weight = bnb.nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False)
        return layer.to("cpu")

    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        W = torch.randn(N, K) * 0.02
        for variant in ("torch_fp32", "bnb_nf4_dq", "bnb_llm_int8_t0", "bnb_llm_int8_t6"):
            first = build(variant, K, N, W)
            wbytes = nbytes(first)
            count = max(8, -(-args.stream_bytes // wbytes))
            layers = [first] + [build(variant, K, N, W) for _ in range(count - 1)]
            for M in (int(v) for v in args.m.split(",")):
                x = torch.randn(M, K)
                if variant == "bnb_llm_int8_t6":
                    x[:, :: max(1, K // 8)] *= 8.0
                with torch.no_grad():
                    for layer in layers:  # warm-up (bitsandbytes repacks 4-bit weights on the first CPU call)
                        layer(x)
                    times = []
                    for _ in range(args.reps):
                        start = time.perf_counter()
                        for layer in layers:
                            layer(x)
                        times.append((time.perf_counter() - start) / len(layers))
                t = statistics.median(times)
                row = result_row("wide", K, N, M, variant, t, wbytes, len(layers), None)
                row["versions"] = {"torch": torch.__version__, "bitsandbytes": bnb.__version__}
                rows.append(row)
            del layers, first
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
