"""The LLaMA decoder and BERT encoder in plain mindspore.nn: equal to an independent numpy forward, in
PyNative and GRAPH_MODE, parameter paths = transformers' keys, quantizable by the pass."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest

from msbnb_pass.models import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, config_from_dict
from tests.bounds import assert_network_close

from .reference import bert_forward, llama_forward

LLAMA = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=1e4,
    max_position_embeddings=64,
)
BERT = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    layer_norm_eps=1e-12,
)


def llama_terms(cfg: dict, t: int) -> int:
    """Summation length along the longest chain of products through the decoder (per layer: q/k/v
    projection, scores over head_dim, probabilities over t, o_proj, gate/up, down_proj; then the head)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    return cfg["num_hidden_layers"] * (h + hd + t + h + h + i) + h


def _state(net) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy() for p in net.get_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_llama_matches_numpy_forward(ms_cpu, tied):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = dict(LLAMA, tie_word_embeddings=tied)
    net = LlamaForCausalLM(LlamaConfig(**cfg))
    sd = _state(net)
    expected = {"model.embed_tokens.weight", "model.norm.weight", "model.layers.1.self_attn.k_proj.weight"}
    assert expected <= set(sd)
    assert ("lm_head.weight" in sd) is not tied
    ids = np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int32)
    y = net(ms.Tensor(ids)).asnumpy()
    # amplification 8: two RMSNorms per layer and the softmax can grow a relative perturbation a few-fold
    assert_network_close(y, llama_forward(sd, cfg, ids), n_terms=llama_terms(cfg, 7), amplification=8)


def test_llama_graph_mode_equals_pynative(ms_cpu):
    net = LlamaForCausalLM(LlamaConfig(**LLAMA))
    ids = ms.Tensor(np.random.default_rng(1).integers(0, 96, (1, 9)).astype(np.int32))
    ms.set_context(mode=ms.PYNATIVE_MODE)
    eager = net(ids).asnumpy()
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = net(ids).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert_network_close(graph, eager, n_terms=llama_terms(LLAMA, 9), amplification=8)


def test_bert_matches_numpy_forward_with_padding(ms_cpu):
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        net = BertModel(BertConfig(**BERT))
        sd = _state(net)
        assert "encoder.layer.1.attention.self.query.weight" in sd and "pooler.dense.weight" in sd
        ids = np.random.default_rng(0).integers(0, 100, (2, 5)).astype(np.int32)
        mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
        y = net(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    ref = bert_forward(sd, BERT, ids, mask.astype(np.float64))
    n = BERT["num_hidden_layers"] * (32 + 8 + 5 + 32 + 32 + 64)
    # padded positions' outputs are not used by anyone; compare the real tokens
    assert_network_close(y[0], ref[0], n_terms=n, amplification=8)
    assert_network_close(y[1, :3], ref[1, :3], n_terms=n, amplification=8)


def test_configs_read_transformers_names():
    cfg = config_from_dict({"model_type": "llama", **LLAMA, "torch_dtype": "bfloat16", "some_future_field": 3})
    assert isinstance(cfg, LlamaConfig) and cfg.head_dim == 16 and cfg.n_rep == 2
    d = cfg.to_dict()
    assert d["some_future_field"] == 3 and d["model_type"] == "llama" and d["architectures"] == ["LlamaForCausalLM"]
    assert isinstance(config_from_dict({"model_type": "bert", **BERT}), BertConfig)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        config_from_dict({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        LlamaConfig(**dict(LLAMA, num_key_value_heads=3))
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig(**dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


def test_the_pass_quantizes_the_decoder(ms_cpu):
    from msbnb_pass import BitsAndBytesConfig, Linear4bit, quantize

    ms.set_context(mode=ms.PYNATIVE_MODE)
    net = LlamaForCausalLM(LlamaConfig(**LLAMA))
    result = quantize(net, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    quantized = [n for n, c in result.net.cells_and_names() if isinstance(c, Linear4bit)]
    assert len(quantized) == 7 * LLAMA["num_hidden_layers"]
    assert "lm_head" not in quantized
    ids = ms.Tensor(np.zeros((1, 4), np.int32))
    assert np.isfinite(result.net(ids).asnumpy()).all()
