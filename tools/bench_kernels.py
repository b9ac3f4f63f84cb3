"""Benchmark the fused kernels against fp32 nn.Dense (and bitsandbytes' CPU layers, when available).

Run by hand (not a test); it takes several minutes:

    python tools/bench_kernels.py                        # the full table, printed and as JSON
    python tools/bench_kernels.py --quick                # one shape, M in {1, 32}
    python tools/bench_kernels.py --bnb-python /path/to/venv/bin/python   # + bitsandbytes in the same run
    python tools/bench_kernels.py --sections stack,small  # only the decode-style sections
    python tools/bench_kernels.py --sections small --variants fp32,nf4_dq --profile /tmp/prof  # + where the time goes

Three sections, each timing every variant the way users run it (compiled under ``ms.jit``, several layers
per call) with fp32 ``nn.Dense`` in the same run:

* ``wide`` -- single layers of LLaMA-7B shapes at M in {1, 8, 32, 128, 512}: each call runs L distinct layers
  on the same input and sums their outputs;
* ``stack`` -- a stack of 48 square 4096x4096 layers applied one after the other (``y = layer(y)``), as a
  decoder runs them, at M in {1, 32, 128} (``--stack-layers``, ``--stack-m``);
* ``small`` -- the linears of one SmolLM2-135M forward at T = 1 (30 x q, k, v, o, gate, up, down and the
  49152 x 576 head: 211 layers, 134M weights), one compiled call, where per-call overheads decide speed.
* ``dx`` (not in the default run) -- training shapes: the forward and the input gradient (``ms.grad`` of
  sum(y^2) with respect to x, as QLoRA's frozen base layers run them: no weight gradient) of ``--dx-layers``
  distinct 4096x4096 layers on the same input at M in ``--dx-m`` (default 512, 2048), one compiled call.

For every (K, N) and M, each variant runs as a chain of L distinct layers under ``ms.jit`` (one compiled
call sums the outputs of all layers on the same input), with L chosen so that the variant's weights
(at least --stream-mb, default max(3x the L3 cache, 512 MB), and at least 8 layers so the
cost of one jit call is spread thin) are streamed from DRAM on every call instead of sitting
in the last-level cache. Reported: the median time per layer over --reps calls, the ratio
fp32 time / variant time (higher is faster), and the effective weight bandwidth (weight bytes per layer
/ time). fp32 and every variant are measured in the same process, interleaved by shape, so ratios are
comparable even on a noisy machine. bitsandbytes (torch) layers run in a second interpreter started by
this one (torch and MindSpore do not share a process well), with the same L and shapes.

``--load cpu[:N]`` / ``--load mem[:N]`` runs the whole benchmark next to N other processes (default 1) that
keep a core busy (a Python loop) or stream memory (numpy copies of 256 MiB arrays), as another job on the
machine would: run once without and once with it, and compare the ``x fp32`` columns to see whether the
quantized cells lose more of their speed under load than fp32 ``nn.Dense`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_v", "3")

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
MS = [1, 8, 32, 128, 512]
SECTIONS = ["wide", "stack", "small"]  # and "dx", on request
# at least this many layers per chain, so the ~1 ms cost of one jit call is spread thin
MIN_LAYERS = 8
VARIANTS = ["fp32", "nf4_dq", "fp4_dq", "int4", "int8", "llm_int8_t0", "llm_int8_t6"]
# also available: any 4-bit or int8 variant with a compute dtype suffix, e.g. nf4_dq@bfloat16, int8@int8


LOADS = {
    # another job keeping one core busy
    "cpu": "while True:\n    pass\n",
    # another job streaming memory: copies between two 256 MiB arrays, far beyond any L3
    "mem": (
        "import numpy as np\n"
        "a = np.ones(1 << 26, np.float32)\n"
        "b = np.empty_like(a)\n"
        "while True:\n"
        "    np.copyto(b, a)\n"
        "    np.copyto(a, b)\n"
    ),
}


def parse_load(spec: str) -> tuple[str, int]:
    """``"cpu"``, ``"mem:2"``, ... -> (kind, process count); ``"none"`` -> ("none", 0)."""
    kind, _, count = spec.partition(":")
    if kind == "none" and not count:
        return "none", 0
    if kind not in LOADS or not (count == "" or (count.isdigit() and int(count) >= 1)):
        raise argparse.ArgumentTypeError(f"--load must be none, cpu[:N] or mem[:N] with N >= 1 processes, got {spec!r}")
    return kind, int(count or 1)


def start_load(kind: str, count: int) -> list[subprocess.Popen]:
    """``count`` background processes of the given kind (see LOADS); stop them with :func:`stop_load`."""
    if kind == "none":
        return []
    procs = [
        subprocess.Popen([sys.executable, "-c", LOADS[kind]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]
    time.sleep(1.0)  # let them start (the memory load allocates and touches its arrays first)
    for proc in procs:
        if proc.poll() is not None:
            stop_load(procs)
            raise RuntimeError(f"the {kind} load process exited at once (code {proc.returncode})")
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def l3_bytes() -> int:
    """Size of the last-level cache (from sysfs), or 260 MB if it cannot be read."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        value = int(size.rstrip("KMG")) * mult
        if level >= 3:
            best = max(best, value)
    return best or 260 << 20


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_layers(variant: str, K: int, N: int, count: int, rng: np.random.Generator, scale: float = 0.02):
    """``count`` distinct layers of one variant (the same values, separate memory)."""
    from mindspore import Tensor, nn

    from msbnb_pass import Linear4bit, Linear8bit, Linear8bitLt

    W = (rng.standard_normal((N, K), dtype=np.float32) * scale).astype(np.float32)
    variant, _, compute = variant.partition("@")
    opts = {"compute_dtype": compute} if compute else {}
    if variant == "fp32":
        return [nn.Dense(K, N, weight_init=Tensor(W.copy()), has_bias=False) for _ in range(count)]
    if variant in ("nf4_dq", "fp4_dq", "int4"):
        qt = {"nf4_dq": "nf4", "fp4_dq": "fp4", "int4": "int4"}[variant]
        first = Linear4bit(K, N, False, qt, 64, variant != "int4", weight=W, **opts)
        packed, state = first.weight.asnumpy(), first.quant_state
        return [first] + [
            Linear4bit(K, N, False, qt, 64, variant != "int4", quant_state=state, packed=packed.copy(), **opts)
            for _ in range(count - 1)
        ]
    if variant == "int8":
        first = Linear8bit(K, N, False, has_fp16_weights=False, weight=W, **opts)
        return [first] + [Linear8bit(K, N, False, has_fp16_weights=False, weight=W, **opts) for _ in range(count - 1)]
    if variant.startswith("llm_int8"):
        threshold = 0.0 if variant.endswith("t0") else 6.0
        first = Linear8bitLt(K, N, False, threshold=threshold, weight=W)
        cb, scb = first.weight.asnumpy(), first.SCB.asnumpy()
        return [first] + [
            Linear8bitLt(K, N, False, threshold=threshold, CB=cb.copy(), SCB=scb) for _ in range(count - 1)
        ]
    raise ValueError(variant)


