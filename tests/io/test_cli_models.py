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
