"""Checkpoints travel both ways between msbnb_pass and transformers + bitsandbytes on PyTorch.

Needs a second Python with torch, transformers and bitsandbytes (CPU builds are enough), given by
--torch-python; msbnb_pass runs in this interpreter. Nothing is downloaded: a small random LLaMA is
written as a float transformers directory, then

1. ours -> theirs: `msbnb_pass.from_pretrained(float_dir, BitsAndBytesConfig(...))` + `save_pretrained`,
   loaded by `transformers.AutoModelForCausalLM.from_pretrained` with bitsandbytes: every quantized
   weight that bitsandbytes decodes (`bitsandbytes.functional.dequantize_4bit`, `CB * SCB / 127`) must
   equal the weight msbnb_pass decodes bit for bit, and our logits must equal, within the float32 bound
   of the forward, those of transformers' float model holding the decoded weights (the reference; the
   logits of transformers + bitsandbytes' own quantized forward are shown next to it);
2. theirs -> ours: transformers quantizes the float directory on load and `save_pretrained`s it;
   `msbnb_pass.from_pretrained` reads it: the same two checks.

for NF4 and FP4 (with and without double quantization) and LLM.int8(). Prints a table; --json writes it.

    python tools/check_transformers.py --torch-python /path/to/torch-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    torch_dtype="float32",
    bos_token_id=1,
    eos_token_id=2,
)
KINDS = {
    "nf4+dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False),
    "fp4+dq": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "llm.int8": dict(load_in_8bit=True, llm_int8_threshold=6.0),
}

# Runs in the torch interpreter: load or quantize with transformers + bitsandbytes, dump decoded weights
# (as bitsandbytes decodes them) and logits.
TORCH_SIDE = r"""
import json, sys
import numpy as np, torch
import bitsandbytes as bnb
import bitsandbytes.functional as F
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

mode, src, out, ids_file, float_dir = sys.argv[1:6]
kind = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
ids = torch.tensor(np.load(ids_file), dtype=torch.long)
if mode == "quantize":
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(**kind, bnb_4bit_compute_dtype=torch.float32),
        torch_dtype=torch.float32, device_map="cpu")
    model.save_pretrained(out + "/dir")
else:
    model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32, device_map="cpu")
decoded, stored = {}, {}
for name, m in model.named_modules():
    if isinstance(m, bnb.nn.Linear4bit):
        decoded[name] = F.dequantize_4bit(m.weight.data, m.weight.quant_state).float().numpy()
    elif isinstance(m, bnb.nn.Linear8bitLt):
        cb, scb = m.weight.data, m.weight.SCB
        decoded[name] = (cb.float() * (scb.float()[:, None] / 127.0)).numpy()
        stored["cb:" + name], stored["scb:" + name] = cb.numpy().copy(), scb.float().numpy().copy()
# the reference: transformers' float model with the decoded weights in place of the quantized layers
reference = AutoModelForCausalLM.from_pretrained(float_dir, torch_dtype=torch.float32, device_map="cpu")
for name, m in reference.named_modules():
    if name in decoded:
        m.weight.data = torch.from_numpy(decoded[name]).float()
with torch.no_grad():
    logits = model(ids).logits.float().numpy()  # after decoding: the CPU path may repack the weights
    ref = reference(ids).logits.float().numpy()
np.savez(out + "/theirs.npz", logits=logits, reference=ref, **stored, **{"w:" + k: v for k, v in decoded.items()})
print(json.dumps({"transformers": __import__("transformers").__version__, "bitsandbytes": bnb.__version__,
                  "torch": torch.__version__, "layers": len(decoded)}))
"""


def float_checkpoint(directory: Path, seed: int = 0) -> None:
    from msbnb_pass.io import write_safetensors

    rng = np.random.default_rng(seed)
    c = CONFIG
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h)}
    mlp = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    sd = {"model.embed_tokens.weight": rng.standard_normal((v, h)), "lm_head.weight": rng.standard_normal((v, h)) / 16}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for group, table in (("self_attn", shapes), ("mlp", mlp)):
            for name, shape in table.items():
                sd[f"{p}{group}.{name}.weight"] = rng.standard_normal(shape) / np.sqrt(shape[1])
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.standard_normal(h)
    sd["model.norm.weight"] = 1 + 0.1 * rng.standard_normal(h)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(c, indent=2))
    write_safetensors(
        directory / "model.safetensors", {k: a.astype(np.float32) for k, a in sd.items()}, metadata={"format": "pt"}
    )


def ours(directory: Path, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Logits, decoded weights (by module path) and LLM.int8()'s stored CB/SCB of a checkpoint loaded by
    msbnb_pass."""
    import mindspore as ms

    import msbnb_pass as mb

    net = mb.from_pretrained(directory)
    logits = net(ms.Tensor(ids.astype(np.int32))).asnumpy()
    decoded, stored = {}, {}
    for path, cell in net.cells_and_names():
        if type(cell).__name__ == "Linear4bit":
            decoded[path] = cell.dequantized_weight()
        elif type(cell).__name__ == "Linear8bitLt":
            sd = cell.bnb_state_dict()
            decoded[path] = cell.dequantized_weight()
            stored["cb:" + path], stored["scb:" + path] = sd["weight"], sd["SCB"]
    return logits, decoded, stored


