"""LoRA as a stage of the pass: ``apply(net, ["nf4", LoraConfig(...)])``, the built-in family "lora" and
``[lora]`` TOML files turn a float model into a QLoRA model in one transaction; bad configs and failures
leave the network exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

from tests.test_lora import _llama

TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _state(net) -> dict[str, tuple[str, bytes, bool]]:
    """Every parameter: its owner's class, its bytes and whether it is trainable."""
    cells = dict(net.cells_and_names())
    return {
        n: (type(cells[n.rpartition(".")[0]]).__name__, p.asnumpy().tobytes(), bool(p.requires_grad))
        for n, p in net.parameters_and_names()
    }


def test_one_pass_qlora_equals_quantize_then_nothing(ms_cpu):
    from mindspore import Tensor

    from msbnb_pass import Linear4bit, Linear4bitWithLoRA, LoraConfig, apply

    net = _llama()
    result = apply(net, ["nf4", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)])
    paths = [
        f"model.layers.{i}.{'self_attn' if m in ('q_proj', 'v_proj') else 'mlp'}.{m}" for i in range(2) for m in TARGETS
    ]
    assert sorted(result.lora) == sorted(paths)
    assert len(result.quantized) == 14  # every projection quantized; the adapters wrap 10 of them
    layer0 = net.model.layers[0]
    assert isinstance(layer0.self_attn.q_proj, Linear4bitWithLoRA)
    assert isinstance(layer0.self_attn.q_proj.base_layer, Linear4bit)
    assert isinstance(layer0.self_attn.k_proj, Linear4bit)
    assert "added LoRA adapters (r=4, lora_alpha=8) to 10 layer(s)" in result.summary()
    trainable = sorted(p.name for p in net.trainable_params())
    assert trainable == sorted(f"{p}.lora_{ab}.weight" for p in paths for ab in "AB")
    assert all(p.name == n for n, p in net.parameters_and_names())  # names are tree paths (GRAPH_MODE needs it)
    assert net.lora_config.r == 4

    twin = _llama()
    apply(twin, "nf4")
    ids = Tensor(np.arange(16, dtype=np.int32).reshape(2, 8) % 64)
    # lora_B starts at zero: the QLoRA model computes exactly what the quantized model computes
    assert np.array_equal(net(ids).asnumpy(), twin(ids).asnumpy())
    assert result.to_dict()["lora_config"]["r"] == 4


def test_builtin_lora_family_and_toml_file(ms_cpu, tmp_path):
    from msbnb_pass import Linear4bitWithLoRA, apply
    from msbnb_pass.lora import lora_layers

    net = _llama()
    apply(net, ["nf4", "lora"])  # rules/lora.toml: r 8, alpha 16, all seven projections
    layers = lora_layers(net)
    assert len(layers) == 14 and all(isinstance(lay, Linear4bitWithLoRA) for lay in layers.values())
    assert {(lay.r, lay.lora_alpha) for lay in layers.values()} == {(8, 16)}

    f = tmp_path / "my_lora.toml"
    f.write_text('[lora]\nr = 2\nlora_alpha = 4\ntarget_modules = ".*\\\\.(q|v)_proj"\n')
    net = _llama()
    dry = apply(net, ["int8", str(f)], dry_run=True)
    assert dry.lora == [f"model.layers.{i}.self_attn.{m}_proj" for i in range(2) for m in "qv"]
    assert "would add LoRA adapters (r=2, lora_alpha=4) to 4 layer(s)" in dry.summary()
    assert not lora_layers(net)  # a dry run changes nothing
    apply(net, ["int8", str(f)])
    assert sorted(lora_layers(net)) == dry.lora
    assert type(net.model.layers[1].self_attn.v_proj).__name__ == "Linear8bitWithLoRA"


def test_lora_stage_errors_change_nothing(ms_cpu, tmp_path):
    from msbnb_pass import LoraConfig, apply
    from msbnb_pass.lora import LoraError

    net = _llama()
    before = _state(net)
    with pytest.raises(LoraError, match=r"target_modules = \['q_prj'\] matches no Linear-like layer; close names: "):
        apply(net, ["nf4", LoraConfig(target_modules=["q_prj"])])
    assert _state(net) == before
    with pytest.raises(LoraError, match="one LoRA config per pass \\(a layer takes one adapter\\), got 2"):
        apply(net, ["nf4", LoraConfig(), "lora"])
    cases = {
        "[lora]\nr = 0\n": "[lora]: r must be a positive integer, got 0",
        "[lora]\nlora_alpha = -1\n": "[lora]: lora_alpha must be a positive finite number, got -1",
        "[lora]\nrank = 4\n": "[lora]: unknown key 'rank'; accepted: ['r', 'lora_alpha',",
        "[lora]\nlora_alfa = 4\n": "[lora]: unknown key 'lora_alfa'; did you mean 'lora_alpha'?",
        '[lora]\nr = 4\n[[rule]]\nname = "x"\n': "a LoRA file holds only the [lora] table, found also ['rule']",
    }
    for i, (text, message) in enumerate(cases.items()):
        f = tmp_path / f"bad{i}.toml"
        f.write_text(text)
        with pytest.raises(LoraError) as info:
            apply(net, ["nf4", str(f)])
        assert str(info.value) == f"{f}: {message}" or str(info.value).startswith(f"{f}: {message}")
        assert _state(net) == before


def test_failure_in_the_lora_stage_rolls_back_the_quantization(ms_cpu, monkeypatch):
    from msbnb_pass import LoraConfig, apply
    from msbnb_pass.lora import LoraLayer

    net = _llama()
    before = _state(net)
    real = LoraLayer._from_base.__func__
    calls = []

    def failing(cls, base, r, alpha, dropout):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure while building the third adapter")
        return real(cls, base, r, alpha, dropout)

    monkeypatch.setattr(LoraLayer, "_from_base", classmethod(failing))
    with pytest.raises(RuntimeError, match="injected failure"):
        apply(net, ["nf4", LoraConfig(target_modules=TARGETS)])
    assert len(calls) == 3
    # every layer float again, every byte and every requires_grad flag as before, no lora_config left
    assert _state(net) == before
    assert "lora_config" not in net.__dict__


def test_lora_stage_failure_after_wrapping_rolls_back(ms_cpu, monkeypatch):
    """A failure after the adapters are attached (here: the parameter renaming) restores the float
    network, the frozen flags and the missing lora_config."""
    import msbnb_pass.passes as passes
    from msbnb_pass import LoraConfig, apply

    net = _llama()
    before = _state(net)

    def boom(txn, net):
        raise RuntimeError("injected failure after the LoRA stage")

    monkeypatch.setattr(passes, "rename_parameters", boom)
    with pytest.raises(RuntimeError, match="injected failure after the LoRA stage"):
        apply(net, ["nf4", LoraConfig(target_modules=TARGETS)])
    assert _state(net) == before
    assert "lora_config" not in net.__dict__
