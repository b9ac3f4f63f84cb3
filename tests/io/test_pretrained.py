"""from_pretrained / save_pretrained / dequantize_model on small transformers + bitsandbytes checkpoints and
GGUF files written here: logits equal a numpy forward on the same decoded weights, quantized layers are
built from the stored bytes (no float copy), round trips are byte-identical, bad files are refused."""

from __future__ import annotations

import json
import os

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn

import msbnb_pass as mb
from msbnb_pass import formats
from msbnb_pass.io import CheckpointError, SafetensorsFile, write_safetensors
from tests.bounds import assert_network_close
from tests.models.reference import bert_forward, llama_forward
from tests.models.test_models import llama_terms

from .checkpoints import LLAMA, write_bert, write_llama, write_llama_gguf

IDS = np.random.default_rng(0).integers(0, 128, (2, 6)).astype(np.int32)


@pytest.fixture(autouse=True)
def _pynative(ms_cpu):
    ms.set_context(mode=ms.PYNATIVE_MODE)


def _logits(net) -> np.ndarray:
    return net(ms.Tensor(IDS)).asnumpy()


def _check_close(y, ref, cfg):
    # the criterion (relative error < 1e-4) and the derived float32 bound
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4
    assert_network_close(y, ref, n_terms=llama_terms(cfg, IDS.shape[1]), amplification=8)


@pytest.mark.parametrize(
    ("kind", "dtype", "sharded"), [("float", "F32", False), ("float", "F16", True), ("float", "BF16", False)]
)
def test_float_checkpoints(tmp_path, kind, dtype, sharded):
    cfg, decoded = write_llama(tmp_path / "ckpt", kind, dtype, sharded=sharded)
    net = mb.from_pretrained(tmp_path / "ckpt")
    _check_close(_logits(net), llama_forward(decoded, cfg, IDS), cfg)
    assert net.checkpoint_info.unused_keys == [] and net.checkpoint_info.quantized_layers == []


@pytest.mark.parametrize("kind", ["nf4", "fp4", "nf4-dq", "fp4-dq"])
def test_bitsandbytes_4bit_checkpoints_load_as_stored(tmp_path, kind):
    cfg, decoded = write_llama(tmp_path / "ckpt", kind, "BF16")
    net = mb.from_pretrained(tmp_path / "ckpt")
    _check_close(_logits(net), llama_forward(decoded, cfg, IDS), cfg)
    cells = dict(net.cells_and_names())
    q = cells["model.layers.1.mlp.down_proj"]
    assert isinstance(q, mb.Linear4bit) and q.quant_type == kind.split("-")[0]
    assert q.quant_state.nested is kind.endswith("-dq")
    assert q.compute_dtype_name == "float32"  # the checkpoint asks for bfloat16, which the CPU cannot run
    # the packed bytes are the stored ones: nothing was re-quantized, no float copy of the layer exists
    stored = SafetensorsFile(tmp_path / "ckpt" / "model.safetensors")
    assert np.array_equal(q.weight.asnumpy(), stored.get("model.layers.1.mlp.down_proj.weight"))
    assert [p for p, c in cells.items() if isinstance(c, nn.Dense)] == ["lm_head"]