def weight_bytes(layer) -> int:
    return int(sum(p.size * p.itemsize for p in layer.get_parameters()))


def time_chain(layers, x, reps: int) -> float:
    """Median seconds per layer of one jit call that runs every layer on ``x``."""
    return median_call_seconds(chain_net(layers), x, reps) / len(layers)


def interleaved(layer_sets: dict, inputs: dict, reps: int) -> dict[str, tuple[float, float | None]]:
    """Every variant once per round, ``reps`` rounds: {variant: (median s/layer, median of the per-round
    ratios fp32 time / variant time)}. On a shared machine whose load changes within seconds, the ratio of
    two calls made back to back is steadier than the ratio of two separate medians."""
    runners = {v: chain_runner(layers) for v, (layers, _) in layer_sets.items()}
    for v, run in runners.items():
        run(inputs[v]).asnumpy()  # compile + warm up
    times: dict[str, list[float]] = {v: [] for v in runners}
    for _ in range(reps):
        for v, run in runners.items():
            start = time.perf_counter()
            run(inputs[v]).asnumpy()
            times[v].append((time.perf_counter() - start) / len(layer_sets[v][0]))
    out = {}
    for v, ts in times.items():
        ratio = None
        if "fp32" in times:
            ratio = statistics.median(f / t for f, t in zip(times["fp32"], ts, strict=True))
        out[v] = (statistics.median(ts), ratio)
    return out


def chain_net(layers):
    """A Cell running every layer on its input and summing the outputs."""
    from mindspore import nn

    class Chain(nn.Cell):
        def __init__(self, cells):
            super().__init__()
            self.blocks = nn.CellList(cells)

        def construct(self, inp):
            y = self.blocks[0](inp)
            for i in range(1, len(self.blocks)):
                y = y + self.blocks[i](inp)
            return y

    return Chain(layers)


