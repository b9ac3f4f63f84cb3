"""``apply(net, rules, calibration=samples)``: calibrated (GPTQ) rounding through the pass.

On the zoo's LLaMA-shaped network: every rewritten layer reports its output error on the calibration
activations before (round-to-nearest) and after (calibrated), recomputed here from activations captured
independently; the calibrated network is closer to the float one on held-out inputs; its state dict has the
round-to-nearest layout key for key; the rule option ``rewrite.rounding``; bad calibration arguments raise
their exact messages and leave the network untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
from mindspore import Tensor, nn

import msbnb_pass as mb
from msbnb_pass import calibrate
from msbnb_pass.errors import PassError, RuleError
from msbnb_pass.match import find_matches
from msbnb_pass.passes import build_graph
from msbnb_pass.pretrained import state_dict
from msbnb_pass.rules import Rule, RuleSet

from . import zoo
from .bounds import matmul_bound


def ids(seed: int, batch: int = 2, t: int = 16) -> Tensor:
    return Tensor(np.random.default_rng(seed).integers(0, 96, (batch, t)).astype(np.int32))


CALIBRATION = [(ids(s),) for s in range(6)]
HELD_OUT = ids(100, batch=4)


@pytest.fixture(autouse=True)
def _pynative(ms_cpu):
    ms_cpu.set_context(mode=ms_cpu.PYNATIVE_MODE)


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y.astype(np.float64) - ref) / np.linalg.norm(ref))


def _inputs_of(net, path: str, samples) -> np.ndarray:
    """The rows a Dense cell sees over the samples, captured with a hook of this test's own."""
    cell = dict(net.cells_and_names())[path]
    rows = []
    handle = cell.register_forward_pre_hook(lambda c, args: rows.append(args[0].asnumpy().reshape(-1, c.in_channels)))
    for args in samples:
        net(*args)
    handle.remove()
    return np.concatenate(rows).astype(np.float64)


@pytest.mark.parametrize("family", ["nf4"])  # int4, llm_int8: test_rule_file_with_rounding_gptq
def test_calibrated_rounding_lowers_each_layer_and_the_network_error(family):
    ref_net = zoo.make_llama()
    ref = ref_net(HELD_OUT).asnumpy().astype(np.float64)
    x = _inputs_of(ref_net, "layers.1.mlp.down_proj", CALIBRATION)
    w = ref_net.layers[1].mlp.down_proj.weight.asnumpy().astype(np.float64)

    rtn = zoo.make_llama()
    res_rtn = mb.apply(rtn, family, verify=False)
    cal = zoo.make_llama()
    res = mb.apply(cal, family, calibration=CALIBRATION)

    assert len(res.quantized) == len(res_rtn.quantized) == 14
    for r in res.quantized:
        assert r.rounding == "gptq"
        assert r.error_calibrated < 0.9 * r.error_nearest, r.path
    assert all(r.rounding == "nearest" and r.error_calibrated is None for r in res_rtn.quantized)
    # the reported errors are ||X (W - Q)^T|| / ||X W^T|| on the calibration activations, for both codes
    (down,) = [r for r in res.quantized if r.path == "layers.1.mlp.down_proj"]
    y = x @ w.T
    for net, reported in ((rtn, down.error_nearest), (cal, down.error_calibrated)):
        q = net.layers[1].mlp.down_proj.dequantized_weight().astype(np.float64)
        assert reported == pytest.approx(np.linalg.norm(x @ q.T - y) / np.linalg.norm(y), rel=1e-4)
    assert res.calibration["samples"] == 6 and res.calibration["rows"] == 6 * 32
    summary = res.summary()
    assert "calibrated rounding (gptq) on 14 layer(s), 6 sample(s)" in summary
    assert res.to_dict()["calibration"]["samples"] == 6

    # end to end, on inputs the calibration never saw
    e_rtn = _rel(rtn(HELD_OUT).asnumpy(), ref)
    e_cal = _rel(cal(HELD_OUT).asnumpy(), ref)
    assert e_cal < 0.95 * e_rtn, (e_cal, e_rtn)

    # the same storage layout as round-to-nearest: keys, dtypes, shapes; float parameters untouched
    sd_rtn, sd_cal = state_dict(rtn), state_dict(cal)
    assert sd_rtn.keys() == sd_cal.keys()
    changed = 0
    for key, a in sd_rtn.items():
        b = sd_cal[key]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), key
        changed += not np.array_equal(a, b)
        if key.startswith("embed_tokens") or "norm" in key:
            np.testing.assert_array_equal(a, b)
    assert changed >= 14  # every quantized weight got other codes


