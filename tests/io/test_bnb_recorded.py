"""A checkpoint holding a layer as bitsandbytes 0.50 itself serialized it (tests/data/bnb_golden.npz, recorded
by tools/make_bnb_golden.py: packed bytes, double-quantized absmax, quant maps and the quant_state JSON bytes
of bitsandbytes' own spelling) loads as it is and saves back byte for byte."""

from __future__ import annotations

import json

import mindspore as ms
import numpy as np
import pytest

import msbnb_pass as mb
from msbnb_pass import formats
from msbnb_pass.formats.quant_state import QuantState
from msbnb_pass.io import SafetensorsFile, write_safetensors
from tests.models.reference import llama_forward

from .checkpoints import LLAMA, llama_float_weights

# hidden 130, intermediate 257: mlp.down_proj is [130, 257], the recorded tensor's shape
CFG = dict(
    LLAMA, hidden_size=130, intermediate_size=257, num_attention_heads=5, num_key_value_heads=1, num_hidden_layers=1
)
LAYER = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(("qt", "bs", "respell"), [("nf4", 64, False), ("fp4", 32, False), ("nf4", 64, True)])
def test_bitsandbytes_serialized_layer_loads_and_saves_byte_for_byte(tmp_path, bnb_golden, ms_cpu, qt, bs, respell):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    prefix = f"dq/a130x257/{qt}/{bs}/"
    recorded = {k[len(prefix) + 3 :]: v for k, v in bnb_golden.items() if k.startswith(prefix + "sd/")}
    if respell:  # another writer's spelling of the same JSON (sorted keys, no spaces): kept as it is
        key = f"quant_state.bitsandbytes__{qt}"
        text = json.dumps(json.loads(bytes(recorded[key])), sort_keys=True, separators=(",", ":"))
        recorded[key] = np.frombuffer(text.encode(), np.uint8).copy()
    weights = llama_float_weights(CFG)
    tensors = {k: v for k, v in weights.items() if not k.startswith(LAYER)}
    tensors[LAYER + ".weight"] = bnb_golden[prefix + "packed"]
    tensors.update({f"{LAYER}.weight.{k}": v for k, v in recorded.items()})
    cfg = dict(
        CFG, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": qt}
    )
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    write_safetensors(tmp_path / "ckpt" / "model.safetensors", tensors, metadata={"format": "pt"})

    net = mb.from_pretrained(tmp_path / "ckpt")
    layer = dict(net.cells_and_names())[LAYER]
    assert isinstance(layer, mb.Linear4bit) and layer.quant_type == qt and layer.quant_state.nested
    state = QuantState.from_state_dict("w", {f"w.{k}": v for k, v in recorded.items()})
    decoded = dict(weights, **{LAYER + ".weight": formats.dequantize_4bit(bnb_golden[prefix + "packed"], state)})
    ids = np.arange(10, dtype=np.int32).reshape(2, 5)
    y = net(ms.Tensor(ids)).asnumpy()
    ref = llama_forward(decoded, CFG, ids)
    assert np.abs(y - ref).max() / np.abs(ref).max() < 1e-4

    mb.save_pretrained(net, tmp_path / "out")
    out = SafetensorsFile(tmp_path / "out" / "model.safetensors")
    json_key = f"{LAYER}.weight.quant_state.bitsandbytes__{qt}"
    assert out.raw_bytes(json_key) == bytes(recorded[f"quant_state.bitsandbytes__{qt}"])  # bitsandbytes' spelling
    for key in tensors:
        assert np.array_equal(out.raw(key), np.asarray(tensors[key]).reshape(out.shape(key))), key
