"""Configs: transformers-identical BitsAndBytesConfig JSON, validation, seed configs and conversions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from msbnb_pass.config import BitsAndBytesConfig, Int4Config, Int8Config, QuantConfig

from .conftest import DATA

GOLDEN = json.loads((DATA / "bnb_config_golden.json").read_text())["configs"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_json_is_what_transformers_writes(name):
    case = GOLDEN[name]
    cfg = BitsAndBytesConfig(**case["kwargs"])
    assert json.dumps(cfg.to_dict()) == case["to_dict_json"]  # same keys, same order, same values
    assert cfg.to_json_string() == case["to_json_string"]
    assert cfg.to_json_string(use_diff=False) == case["to_json_string_full"]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_json_roundtrip(name):
    cfg = BitsAndBytesConfig(**GOLDEN[name]["kwargs"])
    for text in (cfg.to_json_string(), cfg.to_json_string(use_diff=False)):
        assert BitsAndBytesConfig.from_json_string(text) == cfg
    assert BitsAndBytesConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_defaults_are_transformers_defaults():
    d = BitsAndBytesConfig().to_dict()
    assert d["llm_int8_threshold"] == 6.0 and d["bnb_4bit_quant_type"] == "fp4"
    assert d["bnb_4bit_compute_dtype"] == "float32" and d["bnb_4bit_quant_storage"] == "uint8"
    assert d["llm_int8_skip_modules"] is None and not d["load_in_4bit"] and not d["load_in_8bit"]
    assert BitsAndBytesConfig().quantization_method() is None
    assert BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").quantization_method() == "nf4"
    assert BitsAndBytesConfig(load_in_8bit=True).quantization_method() == "llm_int8"


def test_dtypes_given_as_objects():
    import mindspore as ms

    assert BitsAndBytesConfig(bnb_4bit_compute_dtype=ms.float16).bnb_4bit_compute_dtype == "float16"
    assert BitsAndBytesConfig(bnb_4bit_compute_dtype=np.float32).bnb_4bit_compute_dtype == "float32"
    assert BitsAndBytesConfig(bnb_4bit_quant_storage=ms.uint8).bnb_4bit_quant_storage == "uint8"


def test_validation_errors():
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit are both True"):
        BitsAndBytesConfig(load_in_4bit=True, load_in_8bit=True)
    cfg = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(ValueError, match="only one can be used at the same time"):
        cfg.load_in_4bit = True
    with pytest.raises(ValueError, match=r"bnb_4bit_quant_type must be one of \('fp4', 'nf4'\), got 'nf5'"):
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf5")
    with pytest.raises(ValueError, match="int4 is not a bitsandbytes format: use Int4Config"):
        BitsAndBytesConfig(bnb_4bit_quant_type="int4")
    with pytest.raises(ValueError, match="llm_int8_threshold must be a finite float >= 0.*got -1.0"):
        BitsAndBytesConfig(llm_int8_threshold=-1.0)
    with pytest.raises(TypeError, match="llm_int8_threshold must be a float >= 0, got '6'"):
        BitsAndBytesConfig(llm_int8_threshold="6")
    with pytest.raises(
        ValueError,
        match=r"bnb_4bit_compute_dtype must be one of \('float32', 'float16', 'bfloat16'\), got 'int8'.*Int4Config",
    ):
        BitsAndBytesConfig(bnb_4bit_compute_dtype="int8")
    with pytest.raises(ValueError, match=r"bnb_4bit_compute_dtype must be one of .*got 'float8'"):
        BitsAndBytesConfig(bnb_4bit_compute_dtype="float8")
    with pytest.raises(TypeError, match="llm_int8_skip_modules must be a list of module names"):
        BitsAndBytesConfig(llm_int8_skip_modules="lm_head")
    with pytest.raises(TypeError, match="load_in_4bit must be a bool, got 1"):
        BitsAndBytesConfig(load_in_4bit=1)
    with pytest.raises(ValueError, match="bnb_4bit_quant_storage must be one of"):
        BitsAndBytesConfig(bnb_4bit_quant_storage="int4")


def test_checkpoint_config_with_bf16_compute_is_accepted_and_can_be_overridden():
    import mindspore as ms

    hf = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    }
    cfg = BitsAndBytesConfig.from_dict(hf)
    assert cfg.bnb_4bit_compute_dtype == "bfloat16" and cfg.to_quant_config().compute_dtype == "bfloat16"
    assert BitsAndBytesConfig.from_json_string(cfg.to_json_string()) == cfg
    for spelling in ("torch.bfloat16", "bf16", ms.bfloat16):
        assert BitsAndBytesConfig(bnb_4bit_compute_dtype=spelling).bnb_4bit_compute_dtype == "bfloat16"
    cfg = BitsAndBytesConfig.from_dict(hf, bnb_4bit_compute_dtype="float32")
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_compute_dtype == "float32"
    cfg2, unused = BitsAndBytesConfig.from_dict({"load_in_8bit": True, "foo": 1}, return_unused_kwargs=True)
    assert unused == {"foo": 1} and cfg2.load_in_8bit
    with pytest.raises(ValueError, match="quant_method must be 'bitsandbytes'"):
        BitsAndBytesConfig.from_dict({"quant_method": "gptq"})


def test_skip_modules_add_to_the_head_instead_of_replacing_it():
    assert BitsAndBytesConfig().skip_modules == ["lm_head"]
    assert BitsAndBytesConfig(llm_int8_skip_modules=["classifier"]).skip_modules == ["lm_head", "classifier"]
    assert BitsAndBytesConfig(llm_int8_skip_modules=["lm_head"]).skip_modules == ["lm_head"]


def test_seed_configs_and_defaults():
    q = QuantConfig(bits=8, symmetric=True, per_channel=True)
    assert q.quant_type == "int8" and q.llm_int8 is False
    c8 = Int8Config(symmetric=True, per_channel=True, threshold=6.0, has_fp16_weights=True)
    assert c8.bits == 8 and c8.llm_int8 is True  # a threshold means LLM.int8()
    assert Int8Config().llm_int8 is False  # the seed's weight-only Linear8bit
    c4 = Int4Config(group_size=128, compress_statistics=True, quant_type="int4")
    assert c4.bits == 4 and c4.group_size == 128
    assert Int4Config().quant_type == "int4" and Int4Config().compress_statistics is True
    assert Int4Config.from_dict(c4.to_dict()) == c4
    assert QuantConfig.from_dict(q.to_dict()) == q
    assert json.loads(c8.to_json_string())["threshold"] == 6.0


def test_seed_config_validation():
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 3"):
        QuantConfig(bits=3)
    with pytest.raises(ValueError, match=r"group_size must be a power of two in \[32, 4096\].*got 100"):
        Int4Config(group_size=100)
    with pytest.raises(ValueError, match=r"group_size must be a power of two in \[32, 4096\].*got 8192"):
        Int4Config(group_size=8192)
    with pytest.raises(ValueError, match="quant_type for bits=4 must be one of .*got 'int8'"):
        Int4Config(quant_type="int8")
    with pytest.raises(ValueError, match="symmetric=False is only defined for quant_type='int4', got 'nf4'"):
        Int4Config(quant_type="nf4", symmetric=False)
    with pytest.raises(ValueError, match="LLM.int8\\(\\) .* is symmetric and per-channel"):
        Int8Config(threshold=6.0, symmetric=False)
    with pytest.raises(ValueError, match="Int4Config has bits=4, got 8"):
        Int4Config(bits=8)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['groupsize'\]"):
        QuantConfig.from_dict({"groupsize": 64})
    with pytest.raises(ValueError, match="threshold must be a finite float >= 0"):
        Int8Config(threshold=-0.5)


def test_conversions_between_seed_and_bnb_configs():
    bnb4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["head2"]
    )
    q4 = bnb4.to_quant_config()
    assert isinstance(q4, Int4Config) and q4.group_size == 64 and q4.quant_type == "nf4" and q4.compress_statistics
    assert q4.to_bnb_config() == bnb4
    bnb8 = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0)
    q8 = QuantConfig.from_bnb_config(bnb8)
    assert isinstance(q8, Int8Config) and q8.llm_int8 and q8.threshold == 4.0
    assert q8.to_bnb_config() == bnb8
    with pytest.raises(ValueError, match="weight-only INT8 .* has no BitsAndBytesConfig equivalent"):
        Int8Config().to_bnb_config()
    with pytest.raises(ValueError, match="quant_type='int4' has no BitsAndBytesConfig equivalent"):
        Int4Config().to_bnb_config()
    with pytest.raises(ValueError, match="BitsAndBytesConfig always uses blocksize 64; this config has group_size=128"):
        Int4Config(quant_type="nf4").to_bnb_config()
    with pytest.raises(ValueError, match="quantizes nothing"):
        BitsAndBytesConfig().to_quant_config()