def test_rule_option_rounding():
    rules = RuleSet.builtin("nf4")
    nearest = rules.copy([r.with_changes(rewrite={"rounding": "nearest"}) for r in rules])
    net = zoo.make_llama()
    res = mb.apply(net, nearest, calibration=CALIBRATION)  # an explicit "nearest" opts out of the calibration
    assert all(r.rounding == "nearest" and r.error_nearest is None for r in res.quantized)
    assert "calibrated rounding" not in res.summary() and res.calibration == {}

    gptq = rules.copy([r.with_changes(rewrite={"rounding": "gptq"}) for r in rules])
    with pytest.raises(PassError) as exc:
        mb.apply(zoo.make_llama(), gptq)
    assert str(exc.value) == (
        "rules/nf4.toml:4: rule 'nf4-linear': rewrite.rounding = 'gptq' needs calibration samples: "
        "apply(net, rules, calibration=[(x,), ...])"
    )
    with pytest.raises(RuleError) as exc:
        RuleSet().add(Rule("r", "linear-cell", {"to": "linear4bit", "rounding": "best"}))
    assert str(exc.value) == (
        "<python>: rule 'r': rewrite.rounding = 'best' is not accepted; accepted: ['nearest', 'gptq'] "
        "(replacement 'linear4bit')"
    )


def test_rule_file_with_rounding_gptq(tmp_path):
    """Cells to int4, the attention's primitive-attribute matmuls to LLM.int8(): both calibrated by the file."""
    path = tmp_path / "calibrated.toml"
    path.write_text(
        '[[rule]]\nname = "cells-int4"\npattern = "linear-cell"\npriority = 100\n'
        'rewrite = { to = "linear4bit", quant_type = "int4", blocksize = 64, double_quant = false, '
        'rounding = "gptq" }\n\n'
        '[[rule]]\nname = "matmuls-int8"\npattern = "matmul-param"\npriority = 50\n'
        'rewrite = { to = "linear8bitlt", threshold = 6.0, rounding = "gptq" }\n'
    )
    res = mb.apply(zoo.make_llama(), str(path), calibration=CALIBRATION)
    by_rule = {r.path: r.rule for r in res.quantized}
    mlp = {f"layers.{i}.mlp.{p}" for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
    attn = {f"layers.{i}.self_attn.mm_{p}" for i in (0, 1) for p in "qkvo"}
    assert by_rule == {**dict.fromkeys(mlp, "cells-int4"), **dict.fromkeys(attn, "matmuls-int8")}
    for r in res.quantized:
        assert r.rounding == "gptq" and r.error_calibrated < 0.9 * r.error_nearest, r.path
    assert not res.report.violations


def _params(net) -> dict[str, np.ndarray]:
    return {p.name: p.asnumpy().copy() for p in net.get_parameters()}


def _assert_untouched(net, before: dict[str, np.ndarray]) -> None:
    after = _params(net)
    assert after.keys() == before.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    assert not any(isinstance(c, (mb.Linear4bit, mb.Linear8bit)) for _, c in net.cells_and_names())


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        (5, "calibration must be an iterable of argument tuples for net(*args), e.g. [(input_ids,), ...]; got int 5"),
        (
            ids(0),
            "calibration must be an iterable of argument tuples for net(*args), e.g. [(input_ids,), ...]; got a "
            "Tensor of shape (2, 16) (wrap a single input as [(x,)])",
        ),
        ([], "calibration is empty: it needs at least one sample (an argument tuple for net(*args))"),
        (
            [(ids(0), ids(1))],
            "calibration sample 0 has 2 argument(s), but LlamaLike.construct(ids) does not accept them: too many "
            "positional arguments",
        ),
        (
            [(ids(0),), ("some text",)],
            "calibration sample 1 must be a tuple of the network's inputs (Tensors), got an argument that is str "
            "'some text'",
        ),
        ([()], "calibration sample 0 must be a tuple of the network's inputs (Tensors), got tuple ()"),
    ],
)
def test_bad_calibration_arguments(calibration, message):
    net = zoo.make_llama()
    before = _params(net)
    with pytest.raises(PassError) as exc:
        mb.apply(net, "nf4", calibration=calibration)
    assert str(exc.value) == message
    _assert_untouched(net, before)


