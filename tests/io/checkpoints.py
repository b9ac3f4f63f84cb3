"""Small checkpoints written the way transformers + bitsandbytes and llama.cpp write them, produced with
the project's numpy formats module (and gguf's writer): nothing downloaded. Each builder also returns the
float weights the checkpoint decodes to, for the numpy reference forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from msbnb_pass import formats
from msbnb_pass.io import float32_to_bf16, write_safetensors
from msbnb_pass.io.gguf_io import permute_rows

LLAMA = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    torch_dtype="float32",
)
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def llama_float_weights(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    sd = {"model.embed_tokens.weight": rng.standard_normal((v, h)).astype(np.float32)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for name, shape in shapes.items():
            sd[p + name + ".weight"] = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        sd[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
        sd[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    sd["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = (rng.standard_normal((v, h)) / np.sqrt(h)).astype(np.float32)
    return sd


def _round_to(dtype: str, a: np.ndarray) -> np.ndarray:
    if dtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return (float32_to_bf16(a).astype(np.uint32) << 16).view(np.float32)
    return a


def write_llama(
    directory: Path,
    kind: str = "float",
    dtype: str = "F32",
    cfg: dict | None = None,
    seed: int = 0,
    sharded: bool = False,
) -> tuple[dict, dict[str, np.ndarray]]:
    """A transformers directory of a small LLaMA. ``kind``: "float", "nf4", "fp4", "nf4-dq", "fp4-dq" or
    "int8" (LLM.int8). Float tensors are stored as ``dtype`` (F32/F16/BF16). Returns (config, the float
    weights the checkpoint decodes to)."""
    cfg = dict(LLAMA if cfg is None else cfg)
    weights = {k: _round_to(dtype, v) for k, v in llama_float_weights(cfg, seed).items()}
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    decoded = dict(weights)
    for key, w in weights.items():
        module = key[: -len(".weight")]
        if kind != "float" and module.split(".", 3)[-1] in LINEARS:
            if kind == "int8":
                cb, scb = formats.int8_vectorwise_quant(w)
                tensors.update({key: cb, module + ".SCB": scb, module + ".weight_format": np.array(0, np.uint8)})
                decoded[key] = formats.int8_vectorwise_dequant(cb, scb)
            else:
                qt = kind.split("-")[0]
                packed, state = formats.quantize_4bit(w, 64, qt, compress_statistics=kind.endswith("-dq"))
                state.dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[dtype]
                tensors[key] = packed
                tensors.update(state.to_state_dict(key))
                decoded[key] = formats.dequantize_4bit(packed, state)
            continue
        tensors[key] = w
        dtypes[key] = dtype
    if kind != "float":
        qc = {"quant_method": "bitsandbytes", "_load_in_4bit": kind != "int8", "_load_in_8bit": kind == "int8"}
        qc.update(
            load_in_4bit=kind != "int8",
            load_in_8bit=kind == "int8",
            llm_int8_threshold=6.0,
            llm_int8_skip_modules=None,
            bnb_4bit_quant_type=kind.split("-")[0] if kind != "int8" else "fp4",
            bnb_4bit_use_double_quant=kind.endswith("-dq"),
            bnb_4bit_compute_dtype="bfloat16",
            bnb_4bit_quant_storage="uint8",
        )
        cfg["quantization_config"] = qc
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    if sharded:
        names = sorted(tensors)
        half = len(names) // 2
        weight_map = {}
        for j, part in enumerate((names[:half], names[half:])):
            shard = f"model-{j + 1:05d}-of-00002.safetensors"
            write_safetensors(directory / shard, {k: tensors[k] for k in part}, dtypes, {"format": "pt"})
            weight_map.update({k: shard for k in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        write_safetensors(directory / "model.safetensors", tensors, dtypes, {"format": "pt"})
    return cfg, decoded


def write_llama_gguf(path: Path, cfg: dict | None = None, seed: int = 0, qtype: str = "Q4_1") -> tuple[dict, dict]:
    """A small LLaMA GGUF written with gguf's GGUFWriter: linear weights in ``qtype`` (Q4_0/Q4_1), the token
    embedding in Q8_0, norms in F32, q/k rows permuted as llama.cpp's converter does. Returns (config, the
    float weights gguf's own dequantize gives, in transformers' layout)."""
    import gguf

    cfg = dict(LLAMA if cfg is None else cfg)
    weights = llama_float_weights(cfg, seed)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q"}
    names.update({"self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output"})
    names.update({"mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"})
    decoded = {}
    q4 = getattr(gguf.GGMLQuantizationType, qtype)
    for key, value in weights.items():
        if key == "model.embed_tokens.weight":
            name, t = "token_embd.weight", gguf.GGMLQuantizationType.Q8_0
        elif key == "model.norm.weight":
            name, t = "output_norm.weight", gguf.GGMLQuantizationType.F32
        elif key == "lm_head.weight":
            name, t = "output.weight", q4
        else:
            _, _, layer, rest = key.split(".", 3)
            module = rest[: -len(".weight")]
            name = f"blk.{layer}.{names[module]}.weight"
            t = q4 if module in LINEARS else gguf.GGMLQuantizationType.F32
        stored = value
        if name.endswith("attn_q.weight"):
            stored = value[permute_rows(value.shape[0], nh)]
        elif name.endswith("attn_k.weight"):
            stored = value[permute_rows(value.shape[0], nkv)]
        if t == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, stored)
            back = stored
        else:
            data = gguf.quants.quantize(stored, t)
            w.add_tensor(name, data, raw_dtype=t)
            back = gguf.quants.dequantize(data, t).reshape(stored.shape)
        if name.endswith("attn_q.weight"):
            back = back[np.argsort(permute_rows(value.shape[0], nh))]
        elif name.endswith("attn_k.weight"):
            back = back[np.argsort(permute_rows(value.shape[0], nkv))]
        decoded[key] = np.asarray(back, np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return cfg, decoded


BERT = dict(
    model_type="bert",
    architectures=["BertModel"],
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=16,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
)


def write_bert(directory: Path, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """A float32 transformers BertModel directory (with the ``embeddings.position_ids`` buffer and the pooler)."""
    cfg = dict(BERT)
    rng = np.random.default_rng(seed)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    sd = {
        "embeddings.word_embeddings.weight": r(cfg["vocab_size"], h),
        "embeddings.position_embeddings.weight": r(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": r(2, h),
        "embeddings.LayerNorm.weight": 1 + r(h, scale=0.1),
        "embeddings.LayerNorm.bias": r(h, scale=0.1),
        "pooler.dense.weight": r(h, h),
        "pooler.dense.bias": r(h),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name, shape in (
            ("attention.self.query", (h, h)),
            ("attention.self.key", (h, h)),
            ("attention.self.value", (h, h)),
            ("attention.output.dense", (h, h)),
            ("intermediate.dense", (i, h)),
            ("output.dense", (h, i)),
        ):
            sd[p + name + ".weight"] = r(*shape)
            sd[p + name + ".bias"] = r(shape[0], scale=0.05)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[p + ln + ".weight"] = 1 + r(h, scale=0.1)
            sd[p + ln + ".bias"] = r(h, scale=0.1)
    tensors = dict(sd)
    tensors["embeddings.position_ids"] = np.arange(cfg["max_position_embeddings"], dtype=np.int64)[None]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    write_safetensors(directory / "model.safetensors", tensors, None, {"format": "pt"})
    return cfg, sd
