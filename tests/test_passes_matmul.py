"""The pass on primitive matmuls: the fused bias pattern, both weight layouts, the transpose_a refusal, and its
own kernel check catching a wrong kernel."""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor

import msbnb_pass as mb
from msbnb_pass import formats as fm
from msbnb_pass.kernels import _lib
from msbnb_pass.kernels.ops import FusedLinear4bit
from msbnb_pass.rewrite import RewriteError

from . import zoo
from .bounds import assert_matmul_close, assert_network_close


def feats(seed=0):
    return np.random.default_rng(seed).standard_normal((4, 64)).astype(np.float32)


def test_matmul_bias_is_fused_for_both_weight_layouts(ms_cpu):
    net = zoo.ProjBias()
    w_t, b_t = net.w_t.asnumpy(), net.b_t.asnumpy()  # [out, in]
    w_n, b_n = net.w_n.asnumpy(), net.b_n.asnumpy()  # [in, out]
    x = feats()
    result = mb.apply(net, "nf4", sample_inputs=(Tensor(x),))
    assert sorted((r.path, r.rule, r.action) for r in result.rewrites) == [
        ("mm_n", "nf4-matmul-bias", "quantized"),
        ("mm_t", "nf4-matmul-bias", "quantized"),
    ]
    assert result.report.passed
    # the packed weights are NF4 of the [out, in] weight: transposed for the transpose_b=False matmul
    for lin, w in ((net.mm_t.linear, w_t), (net.mm_n.linear, w_n.T)):
        packed, state = fm.quantize_4bit(np.ascontiguousarray(w), 64, "nf4", compress_statistics=True)
        np.testing.assert_array_equal(lin.weight.asnumpy().reshape(-1), packed.reshape(-1))
        np.testing.assert_array_equal(lin.weight_absmax.asnumpy(), state.absmax)
    # the bias is added inside the kernel, the add primitive now passes its input through
    h = net.add_t(net.mm_t(Tensor(x), net.w_t), net.b_t).asnumpy()
    assert_matmul_close(h, x, net.mm_t.linear.dequantized_weight(), b_t, what="mm_t + bias")
    h = np.maximum(h, 0)
    y = net.add_n(net.mm_n(Tensor(h), net.w_n), net.b_n).asnumpy()
    assert_matmul_close(y, h, net.mm_n.linear.dequantized_weight(), b_n, what="mm_n + bias")
    np.testing.assert_array_equal(net(Tensor(x)).asnumpy(), y)


def test_matmul_bias_rewrite_compiles_in_graph_mode(ms_cpu):
    net = zoo.ProjBias()
    mb.apply(net, "int8")
    x = Tensor(feats(1))
    y_pynative = net(x).asnumpy()
    ms_cpu.set_context(mode=ms_cpu.GRAPH_MODE)
    try:
        y_graph = net(x).asnumpy()
    finally:
        ms_cpu.set_context(mode=ms_cpu.PYNATIVE_MODE)
    assert_network_close(y_graph, y_pynative, n_terms=64 + 128, what="GRAPH_MODE vs PyNative")


def test_transpose_a_is_refused_with_its_reason(ms_cpu):
    net = zoo.TransposedActivation()
    decision = mb.explain(net, "nf4").decision("mm")
    assert decision.status == "kept"
    assert decision.reasons["nf4-matmul"] == (
        "transpose_a=True: the activation operand is transposed, which the quantized matmul does not do"
    )
    x = Tensor(feats().T.copy())  # [in, rows]
    y0 = net(x).asnumpy()
    result = mb.apply(net, "nf4")
    assert not result.rewrites
    np.testing.assert_array_equal(net(x).asnumpy(), y0)


@pytest.mark.skipif(not _lib.available(), reason="kernel library not built")
def test_the_pass_catches_a_wrong_kernel(ms_cpu, monkeypatch):
    """A kernel 0.1% off (far inside NF4's quantization error, so the float-vs-quantized bound cannot see it)
    is caught by the pass's kernel-vs-reference check, and the network is restored."""
    right = FusedLinear4bit.construct

    def slightly_wrong(self, *args):
        return right(self, *args) * 1.001

    net = zoo.make_bert()
    ids = Tensor(np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int32))
    y0 = net(ids).asnumpy()
    monkeypatch.setattr(FusedLinear4bit, "construct", slightly_wrong)
    with pytest.raises(
        RewriteError,
        match=r"classifier: verification failed \(kernel differs from the reference by [0-9.]+x the fp32 bound",
    ):
        mb.apply(net, "nf4", backend="cpu")
    np.testing.assert_array_equal(net(ids).asnumpy(), y0)
    monkeypatch.setattr(FusedLinear4bit, "construct", right)
    assert mb.apply(net, "nf4", backend="cpu").report.passed
