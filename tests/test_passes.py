"""The pass on a zoo of networks: every built-in family, GRAPH_MODE, explanations, transactions."""

from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor, nn

import msbnb_pass as mb
from msbnb_pass.kernels import _lib
from msbnb_pass.rewrite import QuantizedMatmul, RewriteError
from msbnb_pass.rules import Rule, RuleSet, register_replacement

from . import zoo
from .bounds import assert_network_close

FAMILIES = ["nf4", "fp4", "int4", "int8", "llm_int8"]
# end-to-end cosine each family keeps on these random two-layer networks (errors compound through the layers;
# the per-layer bounds checked during the pass are in verify.py)
MIN_COSINE = {"nf4": 0.98, "fp4": 0.97, "int4": 0.96, "int8": 0.9995, "llm_int8": 0.998}


def ids(seed=0):
    return Tensor(np.random.default_rng(seed).integers(0, 96, (2, 7)).astype(np.int32))


def feats(seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32))


# Summation length along the longest chain of reductions from input to output (tests/bounds.py): two float32
# evaluations of one network (GRAPH_MODE vs PyNative, jit, kernel vs reference backend) differ by summation
# order only. llama: per layer RMSNorm (64), q (64), q k^T (64), att v (7), o (64), RMSNorm (64), gate (64),
# down (128), then the final norm (64) and the tied head (64); bert: q (64), q k^T (64), att v (7), attn_out
# (64), LayerNorm (2 x 64), intermediate (64), output (128), LayerNorm (2 x 64) per layer, pooler and
# classifier (64 each); containers: eight 64-term products and two sums over the input (256). Perturbing
# every float weight of these networks by one ulp moves their outputs by < 0.01 gamma_n ||y||_inf, so the
# norm-wise bound needs no amplification factor above 1.
CHAIN = {
    "llama": 2 * (6 * 64 + 7 + 128) + 128,
    "bert": 2 * (6 * 64 + 7 + 128 + 128) + 128,
    "containers": 8 * 64 + 2 * 256,
}


NETS = {"llama": (zoo.make_llama, ids), "bert": (zoo.make_bert, ids), "containers": (zoo.make_containers, feats)}


@pytest.fixture
def graph_mode(ms_cpu):
    yield ms_cpu
    ms_cpu.set_context(mode=ms_cpu.PYNATIVE_MODE)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(NETS))
def test_family_rewrites_the_zoo_and_compiles(graph_mode, family, name):
    make, inputs = NETS[name]
    net = make()
    x = inputs()
    y_float = net(x).asnumpy()
    result = mb.apply(net, family, sample_inputs=(x,))
    assert result.report.passed and not result.report.violations
    expected = {"llama": 14, "bert": 14, "containers": 6}[name]
    assert len(result.quantized) == expected
    assert result.report.end_to_end["cosine"] >= MIN_COSINE[family]
    # the rewritten network compiles and runs in GRAPH_MODE with the same outputs as in PyNative
    y_pynative = net(x).asnumpy()
    graph_mode.set_context(mode=graph_mode.GRAPH_MODE)
    y_graph = net(x).asnumpy()
    assert_network_close(y_graph, y_pynative, n_terms=CHAIN[name], what="GRAPH_MODE vs PyNative")
    cos = (y_graph * y_float).sum() / np.linalg.norm(y_graph) / np.linalg.norm(y_float)
    assert cos >= MIN_COSINE[family]
    # unique parameter names equal to the tree paths (what GRAPH_MODE and checkpoints need)
    names = [p.name for p in net.get_parameters()]
    assert len(names) == len(set(names))
    assert names == [n for n, _ in net.parameters_and_names()]


