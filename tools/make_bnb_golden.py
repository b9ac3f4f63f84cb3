"""Regenerate the golden fixtures in tests/data/ from the real bitsandbytes and transformers.

Run by hand in an environment that has torch, bitsandbytes 0.50 and transformers (never a dependency of
this project; the tests only read the files this writes):

    python tools/make_bnb_golden.py [--out tests/data]

It records, for small seeded inputs stored alongside: bitsandbytes' packed NF4/FP4 bytes and absmax at
several block sizes (shapes with partial blocks, odd counts and an all-zero row), the double-quantized
statistics and the state-dict entries, the dynamic maps, LLM.int8() row-wise quantization, and the JSON
that transformers writes for several BitsAndBytesConfig values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    import torch
    import transformers

    torch._dynamo.config.recompile_limit = 1000
    rng = np.random.default_rng(20261121)
    inputs = {
        "a3x70": rng.standard_normal((3, 70)).astype(np.float32) * 3,
        "a7x13": rng.standard_normal((7, 13)).astype(np.float32),
        "a5": rng.standard_normal(5).astype(np.float32) * 0.01,
        "a33x65x3": rng.standard_normal((33, 65, 3)).astype(np.float32),
        "a130x257": (rng.standard_normal((130, 257)) * rng.uniform(0.1, 4, (130, 1))).astype(np.float32),
    }
    inputs["a7x13"][2] = 0.0  # an all-zero row: whole zero blocks for small block sizes
    data: dict[str, np.ndarray] = {f"input/{k}": v for k, v in inputs.items()}
    for name, a in inputs.items():
        for qt in ("nf4", "fp4"):
            for bs in (32, 64, 128, 256, 4096):
                packed, state = F.quantize_4bit(torch.from_numpy(a), blocksize=bs, quant_type=qt)
                data[f"q4/{name}/{qt}/{bs}/packed"] = packed.numpy()
                data[f"q4/{name}/{qt}/{bs}/absmax"] = state.absmax.numpy()
    for name in ("a130x257", "a33x65x3"):
        for qt, bs in (("nf4", 64), ("fp4", 32)):
            packed, state = F.quantize_4bit(
                torch.from_numpy(inputs[name]), blocksize=bs, quant_type=qt, compress_statistics=True
            )
            key = f"dq/{name}/{qt}/{bs}"
            data[f"{key}/packed"] = packed.numpy()
            for k, v in state.as_dict(packed=True).items():
                data[f"{key}/sd/{k}"] = v.numpy()
    data["dynamic_map/signed"] = F.create_dynamic_map(signed=True).numpy()
    data["dynamic_map/unsigned"] = F.create_dynamic_map(signed=False).numpy()
    for name in ("a3x70", "a130x257", "a7x13"):
        CB, SCB, _ = F.int8_vectorwise_quant(torch.from_numpy(inputs[name].copy()))
        data[f"int8/{name}/CB"] = CB.numpy()
        data[f"int8/{name}/SCB"] = SCB.numpy()
    np.savez_compressed(out / "bnb_golden.npz", **data)

    BNB = transformers.BitsAndBytesConfig
    configs = {
        "default": {},
        "4bit_nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        "4bit_fp16": dict(load_in_4bit=True, bnb_4bit_compute_dtype="float16"),
        "8bit": dict(load_in_8bit=True),
        "8bit_skip": dict(load_in_8bit=True, llm_int8_threshold=4.0, llm_int8_skip_modules=["classifier", "pooler"]),
        "8bit_fp16w": dict(load_in_8bit=True, llm_int8_has_fp16_weight=True, llm_int8_enable_fp32_cpu_offload=True),
    }
    cfg_out = {"versions": {"transformers": transformers.__version__, "bitsandbytes": bnb.__version__}, "configs": {}}
    for name, kwargs in configs.items():
        cfg = BNB(**kwargs)
        cfg_out["configs"][name] = {
            "kwargs": kwargs,
            "to_dict_json": json.dumps(cfg.to_dict(), sort_keys=False),
            "to_json_string": cfg.to_json_string(),
            "to_json_string_full": cfg.to_json_string(use_diff=False),
        }
    (out / "bnb_config_golden.json").write_text(json.dumps(cfg_out, indent=1) + "\n")
    print(f"wrote {out / 'bnb_golden.npz'} ({len(data)} arrays) and {out / 'bnb_config_golden.json'}")


if __name__ == "__main__":
    main()