def test_a_sample_the_network_rejects_leaves_it_untouched():
    net = zoo.make_llama()
    before = _params(net)
    bad = Tensor(np.zeros((2, 16, 3), np.float32))  # float features where token ids belong
    with pytest.raises(PassError) as exc:
        mb.apply(net, "nf4", calibration=[(ids(0),), (bad,)])
    assert str(exc.value).startswith("calibration sample 1: running the network on it failed (")
    assert str(exc.value).endswith("); the network is untouched")
    _assert_untouched(net, before)
    # and the pass still works on that network afterwards
    assert len(mb.apply(net, "nf4", calibration=CALIBRATION[:2]).quantized) == 14


def test_calibration_refused_for_rules_that_cannot_use_it():
    net = zoo.make_llama()
    before = _params(net)
    rules = RuleSet.builtin("int8")
    training = rules.copy([r.with_changes(rewrite={"has_fp16_weights": True}) for r in rules])
    with pytest.raises(PassError) as exc:
        mb.apply(net, training, calibration=CALIBRATION)
    assert str(exc.value) == (
        "rules/int8.toml:4: rule 'int8-linear': has_fp16_weights = true keeps a float weight, so there are no "
        "codes to calibrate; set rewrite.rounding = 'nearest' on this rule or has_fp16_weights = false"
    )

    mine = RuleSet()

    @mine.register_replacement("my-int8", params={}, scheme="int8")
    def my_int8(view):
        return mb.Linear8bit.from_float(view.weight, view.bias, view.activation, has_fp16_weights=False)

    mine.add(Rule("mine", "linear-cell", {"to": "my-int8"}))
    with pytest.raises(PassError) as exc:
        mb.apply(net, mine, calibration=CALIBRATION)
    assert str(exc.value) == (
        "<python>: rule 'mine': replacement 'my-int8' cannot use calibration (calibrated rounding is built for "
        "['linear4bit', 'linear8bit', 'linear8bitlt']); quantize its layers in an apply() call without calibration"
    )
    _assert_untouched(net, before)


def test_error_budget_with_calibration_chooses_on_nearest_then_calibrates_the_chosen_formats():
    """The accuracy-aware mode picks the formats (measured with round-to-nearest); calibration then picks
    the codes of every chosen quantized layer by GPTQ, and the plan reports the cosine of the result,
    measured on the sample inputs as the mode measures it."""
    x = ids(50, batch=4)
    budget = mb.ErrorBudget(min_cosine=0.999, max_bytes_ratio=1.5)
    plain = mb.apply(zoo.make_llama(), "nf4", sample_inputs=(x,), error_budget=budget).mixed
    ref_net = zoo.make_llama()
    ref = ref_net(x).asnumpy().astype(np.float64)
    net = zoo.make_llama()
    res = mb.apply(net, "nf4", sample_inputs=(x,), error_budget=budget, calibration=CALIBRATION)
    plan = res.mixed
    assert [(c.path, c.chosen) for c in plan.layers] == [(c.path, c.chosen) for c in plain.layers]
    assert plan.counts() != {"nf4:64": 14}  # the budget upgraded some layers
    quantized = [r for r in res.quantized]
    assert quantized and all(r.rounding == "gptq" and r.error_calibrated < r.error_nearest for r in quantized)
    y = net(x).asnumpy().astype(np.float64).reshape(-1, ref.shape[-1])
    r64 = ref.reshape(-1, ref.shape[-1])
    cos = float(((y * r64).sum(1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(r64, axis=1))).mean())
    assert plan.calibrated_cosine == pytest.approx(cos, abs=1e-6)
    assert plan.calibrated_cosine >= budget.min_cosine
    assert "with calibrated rounding (gptq) of the chosen formats: measured" in res.summary()
    assert res.to_dict()["mixed"]["calibrated_cosine"] == plan.calibrated_cosine


