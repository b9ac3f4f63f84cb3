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