def logits_bound(logits: np.ndarray) -> float:
    """Float32 bound for two implementations of one forward on identical weights (transformers' float
    model and ours): the summation order differs in every matmul, the softmax and the norms; about
    gamma_K per matmul on a chain of 4 per layer plus the head, with K the widest reduction, relative to
    the logits' scale (the tolerance the suite's network comparisons use)."""
    u = 2.0**-24
    k = CONFIG["intermediate_size"]
    chain = 4 * CONFIG["num_hidden_layers"] + 1
    return chain * k * u / (1 - k * u) * float(np.abs(logits).max()) * 4


def run_torch(python: str, mode: str, src: Path, out: Path, ids_file: Path, float_dir: Path, kind: dict | None) -> dict:
    args = [python, "-c", TORCH_SIDE, mode, str(src), str(out), str(ids_file), str(float_dir)]
    if kind is not None:
        args.append(json.dumps(kind))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"the torch side failed ({mode} {src}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(ours_logits, ours_w, ours_stored, theirs_file: Path) -> dict:
    """4-bit: the decoded weights must be bit-identical. LLM.int8(): the stored CB (int8) and SCB must be;
    its decoded weight (CB * SCB / 127) may differ in the last bit between the two orders of rounding.
    Our logits must equal the float reference within the float32 bound, except for LLM.int8(), whose
    forward also rounds the activations to int8 (both implementations' deviations are shown)."""
    theirs = np.load(theirs_file)
    t_w = {k[2:]: theirs[k] for k in theirs.files if k.startswith("w:")}
    same_names = sorted(set(t_w) & set(ours_w))
    if ours_stored:
        keys = [k for k in ours_stored if k in theirs.files]
        identical = sum(np.array_equal(ours_stored[k], theirs[k]) for k in keys) // 2
    else:
        identical = sum(np.array_equal(ours_w[k].astype(np.float32), t_w[k].astype(np.float32)) for k in same_names)
    worst = max((float(np.abs(ours_w[k] - t_w[k]).max()) for k in same_names), default=float("nan"))
    ref = theirs["reference"]
    ours_diff = float(np.abs(ours_logits - ref).max())
    theirs_diff = float(np.abs(theirs["logits"] - ref).max())
    bound = logits_bound(ref)
    logits_ok = bool(ours_stored) or ours_diff <= bound
    return {
        "layers_ours": len(ours_w),
        "layers_theirs": len(t_w),
        "identical": f"{identical}/{len(same_names)}",
        "compared": "stored CB, SCB" if ours_stored else "decoded weight",
        "max_weight_diff": worst,
        "ours_logit_diff": ours_diff,
        "theirs_logit_diff": theirs_diff,
        "logit_bound": None if ours_stored else bound,
        "ok": identical == len(same_names) == len(ours_w) == len(t_w) and logits_ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch-python", required=True, help="a Python with torch, transformers and bitsandbytes")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, from {list(KINDS)}")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    import mindspore as ms

    import msbnb_pass as mb

    ms.set_context(mode=ms.PYNATIVE_MODE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        float_checkpoint(tmp / "float")
        ids = np.random.default_rng(1).integers(3, CONFIG["vocab_size"], (2, 24))
        np.save(tmp / "ids.npy", ids)
        for name in args.kinds.split(","):
            kind = KINDS[name]
            # 1. ours -> theirs
            d = tmp / f"ours-{name}"
            net = mb.from_pretrained(tmp / "float", mb.BitsAndBytesConfig(**kind))
            mb.save_pretrained(net, d)
            logits, decoded, stored = ours(d, ids)
            out = tmp / f"t1-{name}"
            out.mkdir()
            versions = run_torch(args.torch_python, "load", d, out, tmp / "ids.npy", tmp / "float", None)
            rows.append(
                {
                    "kind": name,
                    "direction": "msbnb_pass -> transformers",
                    **compare(logits, decoded, stored, out / "theirs.npz"),
                }
            )
            # 2. theirs -> ours
            out = tmp / f"t2-{name}"
            out.mkdir()
            run_torch(args.torch_python, "quantize", tmp / "float", out, tmp / "ids.npy", tmp / "float", kind)
            logits, decoded, stored = ours(out / "dir", ids)
            rows.append(
                {
                    "kind": name,
                    "direction": "transformers -> msbnb_pass",
                    **compare(logits, decoded, stored, out / "theirs.npz"),
                }
            )
    print(
        f"torch {versions['torch']}, transformers {versions['transformers']}, bitsandbytes {versions['bitsandbytes']}"
    )
    print(
        "| format | direction | quantized layers (ours / theirs) | bit-identical | "
        "max logit diff vs float reference: ours (bound) / transformers + bitsandbytes | ok |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['kind']} | {r['direction']} | {r['layers_ours']} / {r['layers_theirs']} | "
            f"{r['identical']} ({r['compared']}) | {r['ours_logit_diff']:.1e} "
            f"({'int8 activations' if r['logit_bound'] is None else format(r['logit_bound'], '.1e')}) / "
            f"{r['theirs_logit_diff']:.1e} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "rows": rows}, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
