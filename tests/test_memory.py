"""Training-memory estimates: the seed's QLoRAStats API with real formats, shapes and networks."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_parameter_count_is_llama_7b():
    from msbnb_pass.memory import QLoRAStats

    s = QLoRAStats()  # the seed's defaults: hidden 4096, 32 layers, seq 1024, vocab 32000
    assert s.intermediate_size == 11008
    assert s.parameter_count() == 6_738_415_616  # LLaMA-7B's parameter count
    assert s.linear_parameter_count() == 32 * (4 * 4096**2 + 3 * 4096 * 11008)
    assert s.lora_parameter_count() == 32 * 8 * (4 * 2 * 4096 + 3 * (4096 + 11008))


def test_nf4_dq_bits_match_a_real_layer(ms_cpu):
    from msbnb_pass import Linear4bit
    from msbnb_pass.memory import NF4_DQ_BITS

    assert abs(NF4_DQ_BITS - 4.127) < 5e-4
    layer = Linear4bit(2048, 2048, bias=False)  # NF4, blocksize 64, double quantization
    # the layer also holds the 16-entry code and the 256-entry nested map (constant overhead)
    constant = (16 + 256 + 1) * 4 * 8 / (2048 * 2048)
    assert abs(layer.bits_per_weight() - NF4_DQ_BITS - constant) < 1e-3, layer.bits_per_weight()


def test_estimates_and_checkpointing():
    from msbnb_pass.memory import GB, QLoRAStats, estimate_paged_memory, gradient_checkpointing_saving

    s = QLoRAStats()
    est = estimate_paged_memory(s)
    assert set(est) >= {"fp16_gb", "qlora_gb"}
    full = s.breakdown("full", "adamw")
    assert full["weights"] == s.parameter_count() * (2 + 4) and full["optimizer_states"] == s.parameter_count() * 8
    q = s.breakdown("qlora", "adamw8bit")
    lin, other, lora = s.linear_parameter_count(), s.other_parameter_count(), s.lora_parameter_count()
    assert q["weights"] == int(np.ceil(lin * (4 + 8 / 64 + 32 / (64 * 256)) / 8)) + other * 2 + lora * 4
    assert q["optimizer_states"] == lora * 2 + -(-lora // 2048) * 8
    assert est["qlora_gb"] < 0.15 * est["fp16_gb"]
    saving = gradient_checkpointing_saving(s)
    assert saving == pytest.approx((s.activation_bytes() - s.activation_bytes(recompute=True)) / GB)
    assert 0 < saving < s.activation_bytes() / GB
    # activations grow with the square of the sequence (attention probabilities)
    s2 = QLoRAStats(seq_length=2048)
    assert s2.activation_bytes() > 2 * s.activation_bytes()


def test_nf4_quantize_is_the_real_round_trip():
    from msbnb_pass.formats import dequantize_4bit, quantize_4bit
    from msbnb_pass.memory import nf4_quantize

    a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
    out = nf4_quantize(a)
    packed, state = quantize_4bit(a, 64, "nf4")
    assert np.array_equal(out, dequantize_4bit(packed, state))
    err = np.abs(out - a)
    assert err.mean() <= 0.0733 and (err / (np.abs(a) + 1e-8)).mean() <= 0.2057  # bitsandbytes' NF4 bounds


def test_estimate_network_counts_real_bytes(ms_cpu):
    from msbnb_pass import LoraConfig, get_qlora_model
    from msbnb_pass.memory import QLoRAStats, estimate_network, parameter_bytes
    from tests.test_lora import _llama

    net = get_qlora_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    est = estimate_network(net, seq_length=16, batch_size=2, optimizer="adamw8bit")
    assert est["weights"] == parameter_bytes(net)["bytes"]
    assert est["trainable_params"] == 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers, r=4, q [64->64], v [64->32 (GQA)]
    assert est["gradients"] == 4 * est["trainable_params"]
    stats = QLoRAStats.from_config(net.config, 16, batch_size=2, dtype_bytes=4)
    assert est["activations"] == stats.activation_bytes()


def test_bad_stats():
    from msbnb_pass import MsbnbError
    from msbnb_pass.memory import QLoRAStats

    with pytest.raises(MsbnbError, match="hidden_size must be a positive integer, got 0"):
        QLoRAStats(hidden_size=0)
    with pytest.raises(MsbnbError, match="lora_targets"):
        QLoRAStats(lora_targets=["qkv"])
    with pytest.raises(MsbnbError, match="method"):
        QLoRAStats().breakdown("half")


def test_cli_estimate(capsys):
    from msbnb_pass.cli import main

    assert main(["estimate", "--hidden-size", "576", "--num-layers", "30", "--vocab-size", "49152", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["optimizer"], r["recompute"]): r for r in data["rows"]}
    assert rows[("qlora", "adamw8bit", True)]["total"] < rows[("full", "adamw", False)]["total"]
    assert main(["estimate", "--hidden-size", "0"]) == 2


EPS32 = float(np.finfo(np.float32).eps)


def test_runtime_features_of_a_qlora_network(ms_cpu):
    from msbnb_pass import LoraConfig, get_qlora_model
    from msbnb_pass.memory import RUNTIME_OVERHEAD, estimate_network, runtime_features, runtime_overhead
    from tests.test_lora import _llama

    net = get_qlora_model(_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    f = runtime_features(net, seq_length=16, batch_size=2, optimizer="adamw8bit")
    tokens = 16 * 2
    # 2 layers; adapters on q [64 -> 64] and v [64 -> 32 (GQA)]; every projection quantized (7 per layer)
    assert f["layers"] == 2 and f["adapters"] == 4 and f["quantized_layers"] == 14
    assert f["adapter_io_bytes"] == 2 * tokens * ((64 + 64) + (64 + 32)) * 4
    assert f["8bit_elements"] == 2 * 4 * ((64 + 64) + (64 + 32))  # lora_A and lora_B of the 4 adapters
    assert runtime_features(net, 16, 2, "adamw")["8bit_elements"] == 0
    c = RUNTIME_OVERHEAD
    assert runtime_overhead(f) == int(
        c["fixed"]
        + c["per_layer"] * 2
        + c["per_activation_byte"] * f["activation_bytes"]
        + c["per_adapter"] * 4
        + c["per_adapter_io_byte"] * f["adapter_io_bytes"]
        + c["per_quantized_layer"] * 14
        + c["per_8bit_element"] * f["8bit_elements"]
    )
    est = estimate_network(net, 16, 2, "adamw8bit")
    assert est["runtime"] == runtime_overhead(f) > 0
    parts = ("weights", "gradients", "optimizer_states", "activations", "runtime")
    assert est["total"] == sum(est[k] for k in parts)
    assert estimate_network(net, 16, 2, "adamw8bit", runtime=False)["runtime"] == 0


_MEASURE_SCRIPT = """
import json, os, sys
os.environ.setdefault("GLOG_v", "3")
import mindspore as ms
import numpy as np
from mindspore import Tensor, nn
ms.set_device("CPU")
from msbnb_pass import LoraConfig, get_qlora_model
from msbnb_pass.memory import current_rss, measure_training
from msbnb_pass.models import LlamaForCausalLM, causal_lm_loss
from msbnb_pass.models.configs import LlamaConfig

