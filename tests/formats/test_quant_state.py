"""QuantState <-> state dict with bitsandbytes' key names and JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msbnb_pass import formats as fm


def test_state_dict_keys_and_json_match_bitsandbytes(bnb_golden):
    for prefix in sorted({k.rsplit("/sd/", 1)[0] for k in bnb_golden if "/sd/" in k}):
        _, name, qt, bs = prefix.split("/")
        _, state = fm.quantize_4bit(bnb_golden[f"input/{name}"], int(bs), qt, compress_statistics=True)
        sd = state.to_state_dict("lin.weight")
        ref_keys = sorted(k.split("/sd/")[1] for k in bnb_golden if k.startswith(prefix + "/sd/"))
        assert sorted(k.removeprefix("lin.weight.") for k in sd) == ref_keys
        key = f"quant_state.bitsandbytes__{qt}"
        ours = json.loads(bytes(sd[f"lin.weight.{key}"]))
        ref = json.loads(bytes(bnb_golden[f"{prefix}/sd/{key}"]))
        assert ours.keys() == ref.keys() and list(ours) == list(ref)  # same fields in the same order
        assert {k: v for k, v in ours.items() if k != "nested_offset"} == {
            k: v for k, v in ref.items() if k != "nested_offset"
        }
        assert ours["nested_offset"] == pytest.approx(ref["nested_offset"], rel=1e-6)
        # the JSON text differs only in the offset's digits
        text = bytes(sd[f"lin.weight.{key}"]).decode()
        ref_text = bytes(bnb_golden[f"{prefix}/sd/{key}"]).decode()
        assert text.split('"nested_offset"')[0] == ref_text.split('"nested_offset"')[0]


def test_bitsandbytes_state_dict_loads_and_decodes(bnb_golden):
    prefix = "dq/a130x257/nf4/64"
    sd = {f"w.{k.split('/sd/')[1]}": v for k, v in bnb_golden.items() if k.startswith(prefix + "/sd/")}
    state = fm.QuantState.from_state_dict("w", sd)
    assert state.quant_type == "nf4" and state.blocksize == 64 and state.shape == (130, 257) and state.nested
    A = bnb_golden["input/a130x257"]
    out = fm.dequantize_4bit(bnb_golden[f"{prefix}/packed"], state)
    err = np.abs(out - A)
    expand = lambda a: np.repeat(a, 64)[: A.size].reshape(A.shape)  # noqa: E731
    true_absmax = expand(fm.quantize_4bit(A, 64, "nf4")[1].absmax)
    dq_slack = np.abs(expand(state.dequantized_absmax()) - true_absmax)
    # half the widest NF4 gap (between -1 and -0.696) times the block scale, plus what DQ moved the scale
    assert np.all(err <= 0.1520 * true_absmax + dq_slack + 1e-6)
    assert dq_slack.max() <= 0.02 * true_absmax.max()


@pytest.mark.parametrize(("qt", "symmetric"), [("nf4", True), ("fp4", True), ("int4", True), ("int4", False)])
@pytest.mark.parametrize("dq", [False, True])
def test_roundtrip_through_state_dict(qt, dq, symmetric):
    A = np.random.default_rng(0).standard_normal((33, 70)).astype(np.float32)
    packed, state = fm.quantize_4bit(A, 32, qt, compress_statistics=dq, symmetric=symmetric)
    sd = state.to_state_dict("model.layers.0.mlp.weight.")  # a trailing dot is accepted
    assert all(k.startswith("model.layers.0.mlp.weight.") for k in sd)
    ns = "bitsandbytes" if qt != "int4" else "msbnb"
    assert f"model.layers.0.mlp.weight.quant_state.{ns}__{qt}" in sd
    back = fm.QuantState.from_state_dict("model.layers.0.mlp.weight", sd)
    assert back.equals(state)
    np.testing.assert_array_equal(fm.dequantize_4bit(packed, back), fm.dequantize_4bit(packed, state))


def test_from_state_dict_errors():
    _, state = fm.quantize_4bit(np.ones((4, 64), np.float32), 64, "nf4", compress_statistics=True)
    sd = state.to_state_dict("w")
    with pytest.raises(ValueError, match=r"expected exactly one 'x\.quant_state\.bitsandbytes__<nf4\|fp4>'"):
        fm.QuantState.from_state_dict("x", sd)
    broken = dict(sd)
    del broken["w.nested_absmax"]
    with pytest.raises(KeyError, match="state dict lacks 'w.nested_absmax'"):
        fm.QuantState.from_state_dict("w", broken)
    renamed = {k.replace("bitsandbytes__nf4", "bitsandbytes__af4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="unknown quant state 'w.quant_state.bitsandbytes__af4'"):
        fm.QuantState.from_state_dict("w", renamed)


def test_bits_per_weight_of_nf4_double_quant():
    A = np.random.default_rng(0).standard_normal((4096, 1024)).astype(np.float32)
    packed, state = fm.quantize_4bit(A, 64, "nf4", compress_statistics=True)
    bits = 8 * (packed.nbytes + state.stats_nbytes) / A.size
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)  # ~4.127 bits per weight
    _, plain = fm.quantize_4bit(A, 64, "nf4")
    assert 8 * (packed.nbytes + plain.stats_nbytes) / A.size == pytest.approx(4.5)