def jit_runner(net):
    """``net`` as an ``ms.jit`` function."""
    import mindspore as ms

    @ms.jit
    def run(inp):
        return net(inp)

    return run


def chain_runner(layers):
    return jit_runner(chain_net(layers))


def median_call_seconds(net, x, reps: int) -> float:
    """Median wall time of one ``ms.jit`` call of ``net(x)`` (compiled and warmed up first)."""
    run = jit_runner(net)
    run(x).asnumpy()  # compile + warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run(x).asnumpy()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def input_for(M: int, K: int, variant: str, rng: np.random.Generator):
    from mindspore import Tensor

    x = rng.standard_normal((M, K), dtype=np.float32)
    if variant == "llm_int8_t6":
        x[:, :: max(1, K // 8)] *= 8.0  # a few systematic outlier features (|x| >= 6), as in large models
    return Tensor(x)


def time_stack(layers, x, reps: int) -> float:
    """Median seconds per layer of one jit call applying the layers one after the other."""
    from mindspore import nn

    class Stack(nn.Cell):
        def __init__(self, cells):
            super().__init__()
            self.blocks = nn.CellList(cells)

        def construct(self, inp):
            for block in self.blocks:
                inp = block(inp)
            return inp

    return median_call_seconds(Stack(layers), x, reps) / len(layers)


# SmolLM2-135M: hidden 576, 9 query heads and 3 key/value heads of 64, SwiGLU 1536, 30 layers, vocab 49152
SMOL = {"hidden": 576, "kv": 192, "ffn": 1536, "layers": 30, "vocab": 49152}


def smol_linears(variant: str, rng: np.random.Generator):
    """The 211 linear layers of SmolLM2-135M in one variant: per block q, k, v, o, gate, up, down, then the head."""
    h, kv, f = SMOL["hidden"], SMOL["kv"], SMOL["ffn"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, f), (h, f), (f, h)]
    blocks = [[make_layers(variant, k, n, 1, rng, 1 / np.sqrt(k))[0] for k, n in shapes] for _ in range(SMOL["layers"])]
    head = make_layers(variant, h, SMOL["vocab"], 1, rng, 1 / np.sqrt(h))[0]
    return blocks, head


def time_smol_forward(blocks, head, x, reps: int) -> float:
    """Median seconds of one jit call running every linear of a T = 1 forward (attention and norms left out:
    q/k/v/o and gate/up/down are fed from the running hidden state so each layer's input depends on the last)."""
    return median_call_seconds(smol_forward_net(blocks, head), x, reps)


def smol_forward_net(blocks, head):
    """The cell :func:`time_smol_forward` times."""
    from mindspore import nn

    class Block(nn.Cell):
        def __init__(self, cells):
            super().__init__()
            self.q, self.k, self.v, self.o, self.gate, self.up, self.down = cells

        def construct(self, hs):
            att = self.q(hs) + (self.k(hs) + self.v(hs)).sum() * 1e-3
            hs = hs + self.o(att)
            return hs + self.down(self.gate(hs) * self.up(hs))

    class Linears(nn.Cell):
        def __init__(self):
            super().__init__()
            self.blocks = nn.CellList([Block(b) for b in blocks])
            self.head = head

        def construct(self, hs):
            for block in self.blocks:
                hs = block(hs)
            return self.head(hs)

    return Linears()


def profile_small(variants, reps: int, rng, out_dir: str) -> list[dict]:
    """Where the time of the ``small`` forward goes, from MindSpore's profiler (per-op start and duration
    on the host): per op type the count and time per forward, and the idle gaps between consecutive ops
    (the graph executor's dispatch cost), split by the kind of op before the gap."""
    import glob
    from collections import defaultdict

    from mindspore import Tensor
    from mindspore.profiler import Profiler

    x = Tensor(rng.standard_normal((1, SMOL["hidden"]), dtype=np.float32))
    rows = []
    for variant in variants:
        blocks, head = smol_linears(variant, rng)
        run = jit_runner(smol_forward_net(blocks, head))
        for _ in range(3):
            run(x).asnumpy()
        path = Path(out_dir) / variant
        prof = Profiler(output_path=str(path))
        start = time.perf_counter()
        for _ in range(reps):
            run(x).asnumpy()
        wall = (time.perf_counter() - start) / reps
        prof.stop()
        prof.analyse()
        files = glob.glob(str(path / "*" / "FRAMEWORK" / "cpu_op_execute_timestamp_0.txt"))
        events = []  # (start us, duration us, op type)
        for line in Path(max(files, key=os.path.getmtime)).read_text().splitlines():
            name, _, rest = line.split(";", 2)
            for tok in rest.split():
                t0, dur, _ = tok.split(",")
                events.append((int(t0) / 1e3, float(dur) * 1e3, name.rsplit("/", 1)[-1].split("-")[0]))
        events.sort()
        by_type, gaps = defaultdict(list), defaultdict(list)
        for a, b in zip(events, events[1:], strict=False):
            gap = b[0] - (a[0] + a[1])
            if 0 <= gap < 1000:  # within one call
                gaps[a[2]].append(gap)
        for _, dur, op in events:
            by_type[op].append(dur)
        row = {"section": "profile", "variant": variant, "ms_per_forward": wall * 1e3, "ops": {}, "gaps": {}}
        print(f"profile {variant}: {wall * 1e3:.2f} ms per forward (profiled, {reps} calls)", flush=True)
        for op, d in sorted(by_type.items()):
            d = np.asarray(d)
            row["ops"][op] = {
                "per_forward": len(d) / reps,
                "median_us": float(np.median(d)),
                "mean_us": float(d.mean()),
                "ms_per_forward": float(d.sum()) / reps / 1e3,
            }
            print(
                f"  {op:<10} {len(d) / reps:5.0f} per forward, median {np.median(d):6.1f} us, mean {d.mean():6.1f} "
                f"us, {d.sum() / reps / 1e3:6.2f} ms per forward",
                flush=True,
            )
        for op, g in sorted(gaps.items()):
            g = np.asarray(g)
            row["gaps"][op] = {"median_us": float(np.median(g)), "ms_per_forward": float(g.sum()) / reps / 1e3}
            print(
                f"  gap after {op:<10} median {np.median(g):6.1f} us, {g.sum() / reps / 1e3:6.2f} ms per forward",
                flush=True,
            )
        rows.append(row)
        del blocks, head, run
    return rows


def result_row(section: str, K: int, N: int, M: int, variant: str, t: float, wbytes: int, layers: int, fp32_time):
    """One result: ``t`` seconds per layer, its weight bandwidth and its speed relative to fp32 (when timed)."""
    return {
        "section": section,
        "K": K,
        "N": N,
        "M": M,
        "variant": variant,
        "ms_per_layer": t * 1e3,
        "weight_bytes": wbytes,
        "gb_per_s": wbytes / t / 1e9,
        "layers": layers,
        "speedup_vs_fp32": (fp32_time / t) if fp32_time else None,
    }


def print_row(row: dict) -> None:
    ratio = f"{row['speedup_vs_fp32']:.2f}" if row.get("speedup_vs_fp32") else "-"
    print(
        f"{row['section']:<6} {row['K']:>6} {row['N']:>6} {row['M']:>4}  {row['variant']:<14} "
        f"{row['ms_per_layer']:>9.3f} {ratio:>7} {row['gb_per_s']:>7.1f} {row['layers']:>6}",
        flush=True,
    )


def run_stack(variants, K: int, count: int, ms_list, reps: int, rng) -> list[dict]:
    from mindspore import Tensor

    rows = []
    sets = {}
    for variant in variants:
        layers = make_layers(variant, K, K, count, rng, 1 / np.sqrt(K))
        sets[variant] = (layers, weight_bytes(layers[0]))
    for M in ms_list:
        x = Tensor(rng.standard_normal((M, K), dtype=np.float32))
        fp32_time = None
        for variant in variants:
            layers, wbytes = sets[variant]
            t = time_stack(layers, x, reps)
            fp32_time = t if variant == "fp32" else fp32_time
            row = result_row("stack", K, K, M, variant, t, wbytes, count, fp32_time)
            rows.append(row)
            print_row(row)
    return rows


def _SquaredSum(net):
    """sum(net(x)^2): a loss whose gradient needs the forward output (with a plain sum, MindSpore prunes the
    fp32 forward, since dx of a linear layer does not depend on it, while a custom op's backward keeps it)."""
    from mindspore import nn

    class Loss(nn.Cell):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def construct(self, inp):
            y = self.inner(inp)
            return (y * y).sum()

    return Loss(net)


def run_dx(variants, K: int, count: int, ms_list, reps: int, rng) -> list[dict]:
    """Forward + input gradient of ``count`` distinct KxK layers on one input (their outputs summed), per layer."""
    import mindspore as ms
    from mindspore import Tensor

    rows = []
    for M in ms_list:
        x = Tensor(rng.standard_normal((M, K), dtype=np.float32))
        fp32_time = None
        for variant in variants:
            layers = make_layers(variant, K, K, count, rng, 1 / np.sqrt(K))
            grad = ms.grad(_SquaredSum(chain_net(layers)), grad_position=0)
            t = median_call_seconds(grad, x, reps) / count
            fp32_time = t if variant == "fp32" else fp32_time
            row = result_row("dx", K, K, M, variant, t, weight_bytes(layers[0]), count, fp32_time)
            rows.append(row)
            print_row(row)
            del layers, grad
    return rows


def run_small(variants, reps: int, rng) -> list[dict]:
    from mindspore import Tensor

    rows = []
    x = Tensor(rng.standard_normal((1, SMOL["hidden"]), dtype=np.float32))
    fp32_time = None
    for variant in variants:
        blocks, head = smol_linears(variant, rng)
        wbytes = sum(weight_bytes(c) for b in blocks for c in b) + weight_bytes(head)
        t = time_smol_forward(blocks, head, x, reps)
        fp32_time = t if variant == "fp32" else fp32_time
        row = {
            "section": "small",
            "K": SMOL["hidden"],
            "N": SMOL["vocab"],
            "M": 1,
            "variant": variant,
            "ms_per_layer": t * 1e3 / 211,
            "ms_per_forward": t * 1e3,
            "weight_bytes": wbytes,
            "gb_per_s": wbytes / t / 1e9,
            "layers": 211,
            "speedup_vs_fp32": (fp32_time / t) if fp32_time else None,
        }
        rows.append(row)
        print_row(row)
        del blocks, head
    return rows


def run_bnb(python: str, shapes, ms_list, reps: int, stream_bytes: int) -> list[dict]:
    helper = Path(__file__).with_name("_bench_bnb.py")
    cmd = [
        python,
        str(helper),
        "--json",
        "--reps",
        str(reps),
        "--stream-bytes",
        str(stream_bytes),
        "--shapes",
        ",".join(f"{k}x{n}" for k, n in shapes),
        "--m",
        ",".join(map(str, ms_list)),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"bitsandbytes run failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return []
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_quantize(reps: int) -> list[dict]:
    """Seconds to quantize one fp32 weight (fast kernels vs the numpy oracle)."""
    from msbnb_pass import formats
    from msbnb_pass.kernels import quantize as fast

    rows = []
    W = np.random.default_rng(0).standard_normal((4096, 11008), dtype=np.float32)
    for name, fn in (
        ("nf4+dq (kernel)", lambda: fast.quantize_4bit(W, 64, "nf4", True)),
        ("nf4+dq (numpy oracle)", lambda: formats.quantize_4bit(W, 64, "nf4", True)),
        ("llm_int8 CB/SCB (kernel)", lambda: fast.int8_vectorwise_quant(W)),
    ):
        times = []
        for _ in range(reps if "oracle" not in name else 2):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        rows.append({"what": name, "shape": [4096, 11008], "seconds": statistics.median(times)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN list (in x out)")
    parser.add_argument("--m", default=",".join(map(str, MS)), help="batch sizes (rows of x)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--stream-mb", type=int, default=0, help="weight bytes cycled per variant (default 3x L3)")
    parser.add_argument("--threads", type=int, default=0, help="kernel threads (default: the library's)")
    parser.add_argument("--bnb-python", help="an interpreter with torch + bitsandbytes to add their CPU layers")
    parser.add_argument("--quick", action="store_true", help="4096x4096, M in {1, 32}")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="which of wide, stack, small, dx to run")
    parser.add_argument("--stack-layers", type=int, default=48, help="layers in the stack section")
    parser.add_argument("--stack-m", default="1,32,128", help="batch sizes of the stack section")
    parser.add_argument("--dx-layers", type=int, default=4, help="layers in the dx section")
    parser.add_argument("--dx-m", default="512,2048", help="batch sizes of the dx section")
    parser.add_argument(
        "--interleave", action="store_true", help="time all variants in rounds; ratio = median per-round ratio"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="profile the small section with MindSpore's profiler (output under DIR): op times and dispatch gaps",
    )
    parser.add_argument(
        "--load",
        type=parse_load,
        default=("none", 0),
        metavar="KIND[:N]",
        help="run next to N busy processes: cpu (a busy loop each) or mem (memory streaming); default none",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    load_procs = start_load(*args.load)
    try:
        return run_benchmarks(args)
    finally:
        stop_load(load_procs)


def run_benchmarks(args) -> int:
    """The benchmark itself (``main`` starts and stops the --load processes around it)."""
    import mindspore as ms

    from msbnb_pass import kernels

    ms.set_device("CPU")
    if args.threads:
        kernels.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms_list = [int(v) for v in args.m.split(",")]
    if args.quick:
        shapes, ms_list = [(4096, 4096)], [1, 32]
        args.stack_m = "1,32"
    variants = args.variants.split(",")
    stream = (args.stream_mb << 20) if args.stream_mb else max(3 * l3_bytes(), 512 << 20)
    meta = {
        "machine": cpu_name(),
        "cores": os.cpu_count(),
        "l3_bytes": l3_bytes(),
        "stream_bytes_per_variant": stream,
        "kernel_isa": kernels.isa() if "cpu" in kernels.available_backends() else None,
        "kernel_threads": kernels.get_num_threads() if "cpu" in kernels.available_backends() else None,
        "backend": kernels.get_backend(),
        "date": time.strftime("%Y-%m-%d"),
        "mindspore": ms.__version__,
        "load": {"kind": args.load[0], "processes": args.load[1]},
    }
    load = "" if args.load[0] == "none" else f", next to {args.load[1]} {args.load[0]} load process(es)"
    print(
        f"# {meta['machine']}, {meta['cores']} cores, L3 {meta['l3_bytes'] >> 20} MB, "
        f"streaming >= {stream >> 20} MB per variant, kernels: {meta['kernel_isa']} x{meta['kernel_threads']} threads"
        f"{load}"
    )
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    sections = args.sections.split(",")
    header = (
        f"{'where':<6} {'K':>6} {'N':>6} {'M':>4}  {'variant':<14} {'ms/layer':>9} {'x fp32':>7} {'GB/s':>7} "
        f"{'layers':>6}"
    )
    print(header)
    print("-" * len(header))
    if "stack" in sections:
        stack_m = [int(v) for v in args.stack_m.split(",")]
        rows += run_stack(variants, 4096, args.stack_layers, stack_m, args.reps, rng)
    if "small" in sections:
        rows += run_small(variants, args.reps, rng)
    if "dx" in sections:
        rows += run_dx(variants, 4096, args.dx_layers, [int(v) for v in args.dx_m.split(",")], args.reps, rng)
    if args.profile:
        rows += profile_small(variants, args.reps, rng, args.profile)
    for K, N in shapes if "wide" in sections else []:
        layer_sets = {}
        for variant in variants:
            probe = make_layers(variant, K, N, 1, rng)[0]
            count = max(MIN_LAYERS, -(-stream // weight_bytes(probe)))
            layer_sets[variant] = (make_layers(variant, K, N, count, rng), weight_bytes(probe))
        for M in ms_list:
            fp32_time = None
            mixed = {}
            if args.interleave:
                mixed = interleaved(layer_sets, {v: input_for(M, K, v, rng) for v in variants}, args.reps)
            for variant in variants:
                layers, wbytes = layer_sets[variant]
                if args.interleave:
                    t, ratio_v = mixed[variant]
                    fp32_time = t * ratio_v if ratio_v else None  # so that fp32_time / t is the median ratio
                else:
                    t = time_chain(layers, input_for(M, K, variant, rng), args.reps)
                if variant == "fp32" and not args.interleave:
                    fp32_time = t
                row = result_row("wide", K, N, M, variant, t, wbytes, len(layers), fp32_time)
                rows.append(row)
                print_row(row)
        del layer_sets
    if args.bnb_python and "wide" in sections:
        bnb_rows = run_bnb(args.bnb_python, shapes, ms_list, args.reps, stream)
        by_key = {(r["K"], r["N"], r["M"]): r for r in rows if r["variant"] == "fp32"}
        print("\n# bitsandbytes (torch CPU), same run; 'x fp32' is against MindSpore's fp32 Dense above")
        for r in bnb_rows:
            fp = by_key.get((r["K"], r["N"], r["M"]))
            r["speedup_vs_fp32"] = fp["ms_per_layer"] / r["ms_per_layer"] if fp else None
            rows.append(r)
            r["section"] = "wide"
            print_row(r)
    quant = bench_quantize(max(3, args.reps // 2))
    print("\n# quantizing one 4096x11008 fp32 weight")
    for q in quant:
        print(f"{q['what']:<26} {q['seconds']:.3f} s")
    result = {"meta": meta, "results": rows, "quantize": quant}
    print("\n" + json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
