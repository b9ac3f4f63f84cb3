"""Fine-tuning memory and speed: full fp32 vs LoRA vs QLoRA (NF4) vs QLoRA + AdamW8bit.

Each configuration runs in its own process (so its peak RSS is its own): build a LLaMA-like decoder,
rewrite it, run N jit train steps on random tokens, and report steps/s, the peak RSS above the process's
RSS after importing MindSpore while training (the model resident, its construction's temporaries
released; the construction's own peak is reported apart), and msbnb_pass.memory.estimate_network's number for the same network
(its ``runtime`` term included). The loss is ``msbnb_pass.models.causal_lm_loss`` (the fused sparse cross entropy)
in every configuration.

    PYTHONPATH=. python tools/bench_qlora.py --hidden 1024 --layers 8 --steps 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = ("full", "lora", "qlora", "qlora_adamw8bit")


def run_one(kind: str, args: argparse.Namespace) -> dict:
    os.environ.setdefault("GLOG_v", "3")
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn

    ms.set_device("CPU")
    from msbnb_pass import AdamW8bit, LoraConfig, get_qlora_model
    from msbnb_pass.memory import RSSMonitor, current_rss, estimate_network, release_memory
    from msbnb_pass.models import LlamaForCausalLM, causal_lm_loss
    from msbnb_pass.models.configs import LlamaConfig

    base_rss = current_rss()
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        max_position_embeddings=args.seq,
    )
    with RSSMonitor() as build_mon:
        net = LlamaForCausalLM(cfg, max_seq_len=args.seq)
        lora = LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
        if kind == "lora":
            get_qlora_model(net, lora, rules=None)
        elif kind.startswith("qlora"):
            get_qlora_model(net, lora, rules="nf4")
    release_memory()
    with RSSMonitor() as mon:  # training: the model is resident, construction's temporaries are gone
        params = net.trainable_params()
        opt_kind = "adamw8bit" if kind == "qlora_adamw8bit" else "adamw"
        opt = AdamW8bit(params, learning_rate=1e-4) if opt_kind == "adamw8bit" else nn.AdamWeightDecay(params, 1e-4)
        est = estimate_network(net, args.seq, args.batch, opt_kind)

        def forward(x, y):
            return causal_lm_loss(net(x), y)

        grad_fn = ms.value_and_grad(forward, None, opt.parameters)

        @ms.jit
        def step(x, y):
            loss, grads = grad_fn(x, y)
            opt(grads)
            return loss

        rng = np.random.default_rng(0)
        ids = rng.integers(0, args.vocab, (args.batch, args.seq + 1)).astype(np.int32)
        x, y = Tensor(ids[:, :-1]), Tensor(ids[:, 1:])
        net.set_train(True)
        losses = [float(step(x, y).asnumpy())]  # compile + first step
    with RSSMonitor() as steady:  # the steps after compiling
        t0 = time.perf_counter()
        for _ in range(args.steps):
            losses.append(float(step(x, y).asnumpy()))
        dt = time.perf_counter() - t0
    return {
        "kind": kind,
        "steps_per_s": args.steps / dt,
        "peak_rss_mb": (max(mon.peak, steady.peak) - base_rss) / 2**20,
        "steady_peak_rss_mb": (steady.peak - base_rss) / 2**20,
        "build_peak_rss_mb": (build_mon.peak - base_rss) / 2**20,
        "estimate_mb": est["total"] / 2**20,
        "estimate": est,
        "loss_first_last": [losses[0], losses[-1]],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--only", choices=CONFIGS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args)))
        return 0
    rows = []
    for kind in CONFIGS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", kind]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{kind:16s} {r['steps_per_s']:7.3f} steps/s  peak RSS +{r['peak_rss_mb']:8.1f} MB (steady +{r['steady_peak_rss_mb']:.0f}, build +{r['build_peak_rss_mb']:.0f})  "
            f"estimate {r['estimate_mb']:8.1f} MB  loss {r['loss_first_last'][0]:.3f}->{r['loss_first_last'][1]:.3f}",
            flush=True,
        )
    full = rows[0]["peak_rss_mb"]
    for r in rows[1:]:
        print(f"{r['kind']:16s} peak / full fp32 = {r['peak_rss_mb'] / full:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