def test_llm_int8_checkpoint(tmp_path):
    cfg, decoded = write_llama(tmp_path / "ckpt", "int8", "F16")
    net = mb.from_pretrained(tmp_path / "ckpt")
    cells = dict(net.cells_and_names())
    stored = SafetensorsFile(tmp_path / "ckpt" / "model.safetensors")
    q = cells["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, mb.Linear8bitLt) and q.threshold == 6.0
    assert np.array_equal(q.weight.asnumpy(), stored.get("model.layers.0.self_attn.q_proj.weight"))
    assert np.array_equal(q.SCB.asnumpy(), stored.get("model.layers.0.self_attn.q_proj.SCB"))

    def int8(name, x):  # LLM.int8()'s own decomposition, in numpy
        cb = stored.get(name + ".weight")
        out = formats.int8_mixed_matmul(
            x.reshape(-1, x.shape[-1]).astype(np.float32), cb, stored.get(name + ".SCB"), 6.0
        )
        return out.reshape(*x.shape[:-1], -1)

    ref = llama_forward(decoded, cfg, IDS, linear=int8)
    y = _logits(net)
    # activations are rounded to int8 per row: a float32-level difference upstream can move one rounding by one
    # step (1/127 of a row's absmax), so this compares at int8 resolution, not float32's
    assert np.abs(y - ref).max() / np.abs(ref).max() < 2e-2


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_gguf_4bit_maps_onto_int4_without_requantization(tmp_path, qtype):
    import gguf

    cfg, decoded = write_llama_gguf(tmp_path / "m.gguf", qtype=qtype)
    net = mb.from_pretrained(tmp_path / "m.gguf")
    _check_close(_logits(net), llama_forward(decoded, cfg, IDS), cfg)
    cells = dict(net.cells_and_names())
    q = cells["model.layers.0.self_attn.q_proj"]
    assert isinstance(q, mb.Linear4bit) and q.quant_type == "int4" and q.blocksize == 32
    assert q.quant_state.symmetric is (qtype == "Q4_0")
    # the decoded weights are gguf's own dequantization, exactly (rows un-permuted)
    assert np.array_equal(q.dequantized_weight(), decoded["model.layers.0.self_attn.q_proj.weight"])
    assert np.array_equal(
        net.model.embed_tokens.weight.asnumpy(), decoded["model.embed_tokens.weight"]
    )  # Q8_0 -> float32
    assert gguf.GGMLQuantizationType  # the writer above is gguf's


def test_loaded_quantized_network_compiles_in_graph_mode(tmp_path):
    write_llama_gguf(tmp_path / "m.gguf", qtype="Q4_1")
    write_llama(tmp_path / "nf4", "nf4-dq", "F16")
    for source in (tmp_path / "m.gguf", tmp_path / "nf4"):
        net = mb.from_pretrained(source)
        eager = _logits(net)
        ms.set_context(mode=ms.GRAPH_MODE)
        try:
            graph = _logits(net)
        finally:
            ms.set_context(mode=ms.PYNATIVE_MODE)
        assert_network_close(graph, eager, n_terms=llama_terms(LLAMA, IDS.shape[1]), amplification=8)


def test_round_trip_is_byte_identical(tmp_path):
    write_llama(tmp_path / "ckpt", "nf4-dq", "BF16")
    net = mb.from_pretrained(tmp_path / "ckpt")
    mb.save_pretrained(net, tmp_path / "out")
    a = SafetensorsFile(tmp_path / "ckpt" / "model.safetensors")
    b = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        assert a.dtype(k) == b.dtype(k) and a.shape(k) == b.shape(k), k
        assert a.raw_bytes(k) == b.raw_bytes(k), k
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == (
        tmp_path / "out" / "model.safetensors"
    ).read_bytes()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert config["quantization_config"]["bnb_4bit_compute_dtype"] == "bfloat16"  # the checkpoint's, unchanged
    again = mb.from_pretrained(tmp_path / "out")
    assert np.array_equal(_logits(again), _logits(net))


def test_quantization_config_on_a_float_checkpoint_runs_the_pass(tmp_path):
    cfg, decoded = write_llama(tmp_path / "ckpt", "float", "F32")
    config = mb.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    net = mb.from_pretrained(tmp_path / "ckpt", quantization_config=config)
    twin = mb.quantize(mb.from_pretrained(tmp_path / "ckpt"), config).net
    assert np.array_equal(_logits(net), _logits(twin))
    cells = dict(net.cells_and_names())
    assert isinstance(cells["model.layers.0.mlp.up_proj"], mb.Linear4bit) and isinstance(cells["lm_head"], nn.Dense)
    # what it saves is a bitsandbytes checkpoint that loads back to the same network, smaller than fp16
    mb.save_pretrained(net, tmp_path / "nf4")
    qc = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and qc["bnb_4bit_use_double_quant"]
    back = mb.from_pretrained(tmp_path / "nf4")
    assert np.array_equal(_logits(back), _logits(net))
    with pytest.raises(ValueError, match="already quantized"):
        mb.from_pretrained(tmp_path / "nf4", quantization_config=config)


def test_sizes_against_fp16(tmp_path):
    cfg = dict(LLAMA, hidden_size=256, intermediate_size=512, vocab_size=64, tie_word_embeddings=True)
    sizes = {}
    for kind in ("float", "nf4-dq", "int8"):
        write_llama(tmp_path / kind, kind, "F16", cfg=cfg)
        sizes[kind] = os.path.getsize(tmp_path / kind / "model.safetensors")
    assert sizes["nf4-dq"] < 0.29 * sizes["float"]
    # LLM.int8 stores one byte per weight plus a float32 SCB per row: (K + 4) / (2K) of fp16 = 0.5 + 2/K per
    # layer, so a whole file is just above half the fp16 one (fp16 embedding and norms included): < 0.52 here
    assert sizes["int8"] < 0.52 * sizes["float"]


def test_dequantize_model(tmp_path):
    cfg, decoded = write_llama(tmp_path / "ckpt", "fp4", "F32")
    net = mb.from_pretrained(tmp_path / "ckpt")
    before = _logits(net)
    assert mb.dequantize_model(net) is net
    assert not any(isinstance(c, mb.Linear4bit) for _, c in net.cells_and_names())
    assert len(net.dequantize_report.layers) == 14 and net.dequantize_report.added_error == 0.0
    assert_network_close(_logits(net), before, n_terms=llama_terms(cfg, IDS.shape[1]), amplification=8)
    assert np.array_equal(
        net.model.layers[0].mlp.up_proj.weight.asnumpy(), decoded["model.layers.0.mlp.up_proj.weight"]
    )
    mb.save_pretrained(net, tmp_path / "float")  # a float checkpoint again, no quantization_config
    assert "quantization_config" not in json.loads((tmp_path / "float" / "config.json").read_text())


def test_bert_checkpoint_strict(tmp_path):
    cfg, sd = write_bert(tmp_path / "bert")
    net = mb.from_pretrained(tmp_path / "bert")
    assert net.checkpoint_info.unused_keys == [] and net.checkpoint_info.ignored_keys == ["embeddings.position_ids"]
    ids = np.array([[2, 5, 7, 9, 11], [3, 4, 5, 0, 0]], np.int32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
    y = net(ms.Tensor(ids), ms.Tensor(mask)).asnumpy()
    ref = bert_forward(sd, cfg, ids, mask.astype(np.float64))
    # per layer: q/k/v (hidden), scores (head_dim), probabilities (t), output (hidden), intermediate, output
    n = cfg["num_hidden_layers"] * (32 + 8 + 5 + 32 + 32 + 64)
    assert_network_close(y[0], ref[0], n_terms=n, amplification=8)
    assert_network_close(y[1, :3], ref[1, :3], n_terms=n, amplification=8)  # the real tokens of row 1


# ---- refusals ------------------------------------------------------------------------------------------------------
def _tensors(path):
    f = SafetensorsFile(path)
    return {k: f.raw(k).copy() for k in f.keys()}, {k: f.dtype(k) for k in f.keys()}


def test_missing_unused_and_mismatched_tensors_are_named(tmp_path):
    write_llama(tmp_path / "ckpt", "nf4", "F32")
    st = tmp_path / "ckpt" / "model.safetensors"
    tensors, dtypes = _tensors(st)

    del tensors["model.layers.1.post_attention_layernorm.weight"]
    write_safetensors(st, tensors, dtypes)
    with pytest.raises(CheckpointError, match="tensor 'model.layers.1.post_attention_layernorm.weight' is missing"):
        mb.from_pretrained(tmp_path / "ckpt")

    tensors, dtypes = _tensors(tmp_path / "ckpt" / "model.safetensors")
    tensors["model.layers.1.post_attention_layernorm.weight"] = np.ones(64, np.float32)
    tensors["model.extra.weight"] = np.ones(3, np.float32)
    write_safetensors(st, tensors, dtypes)
    with pytest.raises(CheckpointError, match="do(es)? not use, e.g. 'model.extra.weight'"):
        mb.from_pretrained(tmp_path / "ckpt")
    assert mb.from_pretrained(tmp_path / "ckpt", strict=False).checkpoint_info.unused_keys == ["model.extra.weight"]

    del tensors["model.extra.weight"]
    tensors["model.norm.weight"] = np.ones(65, np.float32)
    write_safetensors(st, tensors, dtypes)
    with pytest.raises(CheckpointError, match=r"tensor 'model.norm.weight' has shape \[65\], the config needs \[64\]"):
        mb.from_pretrained(tmp_path / "ckpt")


def test_unknown_quant_type_and_tampered_quant_state_are_refused(tmp_path):
    write_llama(tmp_path / "ckpt", "nf4", "F32")
    st = tmp_path / "ckpt" / "model.safetensors"
    tensors, dtypes = _tensors(st)
    key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4"
    tensors["model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf5"] = tensors.pop(key)
    write_safetensors(st, tensors, dtypes)
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp.up_proj'.*bitsandbytes__nf5"):
        mb.from_pretrained(tmp_path / "ckpt")

    tensors[key] = tensors.pop("model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf5")
    meta = json.loads(bytes(tensors[key]))
    meta["shape"] = [64, 128]  # transposed: the packed size still fits, the layer does not
    tensors[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    write_safetensors(st, tensors, dtypes)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.up_proj.weight' holds a \[64, 128\] weight"):
        mb.from_pretrained(tmp_path / "ckpt")

    meta["shape"] = [128, 64]
    tensors[key] = np.frombuffer(json.dumps(meta).encode(), np.uint8).copy()
    absmax = "model.layers.0.mlp.up_proj.weight.absmax"
    tensors[absmax] = tensors[absmax].copy()
    tensors[absmax][3] = np.nan
    write_safetensors(st, tensors, dtypes)
    with pytest.raises(
        CheckpointError, match=r"layer 'model.layers.0.mlp.up_proj': 'weight.absmax' holds 1 invalid.*nan"
    ):
        mb.from_pretrained(tmp_path / "ckpt")


def test_truncated_checkpoint_is_refused(tmp_path):
    write_llama(tmp_path / "ckpt", "float", "F32")
    st = tmp_path / "ckpt" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"tensor 'model\.[a-z_.0-9]+' ends at byte .* \(truncated file\)"):
        mb.from_pretrained(tmp_path / "ckpt")


def test_save_pretrained_is_atomic(tmp_path, monkeypatch):
    write_llama(tmp_path / "ckpt", "float", "F32")
    net = mb.from_pretrained(tmp_path / "ckpt")
    out = tmp_path / "out"
    mb.save_pretrained(net, out)
    good = (out / "model.safetensors").read_bytes()
    real_replace = os.replace

    def crash_on_weights(src, dst):
        if str(dst).endswith("model.safetensors"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_weights)
    with pytest.raises(OSError, match="simulated crash"):
        mb.save_pretrained(net, out, float_dtype="F16")
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == good
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep")
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(victim)
    with pytest.raises(CheckpointError, match="not a regular file"):
        mb.save_pretrained(net, out)
    assert victim.read_bytes() == b"keep"


def test_quantization_config_decides_threshold_and_compute_dtype(tmp_path):
    def edit(directory, **fields):
        cfg = json.loads((directory / "config.json").read_text())
        cfg["quantization_config"].update(fields)
        (directory / "config.json").write_text(json.dumps(cfg))

    write_llama(tmp_path / "i8", "int8", "F32")
    edit(tmp_path / "i8", llm_int8_threshold=0.0)
    layers = [c for _, c in mb.from_pretrained(tmp_path / "i8").cells_and_names() if isinstance(c, mb.Linear8bitLt)]
    assert len(layers) == 14 and {c.threshold for c in layers} == {0.0}
    write_llama(tmp_path / "q4", "nf4", "F32")
    edit(tmp_path / "q4", bnb_4bit_compute_dtype="float16")
    layers = [c for _, c in mb.from_pretrained(tmp_path / "q4").cells_and_names() if isinstance(c, mb.Linear4bit)]
    assert {c.compute_dtype_name for c in layers} == {"float16"}
    net = mb.from_pretrained(tmp_path / "q4", compute_dtype="float32")
    assert {c.compute_dtype_name for _, c in net.cells_and_names() if isinstance(c, mb.Linear4bit)} == {"float32"}


def test_compute_dtype_override_opts_into_bfloat16_and_int8(tmp_path):
    write_llama(tmp_path / "q4", "nf4", "F32")
    cfg = json.loads((tmp_path / "q4" / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_compute_dtype"] = "bfloat16"  # what most hub checkpoints say
    (tmp_path / "q4" / "config.json").write_text(json.dumps(cfg))
    exact = mb.from_pretrained(tmp_path / "q4")  # computes exactly unless asked
    assert {c.compute_dtype_name for _, c in exact.cells_and_names() if isinstance(c, mb.Linear4bit)} == {"float32"}
    ref = _logits(exact).astype(np.float64)
    # one layer's relative RMS error (README, compute_dtype): 2.4e-3 bfloat16, 8.5e-3 int8; the 2 decoder layers
    # put ~4 such matmuls in series on the path to the logits, whose errors add: 4x the single-layer figure
    for compute, rel in (("bfloat16", 4 * 2.4e-3), ("int8", 4 * 8.5e-3)):
        net = mb.from_pretrained(tmp_path / "q4", compute_dtype=compute)
        assert {c.compute_dtype_name for _, c in net.cells_and_names() if isinstance(c, mb.Linear4bit)} == {compute}
        got = _logits(net).astype(np.float64)
        # inexact by design: close, not equal
        assert not np.array_equal(got, ref)
        assert np.linalg.norm(got - ref) <= rel * np.linalg.norm(ref)
        mb.save_pretrained(net, tmp_path / f"out_{compute}")  # the checkpoint's own config is written back
        saved = json.loads((tmp_path / f"out_{compute}" / "config.json").read_text())["quantization_config"]
        assert saved["bnb_4bit_compute_dtype"] == "bfloat16"
    with pytest.raises(
        ValueError, match=r"compute_dtype must be one of \('float32', 'float16', 'bfloat16', 'int8'\), got 'int4'"
    ):
        mb.from_pretrained(tmp_path / "q4", compute_dtype="int4")


def test_sharded_save_and_switching_layouts(tmp_path):
    write_llama(tmp_path / "ckpt", "nf4", "BF16")
    net = mb.from_pretrained(tmp_path / "ckpt")
    written = mb.save_pretrained(net, tmp_path / "out", max_shard_size=20_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json") in written
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert np.array_equal(_logits(mb.from_pretrained(tmp_path / "out")), _logits(net))
    mb.save_pretrained(net, tmp_path / "out")  # back to one file: the old index and shards must not linger
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert np.array_equal(_logits(mb.from_pretrained(tmp_path / "out")), _logits(net))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_embedding_and_head_round_trip(tmp_path, bits):
    """A model whose token embedding and head were quantized (the opt-ins) saves its tables in bitsandbytes'
    layout (Embedding4bit's keys, or int8 rows + SCB) and loads them back as quantized tables: the same
    logits bit for bit, the same bytes when saved again; dequantize_model turns the table back into floats
    (the same logits: the rows are the decoded ones); a tied table stored quantized is refused."""
    from msbnb_pass import QuantConfig
    from msbnb_pass.models import LlamaForCausalLM, config_from_dict

    net = LlamaForCausalLM(config_from_dict(LLAMA))  # untied head
    qc = QuantConfig(bits=bits, quantize_embeddings=True, quantize_lm_head=True)
    if bits == 4:
        qc = QuantConfig(bits=4, quant_type="nf4", group_size=64, quantize_embeddings=True, quantize_lm_head=True)
    net = mb.quantize(net, qc).net
    table = mb.Embedding4bit if bits == 4 else mb.Embedding8bit
    assert isinstance(net.model.embed_tokens, table)
    mb.save_pretrained(net, tmp_path / "q")
    back = mb.from_pretrained(tmp_path / "q")
    assert isinstance(back.model.embed_tokens, table)
    ids = ms.Tensor(IDS)
    rows = back.model.embed_tokens(ids).asnumpy()
    assert np.array_equal(rows, net.model.embed_tokens(ids).asnumpy())
    if bits == 4:  # (weight-only int8 linears load back as LLM.int8 layers: bitsandbytes has no other int8)
        assert np.array_equal(_logits(back), _logits(net))
    mb.save_pretrained(back, tmp_path / "again")
    saved, again = (tmp_path / d / "model.safetensors" for d in ("q", "again"))
    assert saved.read_bytes() == again.read_bytes()
    ref = _logits(back)
    mb.dequantize_model(back)
    assert type(back.model.embed_tokens).__name__ == "Embedding"
    assert np.array_equal(back.model.embed_tokens(ids).asnumpy(), rows)
    if bits == 4:  # (LLM.int8 layers compute with int8 activations, their dequantized twins do not)
        assert np.array_equal(_logits(back), ref)
    assert any(path == "model.embed_tokens" for path, _, _ in back.dequantize_report.layers)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"the tied embedding 'model.embed_tokens' is stored quantized"):
        mb.from_pretrained(tmp_path / "q", strict=False)