kind = sys.argv[1]
base = current_rss()
cfg = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
net = LlamaForCausalLM(cfg, max_seq_len=64)
if kind == "qlora":
    get_qlora_model(net, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
opt = nn.AdamWeightDecay(net.trainable_params(), 1e-4)

def forward(x, y):
    return causal_lm_loss(net(x), y)


grad_fn = ms.value_and_grad(forward, None, opt.parameters)

@ms.jit
def step(x, y):
    loss, grads = grad_fn(x, y)
    opt(grads)
    return loss

ids = np.random.default_rng(0).integers(0, 2000, (1, 65)).astype(np.int32)
x, y = Tensor(ids[:, :-1]), Tensor(ids[:, 1:])
r = measure_training(lambda: step(x, y), steps=2, net=net, seq_length=64, baseline_rss=base)
print(json.dumps({"measured": r["measured_peak"], "estimate": r["estimate_total"], "ratio": r["ratio"]}))
"""


@pytest.mark.parametrize("kind", ["qlora", "full"])
def test_measured_mode_agrees_with_the_estimate(kind, tmp_path):
    """The measured mode in a fresh process (its RSS is its own): a jit train step of a small LLaMA
    (2 layers, 4.1 M parameters), peak RSS within 15% of estimate_network's total."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root)}
    script = tmp_path / "measure_step.py"  # MindSpore compiles source from files, not from "python -c"
    script.write_text(_MEASURE_SCRIPT)
    out = subprocess.run([sys.executable, str(script), kind], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(r["measured"] - r["estimate"]) <= 0.15 * r["measured"], r


def test_measure_training_bad_input(ms_cpu):
    from msbnb_pass import MsbnbError
    from msbnb_pass.memory import measure_training

    with pytest.raises(MsbnbError, match="measure_training: steps must be a positive integer, got 0"):
        measure_training(lambda: None, steps=0, baseline_rss=0)
    with pytest.raises(MsbnbError, match="measure_training: step must be a callable running one train step"):
        measure_training(3, baseline_rss=0)
    with pytest.raises(MsbnbError, match="give net .* or baseline_rss"):
        measure_training(lambda: None)


def test_measure_training_counts_what_a_step_allocates(ms_cpu):
    """A 'step' that keeps 64 MiB alive: the measured peak grows by at least that much, and without a
    baseline the network's parameters are counted as resident."""
    from msbnb_pass.memory import measure_training, parameter_bytes
    from tests.test_lora import _llama

    net = _llama()
    held = []

    def step():
        a = np.ones(16 * 2**20, np.float32)  # 64 MiB, touched
        held.append(a)
        return a.sum()

    r = measure_training(step, steps=2, net=net)
    assert r["measured_peak"] >= 2 * 64 * 2**20 + parameter_bytes(net)["bytes"]
    assert r["estimate"] is None and r["ratio"] is None and r["steps"] == 2


def test_softmax_backward_matches_the_float64_oracle(ms_cpu):
    import mindspore as ms
    from mindspore import Tensor, ops

    from msbnb_pass.models._layers import Softmax

    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((2, 3, 5, 40))).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    sm = Softmax()
    y = sm(Tensor(x)).asnumpy()
    assert np.array_equal(y, ops.softmax(Tensor(x), -1).asnumpy())  # the forward is MindSpore's kernel
    dyt = Tensor(dy)

    def loss(t):
        return (sm(t) * dyt).sum()

    dx = ms.jit(ms.grad(loss))(Tensor(x)).asnumpy()
    y64, dy64 = y.astype(np.float64), dy.astype(np.float64)
    s = (dy64 * y64).sum(-1, keepdims=True)
    ref = y64 * (dy64 - s)
    # float32: the row sum of n products (n + 1 roundings each), the difference and the product (2 more)
    n = x.shape[-1]
    bound = np.abs(y64) * ((n + 3) * EPS32 * np.abs(dy64 * y64).sum(-1, keepdims=True) + 3 * EPS32 * np.abs(dy64))
    assert np.all(np.abs(dx - ref) <= bound + 1e-30), np.max(np.abs(dx - ref) - bound)


def test_causal_lm_loss_is_the_mean_cross_entropy(ms_cpu):
    import mindspore as ms
    from mindspore import Tensor

    from msbnb_pass.models import causal_lm_loss

    rng = np.random.default_rng(1)
    logits = (4 * rng.standard_normal((2, 6, 50))).astype(np.float32)
    labels = rng.integers(0, 50, (2, 6)).astype(np.int32)
    loss, g = ms.jit(ms.value_and_grad(causal_lm_loss, 0))(Tensor(logits), Tensor(labels))
    z = logits.reshape(-1, 50).astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    ref = (lse - z[np.arange(12), labels.reshape(-1)]).mean()
    # float32 log-sum-exp of 50 terms of magnitude <= max|z| (+ the mean of 12 values)
    assert abs(float(loss.asnumpy()) - ref) <= 64 * EPS32 * (1 + np.abs(z).max())
    p = np.exp(z - lse[:, None])
    p[np.arange(12), labels.reshape(-1)] -= 1
    assert np.allclose(g.asnumpy().reshape(-1, 50), p / 12, rtol=0, atol=64 * EPS32 / 12)
