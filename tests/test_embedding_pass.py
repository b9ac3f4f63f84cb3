"""Quantizing lookup tables and the output head through the pass.

* the ``embedding-cell`` pattern with ``embedding4bit`` / ``embedding8bit`` rewrites a LLaMA's token embedding
  and a ``mindspore.nn.Embedding``, is explained, and is opt-in (no built-in family touches a table);
* a table a tied head reads is kept with the reason, even with ``allow_shared``; a rule of the wrong kind is
  refused when it is added;
* ``QuantConfig(quantize_embeddings=True, quantize_lm_head=True)`` and a rule ``include = ["lm_head"]`` quantize
  the head;
* generation: greedy tokens of a network with a 4-bit / 8-bit embedding and a 4-bit head are the same with the
  lean decode step, the plain step and step-by-step recomputation;
* memory: NF4+DQ linears, NF4 embedding and NF4 head hold < 0.2x the float32 parameter bytes.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import msbnb_pass as mb
from msbnb_pass import Embedding4bit, Embedding8bit, Linear4bit, QuantConfig
from msbnb_pass.errors import ConfigError, RuleError
from msbnb_pass.kernels import decode_ops
from msbnb_pass.models import LlamaConfig, LlamaForCausalLM
from msbnb_pass.models.generation import GenerationError
from msbnb_pass.rules import Rule, RuleSet

from .models.test_generate import TINY, greedy_without_cache

EMB_NF4 = Rule("emb-nf4", "embedding-cell", {"to": "embedding4bit", "quant_type": "nf4", "blocksize": 64})
EMB_INT8 = Rule("emb-int8", "embedding-cell", {"to": "embedding8bit"})
HEAD_NF4 = Rule("head-nf4", "linear-cell", {"to": "linear4bit"}, where={"include": ["lm_head"]}, priority=200)


def llama(tied: bool = False, **overrides) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}, tie_word_embeddings=tied))


def param_bytes(net: nn.Cell) -> int:
    return int(sum(p.size * p.itemsize for p in net.get_parameters()))


@pytest.fixture
def graph_mode(ms_cpu):
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_rule_quantizes_the_embedding_verified_and_explained(ms_cpu):
    net = llama()
    table = net.model.embed_tokens.weight.asnumpy().copy()
    ids = Tensor(np.array([[1, 5, 9, 95]], np.int32))
    result = mb.apply(net, ["nf4", EMB_NF4], sample_inputs=ids)
    emb = net.model.embed_tokens
    assert type(emb) is Embedding4bit and (emb.quant_type, emb.blocksize, emb.quant_state.nested) == ("nf4", 64, False)
    assert type(net.lm_head) is nn.Dense  # the head is still skipped by default
    decision = result.trace.decision("model.embed_tokens")
    assert decision.rule == "emb-nf4" and decision.level == "cell"
    assert "model.embed_tokens [cell]: rewritten by rule 'emb-nf4'" in result.explain()
    rewrite = next(r for r in result.rewrites if r.path == "model.embed_tokens")
    assert (rewrite.scheme, rewrite.replacement, rewrite.in_features, rewrite.out_features) == (
        "nf4",
        "Embedding4bit",
        96,
        64,
    )
    assert rewrite.bytes_before == 96 * 64 * 4 and rewrite.bytes_after == emb.parameter_nbytes()
    check = next(c for c in result.report.layers if c.path == "model.embed_tokens")
    assert check.kernel_ok and check.probe == "ids"
    packed, qs = mb.formats.quantize_4bit(table, 64, "nf4")
    rows = mb.formats.dequantize_4bit_rows(packed, qs, np.arange(96))
    full = np.linalg.norm(rows - table) / np.linalg.norm(table)  # the whole table's NF4 error
    assert full < 0.13  # NF4's verification bound
    # verification looked up 65 of the 96 rows: their error is the table's within sampling noise
    assert 0.8 * full < check.metrics["relative_error"] < 1.2 * full
    assert np.array_equal(emb(Tensor(np.arange(96, dtype=np.int32))).asnumpy(), rows)
    assert [p.name for p in emb.get_parameters()] == [
        "model.embed_tokens.weight",
        "model.embed_tokens.weight_absmax",
        "model.embed_tokens.weight_quant_map",
    ]


def test_no_built_in_family_quantizes_a_table(ms_cpu):
    for family in ("nf4", "int8", "llm_int8"):
        net = llama()
        mb.apply(net, family, verify=False)
        assert type(net.model.embed_tokens).__name__ == "Embedding"
    net = llama()
    mb.quantize(net, mb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"), verify=False)
    assert type(net.model.embed_tokens).__name__ == "Embedding" and type(net.lm_head) is nn.Dense


def test_tied_table_is_kept_with_the_reason_even_with_allow_shared(ms_cpu):
    shared = Rule("emb-shared", "embedding-cell", {"to": "embedding4bit"}, where={"allow_shared": True})
    for rule in (EMB_NF4, shared):
        net = llama(tied=True)
        result = mb.apply(net, ["nf4", rule], verify=False)
        assert type(net.model.embed_tokens).__name__ == "Embedding"
        reason = result.trace.decision("model.embed_tokens").reasons[rule.name]
        assert reason == (
            "the table is also read as 'model.embed_tokens.weight' by head_matmul (a tied output head): replacing "
            "the embedding cell would hand that use the packed codes, so it is kept even with allow_shared; untie "
            "the head to quantize both"
        )
        assert ("model.embed_tokens", f"{reason} ({rule.name})") in result.kept
        prompt = [[5, 17, 33]]
        assert net.generate(prompt, max_new_tokens=3).shape == (1, 6)  # the tied float head still works


def test_rule_kind_mismatch_is_refused_when_added():
    with pytest.raises(RuleError, match=r"replacement 'linear4bit' replaces a linear, but pattern 'embedding-cell'"):
        RuleSet([Rule("bad", "embedding-cell", {"to": "linear4bit"})])
    with pytest.raises(RuleError, match=r"replacement 'embedding4bit' replaces a embedding, but pattern 'linear-cell'"):
        RuleSet([Rule("bad", "linear-cell", {"to": "embedding4bit"})])
    with pytest.raises(
        RuleError, match=r"rewrite.quant_type = 'nf3' is not accepted; accepted: \['nf4', 'fp4', 'int4'\]"
    ):
        RuleSet([Rule("bad", "embedding-cell", {"to": "embedding4bit", "quant_type": "nf3"})])
    with pytest.raises(RuleError, match=r"unknown key 'rewrite.blocksize' for replacement 'embedding8bit'"):
        RuleSet([Rule("bad", "embedding-cell", {"to": "embedding8bit", "blocksize": 64})])


def test_mindspore_nn_embedding_and_toml_rule(ms_cpu, tmp_path):
    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            rng = np.random.default_rng(0)
            self.words = nn.Embedding(50, 40, embedding_table=Tensor(rng.standard_normal((50, 40)).astype(np.float32)))
            self.proj = nn.Dense(40, 8)

        def construct(self, ids):
            return self.proj(self.words(ids))

    rules = tmp_path / "emb.toml"
    rules.write_text(
        '[[rule]]\nname = "emb-fp4"\npattern = "embedding-cell"\n'
        'rewrite = { to = "embedding4bit", quant_type = "fp4", blocksize = 32, double_quant = true }\n'
    )
    net = Net()
    table = net.words.embedding_table.asnumpy().copy()
    ids = Tensor(np.array([[0, 49, 3]], np.int32))
    result = mb.apply(net, [str(rules), EMB_INT8.with_changes(where={"include": ["nothing"]})], sample_inputs=ids)
    assert type(net.words) is Embedding4bit and net.words.quant_state.nested and net.words.blocksize == 32
    packed, qs = mb.formats.quantize_4bit(table, 32, "fp4", True)
    assert np.array_equal(net.words(ids).asnumpy()[0], mb.formats.dequantize_4bit_rows(packed, qs, [0, 49, 3]))
    assert result.trace.decision("words").reasons["emb-int8"] == "not included: 'words' matches none of ['nothing']"
    assert type(net.proj) is nn.Dense  # only the table rule was given


def test_quant_config_opt_ins(ms_cpu):
    net = llama()
    cfg = QuantConfig(bits=4, quant_type="nf4", group_size=64, compress_statistics=True, quantize_embeddings=True)
    mb.quantize(net, cfg, verify=False)
    assert type(net.model.embed_tokens) is Embedding4bit and net.model.embed_tokens.quant_state.nested
    assert type(net.lm_head) is nn.Dense
    net = llama()
    result = mb.quantize(net, QuantConfig(bits=8, quantize_embeddings=True, quantize_lm_head=True), verify=False)
    assert type(net.model.embed_tokens) is Embedding8bit and type(net.lm_head).__name__ == "Linear8bit"
    assert result.trace.decision("model.embed_tokens").rule == "int8-embedding"
    with pytest.raises(ConfigError, match=r"^quantize_lm_head=True contradicts modules_to_not_convert=\['lm_head'\]"):
        QuantConfig(bits=4, quantize_lm_head=True, modules_to_not_convert=["lm_head"])
    with pytest.raises(ConfigError, match=r"^quantize_embeddings=True has no BitsAndBytesConfig equivalent"):
        QuantConfig(bits=4, quant_type="nf4", group_size=64, quantize_embeddings=True).to_bnb_config()
    with pytest.raises(TypeError, match=r"^quantize_embeddings must be a bool, got 'yes' \(str\)$"):
        QuantConfig(bits=4, quantize_embeddings="yes")
    assert QuantConfig.from_dict(QuantConfig(bits=4, quantize_lm_head=True).to_dict()).quantize_lm_head


@pytest.mark.parametrize("emb_rule", [EMB_NF4, EMB_INT8])
def test_generation_with_quantized_embedding_and_4bit_head(emb_rule, graph_mode):
    """Greedy tokens: lean step == plain step == step-by-step recomputation of the whole sequence."""
    net = llama()
    mb.apply(net, ["nf4", emb_rule, HEAD_NF4], verify=False)
    assert type(net.lm_head) is Linear4bit
    assert type(net.model.embed_tokens) is (Embedding4bit if emb_rule is EMB_NF4 else Embedding8bit)
    prompt = [5, 17, 33, 2, 90]
    plain = net.generate([prompt], max_new_tokens=8, decode_kernels=False)
    assert plain[0].tolist() == greedy_without_cache(net, prompt, 8)
    if decode_ops.available():
        lean = net.generate([prompt], max_new_tokens=8, decode_kernels=True)
        assert lean.tolist() == plain.tolist()
        dec = next(d for d, _ in net.__dict__["_generation_decoder"] if d.lean)
        assert dec.head_kind == "w4"  # the 4-bit head runs in the fused kernel


def test_generation_refuses_a_tied_head_on_a_packed_table(ms_cpu):
    net = llama(tied=True)
    net.model.embed_tokens = Embedding4bit.from_float(net.model.embed_tokens.weight.asnumpy())
    with pytest.raises(
        GenerationError, match=r"^the output head is tied to the token embedding, which is a Embedding4bit"
    ):
        net.generate([[1, 2]], max_new_tokens=2)


def test_nf4_everything_is_below_a_fifth_of_float32(ms_cpu):
    """NF4+DQ linears, NF4 embedding (blocks of 64, 4.5 bits) and an NF4+DQ head: < 0.2x the fp32 bytes."""
    net = llama(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    before = param_bytes(net)
    emb = EMB_NF4.with_changes(rewrite={"double_quant": True})
    mb.apply(net, ["nf4", emb, HEAD_NF4], verify=False)
    after = param_bytes(net)
    assert type(net.model.embed_tokens) is Embedding4bit and type(net.lm_head) is Linear4bit
    # without the table and the head the ratio is far above: each is 1000 x 256 float32 = 1 MB of 7.2 MB
    assert after / before < 0.2, (after, before)
    floats = sum(p.size * 4 for p in net.get_parameters() if p.dtype == ms.float32 and p.name.endswith("norm.weight"))
    assert after / before > floats / before  # norms stay float
