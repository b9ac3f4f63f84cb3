"""The GGUF reader: every tensor decodes to exactly what gguf's own dequantize gives (rows un-permuted),
4-bit blocks become int4 state-dict entries without re-quantization, the tokenizer comes from the metadata,
damaged or unknown files are refused."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from msbnb_pass import formats
from msbnb_pass.formats.quant_state import QuantState
from msbnb_pass.io import CheckpointError, read_gguf, tokenizer_from_gguf
from msbnb_pass.io.gguf_io import hf_name, permute_rows, unpermute_rows

from .checkpoints import LLAMA, write_llama_gguf


def test_row_permutation_inverts_llama_cpp():
    rows = np.arange(24)
    gguf_rows = rows.reshape(3, 2, 4).swapaxes(1, 2).reshape(-1)  # llama.cpp's permute for 3 heads of dim 8
    assert np.array_equal(rows[permute_rows(24, 3)], gguf_rows)
    assert np.array_equal(gguf_rows[unpermute_rows(24, 3)], rows)
    with pytest.raises(CheckpointError, match="24 rows over 5 heads"):
        unpermute_rows(24, 5)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_tensors_decode_exactly_as_gguf_does(tmp_path, qtype):
    cfg, decoded = write_llama_gguf(tmp_path / "m.gguf", qtype=qtype, cfg=dict(LLAMA, tie_word_embeddings=True))
    config, store = read_gguf(tmp_path / "m.gguf")
    assert config["tie_word_embeddings"] and "lm_head.weight" not in store
    for key in ("num_key_value_heads", "hidden_size", "rope_theta", "num_hidden_layers"):
        assert config[key] == cfg[key]
    for key, want in decoded.items():
        if f"{key}.quant_state.msbnb__int4" in store:
            state = QuantState.from_state_dict(key, store)
            assert state.blocksize == 32 and state.symmetric is (qtype == "Q4_0")
            assert store[key].dtype == np.uint8 and store[key].shape == (want.size // 2, 1)
            got = formats.dequantize_4bit(store[key], state)
        else:
            got = store[key]
        assert np.array_equal(got, want), key


def test_tokenizer_from_metadata(tmp_path):
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "he", "Ġt", "Ġthe"]
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_merges(["h e", "Ġ t", "Ġt he"])
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = tokenizer_from_gguf(tmp_path / "t.gguf")
    text = "<|im_start|>user\nsee the 2024 théâtre<|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2 and tokens.index("Ġthe") in enc.ids
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert sum(t in ("2", "0", "4") for t in enc.tokens) == 4  # digits are split one by one (smollm)


def test_damaged_and_foreign_files_are_refused(tmp_path):
    write_llama_gguf(tmp_path / "m.gguf")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        read_gguf(tmp_path / "cut.gguf")
    assert hf_name("blk.3.attn_v.weight") == "model.layers.3.self_attn.v_proj.weight"
    assert hf_name("blk.0.ssm_conv1d.weight") is None
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.ones((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="general.architecture is 'gpt2'; only 'llama'"):
        read_gguf(tmp_path / "gpt2.gguf")