def test_a_network_compiled_before_the_pass_runs_its_rewritten_layers(graph_mode):
    """MindSpore keys compiled graphs by the Cell, not its children: without forget_compiled_graphs, a
    network run in GRAPH_MODE before apply() kept running its float graph afterwards (silently)."""
    graph_mode.set_context(mode=graph_mode.GRAPH_MODE)
    net = zoo.make_llama()
    y_float = net(ids()).asnumpy()
    mb.apply(net, "nf4", verify=False)
    y_graph = net(ids()).asnumpy()
    graph_mode.set_context(mode=graph_mode.PYNATIVE_MODE)
    y_pynative = net(ids()).asnumpy()
    assert_network_close(y_graph, y_pynative, n_terms=CHAIN["llama"], what="GRAPH_MODE after the pass vs PyNative")
    assert np.abs(y_float - y_pynative).max() > 100 * np.abs(y_graph - y_pynative).max()  # not the float graph
    # and back: dequantize_model swaps the layers again, the compiled network follows
    graph_mode.set_context(mode=graph_mode.GRAPH_MODE)
    mb.dequantize_model(net)
    y_deq = net(ids()).asnumpy()
    graph_mode.set_context(mode=graph_mode.PYNATIVE_MODE)
    assert_network_close(y_deq, net(ids()).asnumpy(), n_terms=CHAIN["llama"], what="dequantized, GRAPH_MODE")
    assert not any(isinstance(c, mb.Linear4bit) for _, c in net.cells_and_names())


def test_jit_and_memory_of_the_rewritten_llama(ms_cpu):
    net = zoo.make_llama()
    before = mb.get_model_size(net)["total_bytes"]
    result = mb.apply(net, "nf4")
    after = mb.get_model_size(net)["total_bytes"]
    # quantized weights: 14 of the 16 matrices; embedding (tied head) and norms stay float
    saved = sum(r.bytes_before - r.bytes_after for r in result.quantized)
    assert before - after == saved > 0

    @ms.jit
    def run(t):
        return net(t)

    assert_network_close(run(ids()).asnumpy(), net(ids()).asnumpy(), n_terms=CHAIN["llama"], what="jit vs PyNative")


def test_explanations_for_what_is_refused(ms_cpu):
    trace = mb.explain(zoo.make_containers(), "nf4")
    text = trace.explain()
    gate0, gate1 = trace.decision("gate.mm[0]"), trace.decision("gate.mm[1]")
    assert gate0.status == gate1.status == "kept"
    assert gate0.reasons["nf4-matmul"] == (  # self.w is also read by self.w.mean()
        "weight used elsewhere (read more than once); tied weights are kept unless a rule sets allow_shared"
    )
    assert gate1.reasons["nf4-matmul"] == (
        "primitive attribute 'mm' of gate is shared by 2 calls; substituting it would change all of them"
    )
    assert trace.decision("helper.matmul").rule == "nf4-matmul"  # found through the helper method
    assert trace.decision("shared").rule == "nf4-linear"
    assert "gate.mm[1] [call]: kept in full precision" in text
    opaque = mb.explain(zoo.OpaqueNet(), "nf4")
    assert opaque.decision("opaque").note.startswith("source unavailable")
    assert opaque.decision("opaque").reasons["nf4-linear"] == "type Opaque is not one of ['@linear']"
    assert opaque.decision("opaque.inner").rule == "nf4-linear"  # a child is still swapped in the tree
    assert "opaque [cell]: kept in full precision (source unavailable" in opaque.explain()

    llama = mb.explain(zoo.make_llama(), "nf4")
    assert llama.decision("ops.matmul").reasons["nf4-matmul"] == "a functional call that cannot be rewritten in place"
    assert llama.decision("embed_tokens.array_mul").reasons["nf4-matmul"].startswith("weight used elsewhere")
    bert = mb.explain(zoo.make_bert(), mb.BitsAndBytesConfig(load_in_4bit=True, llm_int8_skip_modules=["classifier"]))
    assert bert.decision("classifier").reasons["fp4-linear"] == "excluded by name: 'classifier' matches 'classifier'"
    assert bert.decision("pooler").rule == "fp4-linear"


def test_reused_cell_is_replaced_at_every_path(ms_cpu):
    net = zoo.make_containers()
    mb.apply(net, "int8")
    assert net.shared is net.again and isinstance(net.shared, mb.Linear8bit)
    assert isinstance(net.helper.matmul, QuantizedMatmul) and net.helper.proj.shape == (1,)


