"""Time and memory of the pass on a LLaMA-shaped random network (~0.8B parameters, ~3.2 GB fp32).

Run by hand (needs ~8 GB of memory; about a minute to build the network):

    python tools/bench_pass.py                      # hidden 2048, 16 layers, MLP 5504, NF4 + double quant
    python tools/bench_pass.py --layers 4 --json r.json

It builds the network (attention projections as primitive-attribute matmuls, MLP as nn.Dense, a tied
embedding/head), then runs ``msbnb_pass.apply(net, "nf4")`` with per-layer verification and reports:
the wall time of the pass, the peak resident memory during it and the resident memory after it, both
as a ratio to the fp32 network's own memory (RSS above the process's baseline after MindSpore and the
kernels are loaded, measured by sampling /proc every 2 ms). Targets: < 30 s, peak < 1.15x, after < 0.25x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test zoo's network definitions


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--mlp", type=int, default=5504)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rules", default="nf4")
    parser.add_argument("--no-verify", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import mindspore as ms
    from mindspore import nn

    import msbnb_pass as mb
    from msbnb_pass.memory import RSSMonitor, current_rss, release_memory
    from tests.zoo import LlamaLike

    ms.set_device("CPU")
    mb.apply(nn.SequentialCell([nn.Dense(128, 128)]), args.rules)  # load kernels, MindSpore ops, caches
    release_memory()
    base = current_rss()
    start = time.perf_counter()
    net = LlamaLike(vocab=args.vocab, d=args.hidden, hidden=args.mlp, layers=args.layers)
    release_memory()
    build_s = time.perf_counter() - start
    net_rss = current_rss() - base
    params = mb.get_model_size(net)
    print(
        f"network: {params['num_params'] / 1e9:.3f} B parameters, {params['total_bytes'] / 2**30:.2f} GiB fp32 "
        f"(RSS +{net_rss / 2**30:.2f} GiB, built in {build_s:.1f} s)",
        flush=True,
    )
    with RSSMonitor() as monitor:
        start = time.perf_counter()
        result = mb.apply(net, args.rules, verify=not args.no_verify, progress=False)
        seconds = time.perf_counter() - start
    after = current_rss() - base
    peak = monitor.peak - base
    print(result.summary())
    report = {
        "layers": args.layers,
        "hidden": args.hidden,
        "mlp": args.mlp,
        "vocab": args.vocab,
        "rules": args.rules,
        "num_params": params["num_params"],
        "fp32_bytes": params["total_bytes"],
        "net_rss": net_rss,
        "seconds": seconds,
        "peak_rss": peak,
        "after_rss": after,
        "peak_ratio": peak / net_rss,
        "after_ratio": after / net_rss,
        "rewritten": len(result.quantized),
        "verified": len(result.report.layers),
        "kernel_threads": mb.kernels.get_num_threads() if "cpu" in mb.kernels.available_backends() else None,
    }
    print(
        f"\npass: {seconds:.1f} s for {len(result.quantized)} layers ({'with' if not args.no_verify else 'without'} "
        f"per-layer verification); peak RSS {peak / 2**30:.2f} GiB = {report['peak_ratio']:.3f}x the fp32 "
        f"network; after {after / 2**30:.2f} GiB = {report['after_ratio']:.3f}x"
    )
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