def _collect(net, compiled: bool):
    graph = build_graph(net)
    matches, _ = find_matches(graph, RuleSet.builtin("nf4"))
    return calibrate.collect(graph, net, matches, CALIBRATION, compiled=compiled)


def _assert_gram_close(h: np.ndarray, x: np.ndarray, what: str) -> None:
    """``h`` against the float64 ``X^T X``: float32 products summed per sample, then over the samples."""
    ref = x.T @ x
    bound = matmul_bound(x.T, x.T, extra=len(CALIBRATION))
    err = np.abs(h - ref)
    assert (err <= bound).all(), f"{what}: worst {float((err / bound).max()):.2f}x the float32 bound"


def test_calibration_runs_compiled_and_shares_the_sums_of_one_input(caplog):
    """The default collection runs the network under jit with recorders summing X^T X in the graph: the
    sums equal float64 X^T X of independently captured inputs within float32's bound, layers reading one
    tensor (q/k/v, gate/up) share a Hessian, and the network comes back unchanged (layers, names, outputs)."""
    net = zoo.make_llama()
    names = [p.name for p in net.get_parameters()]
    y0 = net(HELD_OUT).asnumpy()
    with caplog.at_level("INFO", logger="msbnb_pass.calibrate"):
        cal = _collect(net, compiled=True)
    assert "op by op" not in caplog.text
    assert cal.samples == 6 and set(cal.rows.values()) == {6 * 32}
    h = cal.hessians
    for layer in (0, 1):
        attn = f"layers.{layer}.self_attn::construct:"
        q, k, v, o = (
            next(key for key in h if key.startswith(attn) and key.endswith(f"mm_{p}#{i}"))
            for p, i in (("q", 1), ("k", 2), ("v", 3), ("o", 8))
        )
        mlp = f"layers.{layer}.mlp."
        assert h[q] is h[k] is h[v] and h[o] is not h[q]
        assert h[mlp + "gate_proj"] is h[mlp + "up_proj"] and h[mlp + "down_proj"] is not h[mlp + "up_proj"]
    assert len({id(m) for m in h.values()}) == 8
    ref_net = zoo.make_llama()
    for path in ("layers.1.mlp.down_proj", "layers.0.mlp.gate_proj"):
        x = _inputs_of(ref_net, path, CALIBRATION)
        _assert_gram_close(h[path], x, path)
        last = x[-32:].astype(np.float32)  # the probe rows: the first rows of the last sample
        np.testing.assert_array_equal(cal.probes[path], last)
    assert [p.name for p in net.get_parameters()] == names
    assert not any(type(c).__name__.startswith("_Recording") for _, c in net.cells_and_names())
    np.testing.assert_array_equal(net(HELD_OUT).asnumpy(), y0)


class _Uncompilable(nn.Cell):
    """Runs in PyNative, not under jit (MindSpore's graph syntax has no try statement)."""

    def __init__(self):
        super().__init__()
        self.inner = zoo.make_llama()

    def construct(self, ids):
        try:
            return self.inner(ids)
        except ValueError:
            return None


def test_a_network_that_does_not_compile_is_recorded_op_by_op(caplog):
    net = _Uncompilable()
    with caplog.at_level("INFO", logger="msbnb_pass.calibrate"):
        cal = _collect(net, compiled=True)
    assert "did not run compiled" in caplog.text and "recording op by op instead" in caplog.text
    x = _inputs_of(zoo.make_llama(), "layers.1.mlp.down_proj", CALIBRATION)
    _assert_gram_close(cal.hessians["inner.layers.1.mlp.down_proj"], x, "op by op")
    np.testing.assert_array_equal(cal.probes["inner.layers.1.mlp.down_proj"], x[:32].astype(np.float32))