def test_tied_weights_need_an_explicit_rule(ms_cpu):
    net = zoo.TiedHead()
    x = ids()
    y0 = net(x).asnumpy()
    trace = mb.explain(net, "nf4")
    assert trace.decision("head_mm").reasons["nf4-matmul"].startswith("weight used elsewhere")
    table = net.embed.embedding_table
    result = mb.apply(net, "nf4")
    assert [r.path for r in result.quantized] == ["proj"] and not isinstance(net.head_mm, nn.Cell)
    # a rule that says how: quantize the head's use as a copy, the embedding keeps the float table
    rule = Rule(
        "tied-head",
        "matmul-param",
        {"to": "linear8bit"},
        where={"allow_shared": True, "include": ["head_mm"]},
        priority=10,
    )
    result = mb.apply(net, RuleSet([rule]), sample_inputs=(x,))
    assert [r.path for r in result.quantized] == ["head_mm"] and result.quantized[0].bytes_before == 0
    assert isinstance(net.head_mm, QuantizedMatmul) and net.embed.embedding_table is table
    assert result.report.end_to_end["cosine"] > 0.99
    cos = (net(x).asnumpy() * y0).sum() / np.linalg.norm(net(x).asnumpy()) / np.linalg.norm(y0)
    assert cos > 0.99


def test_failing_replacement_rolls_everything_back(ms_cpu):
    calls = {"n": 0}

    @register_replacement("fails_third", params={}, scheme="nf4")
    def fails_third(view):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return mb.Linear4bit(
            view.in_features, view.out_features, view.bias is not None, weight=view.weight, bias_value=view.bias
        )

    net = zoo.make_containers()
    x = feats()
    y0 = net(x).asnumpy()
    cells = dict(net.cells_and_names())
    params = {n: (p, p.asnumpy().copy()) for n, p in net.parameters_and_names()}
    names = [p.name for p in net.get_parameters()]
    rules = RuleSet(
        [
            Rule("boom", "linear-cell", {"to": "fails_third"}, priority=1),
            Rule("mm", "matmul-param", {"to": "linear8bit"}, priority=1),
        ]
    )
    with pytest.raises(
        RewriteError, match="rule 'boom' failed to build its replacement: RuntimeError: injected failure"
    ):
        mb.apply(net, rules)
    assert calls["n"] == 3
    assert dict(net.cells_and_names()).keys() == cells.keys()
    assert all(net_cell is cells[n] for n, net_cell in net.cells_and_names())
    assert [p.name for p in net.get_parameters()] == names
    for n, p in net.parameters_and_names():
        assert p is params[n][0]
        np.testing.assert_array_equal(p.asnumpy(), params[n][1])
    np.testing.assert_array_equal(net(x).asnumpy(), y0)
    assert not isinstance(net.helper.matmul, nn.Cell)  # the primitive is back


def test_verification_violation_modes(ms_cpu):
    strict = {"nf4": mb.verify.Bound(0.001, 0.99999)}  # impossible for 4 bits
    net = zoo.make_bert()
    x = ids()
    y0 = net(x).asnumpy()
    with pytest.raises(RewriteError, match=r"verification failed \(relative error .* > 0.001"):
        mb.apply(net, "nf4", bounds=strict)
    np.testing.assert_array_equal(net(x).asnumpy(), y0)  # restored
    result = mb.apply(net, "nf4", bounds=strict, on_violation="keep_float")
    assert not result.quantized and all(r.action == "kept_float" for r in result.rewrites)
    assert isinstance(net.pooler, nn.Dense) and result.report.passed
    result = mb.apply(zoo.make_bert(), "nf4", bounds=strict, on_violation="warn")
    assert len(result.quantized) == 14 and len(result.report.violations) == 14
    with pytest.raises(
        ValueError, match=r"on_violation must be one of \('raise', 'keep_float', 'warn'\), got 'ignore'"
    ):
        mb.apply(zoo.make_bert(), "nf4", on_violation="ignore")


def test_idempotent_and_dry_run(ms_cpu):
    net = zoo.make_llama()
    dry = mb.apply(net, "nf4", dry_run=True)
    assert dry.dry_run and len(dry.rewrites) == 14 and isinstance(net.layers[0].mlp.up_proj, nn.Dense)
    first = mb.apply(net, "nf4")
    params = [(p.name, p.shape) for p in net.get_parameters()]
    second = mb.apply(net, "nf4")
    assert len(first.quantized) == 14 and not second.rewrites
    assert [(p.name, p.shape) for p in net.get_parameters()] == params


def test_kernel_and_reference_backends_agree(ms_cpu):
    if not _lib.available():
        pytest.skip("kernel library not built")
    a, b = zoo.make_bert(), zoo.make_bert()
    mb.apply(a, "nf4", backend="cpu")
    mb.apply(b, "nf4", backend="reference")
    assert_network_close(a(ids()).asnumpy(), b(ids()).asnumpy(), n_terms=CHAIN["bert"], what="cpu vs reference")


