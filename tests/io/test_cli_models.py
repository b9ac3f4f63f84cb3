"""msbnb inspect / msbnb convert."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np

import msbnb_pass as mb
from msbnb_pass.cli import main

from .checkpoints import write_llama, write_llama_gguf

IDS = ms.Tensor(np.arange(12, dtype=np.int32).reshape(2, 6))


def test_inspect_reports_formats_and_bytes(tmp_path, capsys):
    write_llama(tmp_path / "ckpt", "nf4-dq", "BF16")
    assert main(["inspect", str(tmp_path / "ckpt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == {"nf4": 14} and report["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    sizes = {t["name"]: t for t in report["tensors"]}
    t = sizes["model.layers.0.mlp.up_proj.weight"]
    assert t["format"] == "nf4" and t["dtype"] == "U8" and t["bytes"] == 128 * 64 // 2
    assert sizes["model.norm.weight"]["dtype"] == "BF16" and sizes["model.norm.weight"]["bytes"] == 128
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    assert "nf4" in capsys.readouterr().out


def test_convert_float_to_nf4_equals_quantizing_on_load(tmp_path, capsys, ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    write_llama(tmp_path / "float", "float", "F16")
    assert main(["convert", str(tmp_path / "float"), str(tmp_path / "nf4"), "--quantize", "nf4", "--double-quant"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized_layers"] == 14
    converted = mb.from_pretrained(tmp_path / "nf4")
    config = mb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    on_load = mb.from_pretrained(tmp_path / "float", quantization_config=config)
    assert np.array_equal(converted(IDS).asnumpy(), on_load(IDS).asnumpy())
    # already-quantized sources are never re-quantized
    assert main(["convert", str(tmp_path / "nf4"), str(tmp_path / "again"), "--quantize", "fp4"]) == 2
    assert "re-quantizing would compound errors" in capsys.readouterr().err


def test_convert_gguf_keeps_its_blocks(tmp_path, capsys, ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    write_llama_gguf(tmp_path / "m.gguf")
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "out")]) == 0
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "msbnb" and qc["formats"] == ["int4"]
    assert np.array_equal(
        mb.from_pretrained(tmp_path / "out")(IDS).asnumpy(), mb.from_pretrained(tmp_path / "m.gguf")(IDS).asnumpy()
    )


def test_inspect_gguf(tmp_path, capsys):
    write_llama_gguf(tmp_path / "m.gguf", qtype="Q4_0")
    assert main(["inspect", str(tmp_path / "m.gguf"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source_format"] == "gguf" and report["layers"] == {"int4": 15}  # 14 decoder linears + the head
    assert report["config"]["num_key_value_heads"] == 2 and report["quantization_config"] is None


def _word_tokenizer(text: str, directory) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"], vocab_size=128))
    tok.save(str(directory / "tokenizer.json"))


def test_convert_with_calibration_chooses_the_codes_by_gptq(tmp_path, capsys, ms_cpu):
    """--calibration: same files as a plain convert (keys, dtypes, nf4 absmax byte for byte: static groups),
    other nibbles, and a lower error than round-to-nearest on the calibration text's activations."""
    from safetensors.numpy import load_file

    ms.set_context(mode=ms.PYNATIVE_MODE)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(120)]
    text = " ".join(rng.choice(words, 4000))
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    write_llama(tmp_path / "float", "float", "F32")
    _word_tokenizer(text, tmp_path / "float")
    src = str(tmp_path / "float")
    assert main(["convert", src, str(tmp_path / "rtn"), "--quantize", "nf4", "--double-quant"]) == 0
    capsys.readouterr()
    args = ["--quantize", "nf4", "--double-quant", "--calibration", str(tmp_path / "text.txt")]
    assert (
        main(["convert", src, str(tmp_path / "gptq"), *args, "--calibration-samples", "4", "--calibration-len", "32"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["quantized_layers"] == 14
    assert summary["calibration"]["tokens"] == 128 and summary["calibration"]["windows"] == [4, 32]
    assert summary["calibration"]["layer_error_vs_round_to_nearest_median"] < 0.9
    rtn, cal = load_file(tmp_path / "rtn" / "model.safetensors"), load_file(tmp_path / "gptq" / "model.safetensors")
    assert rtn.keys() == cal.keys()
    for key in rtn:
        assert (rtn[key].dtype, rtn[key].shape) == (cal[key].dtype, cal[key].shape), key
        if key.endswith((".absmax", ".nested_absmax", ".nested_quant_map", ".quant_map")) or "norm" in key:
            np.testing.assert_array_equal(rtn[key], cal[key], err_msg=key)
    changed = [k for k in rtn if k.endswith("proj.weight") and not np.array_equal(rtn[k], cal[k])]
    assert len(changed) == 14
    assert (tmp_path / "gptq" / "tokenizer.json").is_file()
    assert (
        json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"]
        == "nf4"
    )
    assert len(mb.from_pretrained(tmp_path / "gptq").checkpoint_info.quantized_layers) == 14


def test_convert_calibration_errors(tmp_path, capsys, ms_cpu):
    write_llama(tmp_path / "float", "float", "F32")
    _word_tokenizer("a b c", tmp_path / "float")
    (tmp_path / "short.txt").write_text("a b c " * 10, encoding="utf-8")
    src, out = str(tmp_path / "float"), str(tmp_path / "out")
    cases = [
        (
            ["--calibration", "pydoc"],
            "--calibration needs --quantize nf4, fp4 or int8 (the codes it chooses), got 'none'",
        ),
        (
            ["--quantize", "nf4", "--calibration", str(tmp_path / "short.txt")],
            "--calibration: the text has 30 tokens, 8 windows of 256 need 2048; give more text or fewer/shorter windows",
        ),
        (
            ["--quantize", "nf4", "--calibration", "pydoc", "--calibration-len", "0"],
            "--calibration-len must be >= 1, got 0",
        ),
        (
            ["--quantize", "nf4", "--calibration", str(tmp_path / "missing.txt")],
            f"--calibration {tmp_path / 'missing.txt'}: cannot read it (No such file or directory); give a text file or "
            "'pydoc'",
        ),
    ]
    for extra, message in cases:
        assert main(["convert", src, out, *extra]) == 2
        assert message in capsys.readouterr().err
    write_llama(tmp_path / "nf4", "nf4-dq", "F32")
    assert main(["convert", str(tmp_path / "nf4"), out, "--quantize", "nf4", "--calibration", "pydoc"]) == 2
    assert "calibrated rounding needs the float weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