def test_bad_input_is_refused_and_the_network_untouched(ms_cpu):
    with pytest.raises(TypeError, match="apply expects a mindspore.nn.Cell, got builtins.dict"):
        mb.apply({}, "nf4")
    net = zoo.make_bert()
    y0 = net(ids()).asnumpy()
    with pytest.raises(mb.PassError, match=r"sample_inputs: running the network on them failed .*network is untouched"):
        mb.apply(net, "nf4", sample_inputs=(Tensor(np.zeros((2, 3, 4), np.float32)),))
    np.testing.assert_array_equal(net(ids()).asnumpy(), y0)
    with pytest.raises(ValueError, match=r"rules: 'nf5' is neither a built-in family"):
        mb.apply(net, "nf5")
    conflict = RuleSet(
        [
            Rule("a", "linear-cell", {"to": "linear8bit"}, priority=5),
            Rule("b", "linear-cell", {"to": "linear4bit"}, priority=5),
        ]
    )
    with pytest.raises(ValueError, match="conflicting rules of equal priority 5 on .*: 'a' and 'b'"):
        mb.apply(net, conflict)
    unused = mb.apply(
        zoo.make_bert(),
        RuleSet([Rule("mine", "linear-cell", {"to": "linear8bit"}, where={"include": ["nothing_here"]})]),
    )
    assert "warning: rule 'mine' matched nothing" in unused.summary()
    with pytest.raises(ValueError, match=r"backend must be one of"):
        mb.apply(zoo.make_bert(), "nf4", backend="gpu")


def test_quantize_with_bitsandbytes_config_keeps_the_head(ms_cpu):
    from msbnb_pass import BitsAndBytesConfig

    class WithHead(nn.Cell):
        def __init__(self):
            super().__init__()
            self.body = nn.Dense(64, 64)
            self.lm_head = nn.Dense(64, 96)

        def construct(self, x):
            return self.lm_head(self.body(x))

    net = WithHead()
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        llm_int8_skip_modules=["nothing_else"],
    )
    result = mb.quantize(net, cfg)
    assert isinstance(net.body, mb.Linear4bit) and net.body.quant_state.nested
    assert isinstance(net.lm_head, nn.Dense)  # unlike transformers, a user skip list does not drop the head
    assert [r.path for r in result.quantized] == ["body"]
    net8 = WithHead()
    mb.quantize(net8, BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0))
    assert isinstance(net8.body, mb.Linear8bitLt) and net8.body.threshold == 4.0
    with pytest.raises(TypeError, match="quantize expects a BitsAndBytesConfig or QuantConfig, got str"):
        mb.quantize(net8, "nf4")


def test_rss_drops_after_the_pass(ms_cpu):
    from msbnb_pass.memory import current_rss, release_memory

    class Big(nn.Cell):
        def __init__(self):
            super().__init__()
            self.layers = nn.CellList([nn.Dense(1024, 1024) for _ in range(8)])

        def construct(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    mb.apply(nn.SequentialCell([nn.Dense(64, 64)]), "nf4")  # warm up libraries and caches
    release_memory()
    base = current_rss()
    net = Big()
    fp32 = current_rss() - base
    assert fp32 > 30 * 2**20
    mb.apply(net, "nf4")
    after = current_rss() - base
    assert after < 0.35 * fp32, (after / 2**20, fp32 / 2**20)


def test_a_linear_like_layer_whose_weight_is_not_2d_is_explained(ms_cpu):
    from mindspore import Parameter

    class Conv1x1(nn.Cell):
        def __init__(self):
            super().__init__()
            self.kernel = Parameter(Tensor(np.ones((8, 8, 1), np.float32)), name="kernel")

        def construct(self, x):
            return x

    class Net(nn.Cell):
        def __init__(self):
            super().__init__()
            self.conv = Conv1x1()

        def construct(self, x):
            return self.conv(x)

    mb.register_linear(Conv1x1, weight="kernel", bias=None)
    net = Net()
    result = mb.apply(net, "nf4")
    assert not result.rewrites and isinstance(net.conv, Conv1x1)
    assert result.trace.decision("conv").reasons["nf4-linear"] == (
        "weight conv.kernel is 3-D, a Linear needs a 2-D weight"
    )
